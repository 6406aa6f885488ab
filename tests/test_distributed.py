"""Distributed training on 2 CPU gloo processes: global negatives (function level and through a real
Lightning ``strategy="ddp"`` Trainer), every registered method under Lightning DDP."""
from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medvlp.losses import clip_loss

GLOBAL_B, DIM_IN, DIM = 8, 12, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, torch.nn.Module]:
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(GLOBAL_B, DIM_IN, generator=g), torch.randn(GLOBAL_B, DIM_IN, generator=g)
    torch.manual_seed(1)
    return x_img, x_txt, torch.nn.Linear(DIM_IN, DIM), torch.nn.Linear(DIM_IN, DIM)


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x_img, x_txt, f_img, f_txt = _data()
    local = slice(rank * GLOBAL_B // world, (rank + 1) * GLOBAL_B // world)
    loss = clip_loss(f_img(x_img[local]), f_txt(x_txt[local]), 0.1, gather=True)
    loss.backward()
    for p in list(f_img.parameters()) + list(f_txt.parameters()):  # what DDP does: average gradients
        dist.all_reduce(p.grad)
        p.grad /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    out[rank] = {"loss": float(mean_loss / world), "grad_img": f_img.weight.grad.clone(),
                 "grad_txt": f_txt.weight.grad.clone()}
    dist.destroy_process_group()


def test_gathered_loss_and_gradients_match_single_process() -> None:
    x_img, x_txt, f_img, f_txt = _data()
    ref = clip_loss(f_img(x_img), f_txt(x_txt), 0.1)
    ref.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        assert abs(results[rank]["loss"] - float(ref)) < 1e-5
        assert torch.allclose(results[rank]["grad_img"], f_img.weight.grad, atol=1e-5)
        assert torch.allclose(results[rank]["grad_txt"], f_txt.weight.grad, atol=1e-5)


def test_per_device_negatives_differ_from_global() -> None:
    """Sanity: without gathering, a half batch's loss is not the global loss (so the test above is meaningful)."""
    x_img, x_txt, f_img, f_txt = _data()
    full = clip_loss(f_img(x_img), f_txt(x_txt), 0.1)
    halves = [clip_loss(f_img(x_img[s]), f_txt(x_txt[s]), 0.1) for s in (slice(0, 4), slice(4, 8))]
    assert abs(float(sum(halves) / 2) - float(full)) > 1e-3


# ---------------------------------------------------------------------------------------------- Lightning DDP
ROOT = Path(__file__).resolve().parents[1]
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _install_plugin(site: Path) -> Path:
    """Make ``tests/plugin_pkg`` importable and discoverable from ``site`` the way an installed wheel is:
    the package plus a ``.dist-info`` whose ``entry_points.txt`` comes from the plugin's ``setup.cfg``."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "tests" / "plugin_pkg" / "setup.cfg")
    name, version = cfg["metadata"]["name"], cfg["metadata"]["version"]
    shutil.copytree(ROOT / "tests" / "plugin_pkg" / "medvlp_toy_plugin", site / "medvlp_toy_plugin")
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    points = cfg["options.entry_points"]["medvlp.methods"].strip()
    (info / "entry_points.txt").write_text(f"[medvlp.methods]\n{points}\n")
    return site


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every registered method (the installed test plugin included) trained by ``tests/ddp_run.py`` with
    ``lightning.Trainer(accelerator="cpu", devices=2, strategy="ddp")``, plus the CLIP gather run."""
    site = _install_plugin(tmp_path_factory.mktemp("ddp_plugin_site"))
    out = tmp_path_factory.mktemp("ddp_runs")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.ddp_run", str(out), "all", "clip_gather"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_every_registered_method_trains_under_lightning_ddp(ddp_runs: Path) -> None:
    from medvlp.registry import METHODS

    methods = json.loads((ddp_runs / "methods.json").read_text())
    assert set(METHODS.names()) <= set(methods) and "toy_infonce" in methods  # built-ins and the plugin
    for method in (m for m in methods if m != "clip_gather"):
        ranks = [torch.load(ddp_runs / method / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2, method
        s0, s1 = ranks[0]["state"], ranks[1]["state"]
        assert s0.keys() == s1.keys()
        # parameters, EMA teachers and buffers; BatchNorm running statistics are per rank under DDP (it
        # broadcasts rank 0's before every forward, and rank 0 writes the checkpoint; no SyncBN on CPU)
        differ = [k for k in s0 if not k.endswith(BN_STATS) and not torch.equal(s0[k], s1[k])]
        assert not differ, f"{method}: ranks differ in {differ[:5]}"
        assert json.loads((ddp_runs / method / "reload.json").read_text()) == {"mismatch": []}, method
    teacher = [k for k in torch.load(ddp_runs / "unimedi" / "rank0.pt", weights_only=True)["state"]
               if k.startswith("teacher_encoder.")]
    assert teacher  # the EMA teacher is part of the compared state


def test_lightning_ddp_gather_negatives_equals_single_process_on_global_batch(ddp_runs: Path) -> None:
    """CLIP with ``gather_negatives=true``: the mean of the two ranks' losses and the DDP-averaged gradients
    equal one process's loss and gradients on the concatenated (global) batch."""
    from tests.ddp_run import config

    from medvlp.train import build_datamodule_from_config, build_method

    ranks = [torch.load(ddp_runs / "clip_gather" / f"rank{r}.pt", weights_only=True)["step0"] for r in (0, 1)]
    cfg = config("clip_gather")
    model = build_method(cfg, build_datamodule_from_config(cfg))
    model.load_state_dict(ranks[0]["state"])
    model.train()
    model.text_encoder.model.eval()
    batch = {"image": torch.cat([r["image"] for r in ranks]), "text": ranks[0]["text"] + ranks[1]["text"]}
    loss = model.compute_losses(batch)["clip_loss"]
    loss.backward()
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - float(loss)) < 1e-5
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ranks[0]["grads"].keys()
    for rank in ranks:
        for name, g in grads.items():
            # fp32 sums in another order (2 processes of 1 thread vs this process's threads): a missing
            # gather changes gradients by ~1e-2, reduction order by ~1e-7
            assert torch.allclose(rank["grads"][name], g, atol=1e-5, rtol=1e-3), name


def test_encoders_have_no_parameter_outside_the_loss_and_load_older_checkpoints() -> None:
    """No hub pooler and no mask token unless a method masks; checkpoints that still carry them load."""
    from medvlp.encoders import TextEncoder, ViTEncoder

    text = TextEncoder("builtin:minilm", max_length=16)
    assert not any(".pooler." in k for k in text.state_dict())
    old = dict(text.state_dict(), **{"model.pooler.dense.weight": torch.zeros(384, 384),
                                     "model.pooler.dense.bias": torch.zeros(384)})
    assert text.load_state_dict(old, strict=True).unexpected_keys == []
    vit = ViTEncoder(embed_dim=16, depth=1, num_heads=2, img_size_2d=16, patch_size_2d=8)
    assert "mask_token" not in vit.state_dict()
    vit.load_state_dict(dict(vit.state_dict(), mask_token=torch.zeros(1, 1, 16)), strict=True)
    with pytest.raises(ValueError, match="mask token"):
        vit(torch.zeros(1, 1, 16, 16), torch.ones(1, 4, dtype=torch.bool))
    vit.enable_mask_token()
    assert vit(torch.zeros(1, 1, 16, 16), torch.ones(1, 4, dtype=torch.bool))["pooled"].shape == (1, 16)


def _soft_worker(rank: int, world: int, port: int, out: dict) -> None:
    from medvlp.losses import gather_global, soft_target_contrastive_loss
    from medvlp.methods.asg import asg_losses
    from medvlp.methods.umcl import label_set_targets

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x_img, x_txt, f_img, f_txt = _data()
    tags, labels = _soft_inputs()
    local = slice(rank * GLOBAL_B // world, (rank + 1) * GLOBAL_B // world)
    img, txt = f_img(x_img[local]), f_txt(x_txt[local])
    erl = asg_losses(img, txt, tags[local], torch.zeros(GLOBAL_B // world, tags.shape[1]), 0.1, gather=True)["erl_loss"]
    img_g, txt_g = gather_global(img, txt)  # the UMCL call site
    itl = soft_target_contrastive_loss(img_g, txt_g, label_set_targets(gather_global(labels[local], grad=False)[0]), 0.1)
    (erl + itl).backward()
    for p in list(f_img.parameters()) + list(f_txt.parameters()):  # DDP's gradient averaging
        dist.all_reduce(p.grad)
        p.grad /= world
    out[rank] = {"erl": float(erl), "itl": float(itl), "grad_img": f_img.weight.grad.clone(),
                 "grad_txt": f_txt.weight.grad.clone()}
    dist.destroy_process_group()


def _soft_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tags = (torch.rand(GLOBAL_B, 5, generator=g) > 0.5).float()
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [float("nan"), 1.0]] * (GLOBAL_B // 4))
    return tags, labels


def test_soft_target_terms_use_global_negatives_and_targets_built_on_the_gathered_batch() -> None:
    """ASG's ERL and UMCL's label-set ITL with ``gather_negatives``: loss and DDP-averaged gradients equal one
    process on the global batch (targets from every rank's tags/labels; positives across ranks count)."""
    from medvlp.losses import soft_target_contrastive_loss
    from medvlp.methods.asg import asg_losses
    from medvlp.methods.umcl import label_set_targets

    x_img, x_txt, f_img, f_txt = _data()
    tags, labels = _soft_inputs()
    img, txt = f_img(x_img), f_txt(x_txt)
    erl = asg_losses(img, txt, tags, torch.zeros(GLOBAL_B, tags.shape[1]), 0.1)["erl_loss"]
    itl = soft_target_contrastive_loss(img, txt, label_set_targets(labels), 0.1)
    (erl + itl).backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_soft_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        assert abs(results[rank]["erl"] - float(erl)) < 1e-5 and abs(results[rank]["itl"] - float(itl)) < 1e-5
        assert torch.allclose(results[rank]["grad_img"], f_img.weight.grad, atol=1e-5)
        assert torch.allclose(results[rank]["grad_txt"], f_txt.weight.grad, atol=1e-5)
