"""Export → from_pretrained in a fresh process gives identical embeddings; the folder holds no pickle;
format=timm writes a timm ViT state dict."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


TEXTS = ["no pleural effusion", "mild cardiomegaly"]


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A medvlp checkpoint as Lightning writes it (weights + the ``medvlp`` metadata), for a tiny CLIP whose
    weights were moved off their initialisation."""
    from medvlp.registry import METHODS

    torch.manual_seed(0)
    model = METHODS.get("clip")(image_encoder={"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size_2d": 32,
                                               "patch_size_2d": 8},
                                text_encoder={"model": "builtin:tiny", "tiny_hidden_size": 32, "max_length": 16},
                                embed_dim=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt: dict = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path


def _is_pickle(path: Path) -> bool:
    head = path.read_bytes()[:2]
    return head[:1] == b"\x80" or path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def test_export_round_trip_in_fresh_process(trained_ckpt: Path, tmp_path: Path) -> None:
    from medvlp.cli import main
    from medvlp.method import load_method

    out = tmp_path / "export"
    assert main(["export", f"ckpt={trained_ckpt}", f"out={out}"]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "config.json" in files and "model.safetensors" in files and any(f.startswith("text/") for f in files)
    assert not [f for f in files if _is_pickle(out / f)], files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "clip" and cfg["preprocess"]["spatial_dims"] == 2 and "torch" in cfg["versions"]
    assert cfg["hparams"]["text_encoder"]["model"] == "text"

    model = load_method(str(trained_ckpt))
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(x).numpy(), model.encode_text(TEXTS).numpy()
    threads = torch.get_num_threads()
    script = (
        "import sys, numpy as np, torch, medvlp\n"
        f"torch.set_num_threads({threads})\n"
        f"model, pre = medvlp.from_pretrained({str(out)!r})\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(tmp_path / 'img.npy')!r}, model.encode_image(x).numpy())\n"
        f"    np.save({str(tmp_path / 'txt.npy')!r}, model.encode_text({TEXTS!r}).numpy())\n"
        "    torch.set_num_threads(1)\n"
        f"    np.save({str(tmp_path / 'img1.npy')!r}, model.encode_image(x).numpy())\n"
        f"    np.save({str(tmp_path / 'txt1.npy')!r}, model.encode_text({TEXTS!r}).numpy())\n"
        "    assert pre.image(np.full((40, 40), 128, dtype=np.uint8)).shape == (1, 1, 32, 32)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    # the same thread count: the same kernels and reduction order, so the export must reproduce every bit
    np.testing.assert_array_equal(np.load(tmp_path / "img.npy"), ref_img)
    np.testing.assert_array_equal(np.load(tmp_path / "txt.npy"), ref_txt)
    # another thread count splits the float32 reductions differently: each sum of n products may round
    # differently by up to about n·eps·Σ|terms|; for these unit-norm embeddings (widths ≤ 128, a few layers)
    # 1e-5 bounds that with margin (measured: 8.9e-8 between 2 threads and 1), while a wrong weight or a
    # wrong preprocessing moves entries by ~1e-2
    np.testing.assert_allclose(np.load(tmp_path / "img1.npy"), ref_img, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "txt1.npy"), ref_txt, rtol=0, atol=1e-5)


def test_export_timm_format(trained_ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from medvlp.encoders import ViTEncoder
    from medvlp.pretrained.init import load_initial_weights
    from medvlp.method import load_method
    from medvlp.pretrained.export import export

    out = export(trained_ckpt, tmp_path / "timm", format="timm")
    sd = load_file(str(out / "model.safetensors"))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.weight"} <= set(sd)
    cfg = json.loads((out / "config.json").read_text())
    model = load_method(str(trained_ckpt))
    enc = model.image_encoder
    again = ViTEncoder(in_channels=1, embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                       img_size_2d=cfg["img_size"], patch_size_2d=cfg["patch_size"],
                       init_from=str(out / "model.safetensors")).eval()
    load_initial_weights(again)
    x = torch.randn(2, 1, cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(again(x)["pooled"], enc.eval()(x)["pooled"])


def test_export_folder_is_a_ckpt_format(trained_ckpt: Path, tmp_path: Path) -> None:
    from medvlp.pretrained.export import export
    from medvlp.pretrained.formats import load_ckpt_spec

    out = export(trained_ckpt, tmp_path / "e")
    model, desc = load_ckpt_spec({"format": "export", "path": str(out)})
    assert desc.startswith("export:") and model.encode_text(TEXTS).shape[0] == 2


def test_not_an_export_folder(tmp_path: Path) -> None:
    import medvlp

    with pytest.raises(FileNotFoundError, match="config.json"):
        medvlp.from_pretrained(str(tmp_path))
