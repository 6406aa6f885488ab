"""`medvlp prepare`: shards from published layouts, resume after a kill, corrupt inputs, spec mixing, and the
optimised 2D decode path against the prepared one."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp.cli import main
from medvlp.datamodules import MIMICCXRDataModule, MSDDataModule, RSNAPneumoniaDataModule, ShardDataModule, write_shards
from medvlp.datamodules.io import prepare as prep
from medvlp.datamodules.io.readers import DataError, read_image_2d
from medvlp.datamodules.tabular import resize_2d
from tests import fixtures as fx


def _prepare(root: Path, out: Path, *extra: str, data: str = "mimic_cxr") -> dict:
    args = ["prepare", f"data={data}", f"data.init_args.root={root}", f"out={out}", "samples_per_shard=2",
            "progress=false", *extra]
    assert main(args) == 0
    return json.loads((out / "index.json").read_text())


def test_prepare_mimic_counts_corrupt_inputs_and_shards_train(tmp_path: Path) -> None:
    root = fx.make_mimic(tmp_path / "mimic", n=12)
    bad = sorted(root.rglob("*.jpg"))[2]
    bad.write_bytes(b"not a jpeg")
    manifest = _prepare(root, tmp_path / "out", "workers=2")
    assert manifest["dataset"] == "mimic_cxr" and manifest["spec"]["max_side"] == 224  # the training image_size
    assert manifest["corrupt_count"] == 1 and manifest["corrupt"][0]["path"] == str(bad)
    assert "cannot decode image" in manifest["corrupt"][0]["error"]
    dm = MIMICCXRDataModule(str(root))
    for split, info in manifest["splits"].items():
        ids = [str(r["id"]) for r in dm.records(split)]
        assert info["n_records"] == len(ids) and info["ids_hash"] == prep._sha1(ids)
        assert [s["n"] for s in info["shards"][:-1]] == [2] * (len(info["shards"]) - 1) or info["n_samples"] < len(ids)
        for s in info["shards"]:
            assert prep._sha256_file(tmp_path / "out" / split / s["name"]) == s["sha256"]
    assert sum(v["n_samples"] for v in manifest["splits"].values()) == sum(v["n_records"] for v in manifest["splits"].values()) - 1
    # the datamodules read it: streaming shards and the record datamodule by id
    shards = ShardDataModule(prepared=str(tmp_path / "out"), image_size=32, batch_size=2)
    batch = next(iter(shards.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32) and batch["labels"].shape == (2, 14) and len(batch["text"]) == 2
    rec = MIMICCXRDataModule(str(root), prepared=str(tmp_path / "out"), image_size=32)
    ds = rec.dataset("train", augment=False)
    kept = [ds[i] for i in range(len(ds))]
    assert sum(s is None for s in kept) == (1 if any(c["split"] == "train" for c in manifest["corrupt"]) else 0)
    args = ["pretrain", "method=clip", "data=shards", "preset=tiny", f"data.init_args.prepared={tmp_path / 'out'}",
            "data.init_args.image_size=32", "data.init_args.batch_size=2", "trainer.max_steps=2",
            "trainer.enable_progress_bar=false", f"run.dir={tmp_path / 'run'}"]
    assert main(args) == 0 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_prepare_resumes_after_a_kill_without_rewriting_verified_shards(tmp_path: Path, monkeypatch) -> None:
    root = fx.make_rsna(tmp_path / "rsna", n=8)
    out = tmp_path / "out"
    real = prep.encode_record
    calls = {"n": 0}

    def dies_at_five(*args, **kwargs):  # the process is "killed" while encoding the 5th record
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "encode_record", dies_at_five)
    with pytest.raises(KeyboardInterrupt):
        main(["prepare", "data=rsna_pneumonia", f"data.init_args.root={root}", f"out={out}", "samples_per_shard=2",
              "progress=false"])
    monkeypatch.setattr(prep, "encode_record", real)
    first = sorted(out.glob("*/*.tar"))
    assert len(first) == 2 and not (out / "index.json").exists() and not list(out.glob("*/.*.tmp"))
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first}
    manifest = _prepare(root, out, data="rsna_pneumonia")
    assert manifest["last_run"]["verified_kept"] == 2
    assert manifest["last_run"]["written"] == sum(len(v["shards"]) for v in manifest["splits"].values()) - 2
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == s for p, s in stamps.items())  # not rewritten
    # a damaged shard fails its checksum and is the only one rewritten
    victim = first[0]
    victim.write_bytes(victim.read_bytes()[:-10] + b"x" * 10)
    manifest = _prepare(root, out, data="rsna_pneumonia")
    assert manifest["last_run"]["written"] == 1
    assert prep._sha256_file(victim) == next(s["sha256"] for v in manifest["splits"].values() for s in v["shards"]
                                              if s["name"] == victim.name and victim.parent.name in manifest["splits"]
                                              and s in manifest["splits"][victim.parent.name]["shards"])
    # the record datamodule reads masks from its own index and the image from the shards
    dm = RSNAPneumoniaDataModule(str(root), image_size=32, prepared=str(out))
    rec = next(r for s in ("train", "val", "test") for r in dm.records(s) if r["id"] == "rsna-0001")
    assert dm.load(rec, augment=False)["mask"].sum() == 8 * 8 + 6 * 10


def test_prepare_refuses_to_mix_specs(tmp_path: Path) -> None:
    root = fx.make_mimic(tmp_path / "mimic", n=8)
    _prepare(root, tmp_path / "a")
    with pytest.raises(DataError, match="refusing to mix"):
        prep.prepare(MIMICCXRDataModule(str(root)), tmp_path / "a", size=128, samples_per_shard=2, progress=False)
    assert main(["prepare", "data=mimic_cxr", f"data.init_args.root={root}", f"out={tmp_path / 'a'}", "size=128",
                 "samples_per_shard=2", "progress=false"]) == 2  # CLI: a clear error, not a traceback
    _prepare(root, tmp_path / "b", "size=128")
    with pytest.raises(DataError, match="different specs"):
        ShardDataModule(train=str(tmp_path / "a" / "train"), val=str(tmp_path / "b" / "val"))
    plain = write_shards([{"image": torch.zeros(1, 8, 8), "text": "x", "meta": {"id": "p"}}], tmp_path / "plain")
    with pytest.raises(DataError, match="mix prepared and unprepared"):
        ShardDataModule(train=str(tmp_path / "a" / "train"), val=str(plain[0].parent))


def test_prepare_volumes_and_read_them_back(tmp_path: Path) -> None:
    root = fx.make_msd(tmp_path / "msd", n=6)
    kwargs = {"volume_size": [8, 16, 16], "window": [-175.0, 250.0]}
    dm = MSDDataModule(str(root), **kwargs)
    manifest = prep.prepare(dm, tmp_path / "out", samples_per_shard=2, progress=False)
    assert manifest["spec"]["kind"] == "volume" and manifest["spec"]["volume_size"] == [8, 16, 16]
    with pytest.raises(DataError, match="different spec"):
        MSDDataModule(str(root), volume_size=[8, 32, 32], window=[-175.0, 250.0], prepared=str(tmp_path / "out")).store
    pre = MSDDataModule(str(root), prepared=str(tmp_path / "out"), **kwargs)
    rec = dm.records("train")[0]
    a, b = dm.load(rec, augment=False), pre.load(rec, augment=False)
    assert a["image"].shape == b["image"].shape == (1, 8, 16, 16)
    assert torch.allclose(a["image"], b["image"], atol=4 * 2e-3) and torch.equal(a["mask"], b["mask"])  # float16
    shards = ShardDataModule(prepared=str(tmp_path / "out"), batch_size=2)
    assert shards.spatial_dims == 3 and shards.encoder_hints()["img_size_3d"] == [8, 16, 16]
    batch = next(iter(shards.eval_dataloader("train", 2)))
    assert batch["image"].shape == (2, 1, 8, 16, 16) and batch["mask"].shape == (2, 1, 8, 16, 16)


def _radiograph(h: int = 2500, w: int = 2048) -> np.ndarray:
    """A smooth chest-radiograph-like uint8 image at MIMIC-CXR-JPG size (body, lungs, ribs, fine noise)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = yy / h - 0.5, xx / w - 0.5
    body = np.exp(-((x / 0.42) ** 6 + (y / 0.55) ** 6))
    lungs = sum(np.exp(-(((x - c) / 0.16) ** 2 + ((y + 0.02) / 0.3) ** 2)) for c in (-0.18, 0.18))
    ribs = 0.08 * (np.sin(60 * (y + 0.3 * x ** 2)) > 0.6) * (lungs > 0.2)
    img = 40 + 170 * body - 110 * lungs + 255 * ribs + np.random.default_rng(0).normal(0, 3, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def _paths_agree(path: Path, size: int = 224, prepared: int = 256) -> float:
    """Mean |on-the-fly fast path − prepared path| in [0, 1] units, at ``size``."""
    fast = resize_2d(read_image_2d(path, max_side=size), size)
    stored = np.round(read_image_2d(path, max_side=prepared) * 255).astype(np.uint8)
    via_prepared = resize_2d(stored.astype(np.float32) / 255.0, size)
    assert fast.shape == via_prepared.shape == (1, size, size)
    return float((fast - via_prepared).abs().mean())


# Stated tolerance of the decode paths (README "Data"): mean absolute difference ≤ 0.01 of the [0, 1] range
TOLERANCE = 0.01


def test_fast_decode_matches_prepared_on_a_real_size_jpeg(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "cxr.jpg"
    Image.fromarray(_radiograph()).save(path, quality=95)
    with Image.open(path) as im:
        im.draft("L", (224, 275))
        assert im.size[0] < 2048  # PIL decodes at a reduced DCT scale
    assert _paths_agree(path) <= TOLERANCE


def test_fast_decode_matches_prepared_on_the_pydicom_data_radiograph() -> None:
    if importlib.util.find_spec("data_store") is None and importlib.util.find_spec("pydicom_data") is None:
        pytest.skip("pydicom-data wheel not installed")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        pytest.skip("RG1_UNCI.dcm not available offline")
    assert _paths_agree(Path(path)) <= TOLERANCE


def test_prepared_random_crop_volumes_stay_random(tmp_path: Path) -> None:
    root = fx.make_msd(tmp_path / "msd", n=6)
    kwargs = {"volume_size": [4, 8, 8], "window": [-175.0, 250.0], "resize": "random_crop"}
    dm = MSDDataModule(str(root), **kwargs)
    prep.prepare(dm, tmp_path / "out", samples_per_shard=3, progress=False)
    pre = MSDDataModule(str(root), prepared=str(tmp_path / "out"), **kwargs)
    rec = dm.records("train")[0]
    stored = pre.store.read(rec["id"])[0]["image"]
    assert stored.shape[1:] != (4, 8, 8)  # padded, not yet cropped
    assert torch.allclose(pre.load(rec, augment=False)["image"], dm.load(rec, augment=False)["image"], atol=8e-3)
    crops = {tuple(pre.load(rec, augment=True)["image"].flatten()[:50].tolist()) for _ in range(6)}
    assert len(crops) > 1  # the crop is still drawn at load
    batch = next(iter(ShardDataModule(prepared=str(tmp_path / "out"), batch_size=2).eval_dataloader("train", 2)))
    assert batch["image"].shape == (2, 1, 4, 8, 8) and batch["mask"].shape == (2, 1, 4, 8, 8)


@pytest.mark.slow  # a real `medvlp prepare` process killed with SIGKILL mid-run, then rerun (~1 min)
def test_prepare_survives_sigkill(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from PIL import Image

    root = tmp_path / "covidx"
    rng = np.random.default_rng(0)
    for split, n in (("train", 80), ("test", 2)):
        (root / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (1536, 1536), np.uint8)).save(root / split / f"{split}_{i}.jpg")
            lines.append(f"p{i} {split}_{i}.jpg {['normal', 'pneumonia', 'COVID-19'][i % 3]} src")
        (root / f"{split}_COVIDx9A.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medvlp.cli", "prepare", "data=covidx", f"data.init_args.root={root}", f"out={out}",
           "samples_per_shard=1", "progress=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(out.glob("*/*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("*/*.json"))
    assert 3 <= len(done) < 82 and not (out / "index.json").exists()  # killed mid-way
    stamps = {p.with_suffix(".tar"): p.with_suffix(".tar").stat().st_mtime_ns for p in done}
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["last_run"]["verified_kept"] >= len(done)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # verified shards not rewritten
    assert sum(v["n_samples"] for v in manifest["splits"].values()) == 82 and not list(out.glob("*/.*.tmp"))


def test_prepare_of_a_3d_csv_manifest_reads_volumes_and_an_empty_result_fails(tmp_path: Path) -> None:
    from tests.test_csv_manifest import make_3d_fixture

    manifest = make_3d_fixture(tmp_path / "csv3d", n=8)
    args = ["prepare", "data=csv", f"data.init_args.manifest={manifest}", "data.init_args.image_column=volume",
            "data.init_args.text_column=null", "data.init_args.label_columns=[Lesion]", "data.init_args.spatial_dims=3",
            "data.init_args.volume_size=[8,16,16]", "samples_per_shard=4", "progress=false"]
    assert main(args + [f"out={tmp_path / 'out'}"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["spec"]["kind"] == "volume" and index["corrupt_count"] == 0
    assert sum(v["n_samples"] for v in index["splits"].values()) == 8
    shards = ShardDataModule(prepared=str(tmp_path / "out"), batch_size=2)
    assert next(iter(shards.eval_dataloader("train", 2)))["image"].shape == (2, 1, 8, 16, 16)
    # every input unreadable: the prepare fails (non-zero exit) instead of writing empty shards
    for vol in (tmp_path / "csv3d" / "vols").glob("*.nii.gz"):
        vol.write_bytes(b"not a volume")
    assert main(args + [f"out={tmp_path / 'bad'}"]) != 0
    with pytest.raises(DataError, match="none of the 8 inputs could be read"):
        from medvlp.datamodules.io.csv_manifest import CSVDataModule

        dm = CSVDataModule(str(manifest), image_column="volume", text_column=None, label_columns=["Lesion"],
                           spatial_dims=3, volume_size=[8, 16, 16])
        prep.prepare(dm, tmp_path / "bad2", samples_per_shard=4, progress=False)


def test_prepare_of_a_2d_csv_manifest_stores_uint8_at_the_training_size(tmp_path: Path) -> None:
    from tests.test_csv_manifest import make_2d_fixture

    manifest = make_2d_fixture(tmp_path / "csv2d", n=12)
    args = ["prepare", "data=csv", f"data.init_args.manifest={manifest}", "data.init_args.image_column=path",
            "data.init_args.text_column=findings_text", "data.init_args.label_columns=[Effusion,Nodule]",
            "data.init_args.image_size=32", f"out={tmp_path / 'out'}", "samples_per_shard=4", "progress=false"]
    assert main(args) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["spec"]["kind"] == "image2d" and index["spec"]["max_side"] == 32
    first = index["splits"]["train"]["shards"][0]["name"]
    sample = next(ShardDataModule.build_dataset.__globals__["ShardStream"].read_shard(str(tmp_path / "out" / "train" / first)))
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (32, 32)
    # what the 2D datamodule feeds the model, to uint8 rounding
    from medvlp.datamodules.io.csv_manifest import CSVDataModule

    dm = CSVDataModule(str(manifest), image_column="path", text_column="findings_text",
                       label_columns=["Effusion", "Nodule"], image_size=32)
    rec = next(r for r in dm.records("train") if str(r["id"]) == sample["meta"]["id"])
    want = dm.load(rec, augment=False)["image"]
    got = prep.normalise_batch(sample["image"][None])
    assert (got - want).abs().max() <= 0.5 / 255 / 0.25 + 1e-6
    assert main(args[:-3] + [f"out={tmp_path / 'out64'}", "size=64", "progress=false"]) == 0
    assert json.loads((tmp_path / "out64" / "index.json").read_text())["spec"]["max_side"] == 64  # size= honoured


def test_shard_readers_verify_member_hashes(tmp_path: Path) -> None:
    root = fx.make_mimic(tmp_path / "mimic", n=6)
    out = tmp_path / "out"
    _prepare(root, out, "samples_per_shard=100")
    tar = out / "train" / "shard-000000.tar"
    import tarfile

    with tarfile.open(tar) as tf:
        txt = next(m for m in tf.getmembers() if m.name.endswith(".txt"))
    off, size = txt.offset_data, txt.size
    data = bytearray(tar.read_bytes())
    data[off + size // 2] ^= 0x01  # one flipped bit in a report
    tar.write_bytes(bytes(data))
    shards = ShardDataModule(prepared=str(out), image_size=32, batch_size=2)
    with pytest.raises(DataError, match=r"member .*\.txt .* sha256"):
        next(iter(shards.eval_dataloader("train", 2)))
    unverified = ShardDataModule(prepared=str(out), image_size=32, batch_size=2, verify_hashes=False)
    assert next(iter(unverified.eval_dataloader("train", 2)))["image"].shape == (2, 1, 32, 32)


def test_full_decode_resizes_in_8_bits_and_matches_the_float_reference(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "cxr.jpg"
    Image.fromarray(_radiograph(1000, 820)).save(path, quality=95)
    reference = resize_2d(read_image_2d(path), 224)  # full-resolution float, min-max, antialiased bilinear
    full = resize_2d(read_image_2d(path, max_side=224, full_decode=True), 224)
    assert full.shape == reference.shape == (1, 224, 224)
    assert float((full - reference).abs().max()) <= 2.0 / 255  # the 8-bit rounding of the resize
    assert float((full - reference).abs().mean()) <= 1.0 / 255
    assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0
