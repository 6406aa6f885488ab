"""``trainer.sync_batchnorm`` (GTGM's paper config; official ``nn.SyncBatchNorm.convert_sync_batchnorm``).

What CPU can show: torch 2.13's ``SyncBatchNorm`` cannot synchronise CPU tensors. Its forward raises
``ValueError`` for CPU input inside a process group, CPU has no ``aten::batch_norm_stats`` kernel (the first test
pins both facts), and ``DistributedDataParallel`` refuses CPU modules holding SyncBatchNorm layers. So "BN running
statistics identical on both ranks and equal to the global batch's" can only be measured on CUDA devices, which
this suite does not have. Tested here: the paper config reaches the Trainer's DDP strategy, Lightning's layer sync
converts exactly GTGM's BatchNorm layers (statistics and affine parameters kept), and a real 2-process Lightning DDP
run on CPU/gloo converts them on both ranks, where torch's DDP then stops it before any step.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def test_torch_sync_batchnorm_cannot_run_on_cpu_under_gloo(tmp_path) -> None:
    """The limitation the rest of this file works around. If torch gains CPU SyncBN this test fails, and the
    statistics check (ranks equal, equal to the global batch's) becomes possible on CPU. One gloo process is
    enough: the device check comes before the world-size check in ``SyncBatchNorm.forward``."""
    x = torch.randn(4, 3)
    with pytest.raises(NotImplementedError, match="aten::batch_norm_stats.*CPU"):
        torch.batch_norm_stats(x, 1e-5)  # the first kernel of torch's sync_batch_norm function
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            torch.nn.SyncBatchNorm(3)(x)
    finally:
        dist.destroy_process_group()


def _gtgm() -> Any:
    from medvlp.compose import compose
    from medvlp.config import to_container
    from medvlp.train import build_datamodule_from_config, build_method

    cfg = to_container(compose(["method=gtgm", "preset=tiny"]))
    return build_method(cfg, build_datamodule_from_config(cfg))


def _batch_norms(model: torch.nn.Module) -> dict[str, Any]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def test_paper_config_reaches_the_ddp_strategy() -> None:
    from medvlp.compose import compose

    assert compose(["method=gtgm", "preset=paper"]).trainer.sync_batchnorm is True  # methods/gtgm.paper.yaml
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=True, logger=False,
                        enable_checkpointing=False)
    assert type(trainer.strategy._layer_sync).__name__ == "TorchSyncBatchNorm"  # applied in strategy.setup


def test_lightning_layer_sync_converts_exactly_gtgm_batch_norms() -> None:
    """The conversion Lightning's DDP strategy applies (``TorchSyncBatchNorm``), on tiny GTGM after a training
    forward so the running statistics are not the initial ones."""
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    model = _gtgm()
    plain = _batch_norms(model)
    assert sorted(plain) == ["image_proj.net.1", "image_proj.net.4", "text_proj.net.1", "text_proj.net.4"]
    model.image_proj.train()(torch.randn(6, model.image_proj.net[0].in_features))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(tuple(plain))}
    assert before["image_proj.net.1.running_mean"].abs().sum() > 0
    converted = TorchSyncBatchNorm().apply(model)
    synced = _batch_norms(converted)
    assert sorted(synced) == sorted(plain) and all(type(m) is torch.nn.SyncBatchNorm for m in synced.values())
    after = converted.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # statistics and affine parameters carried
    assert synced["image_proj.net.4"].affine is False  # GTGM's final affine-free BN stays affine-free


@pytest.mark.slow
def test_lightning_ddp_converts_on_both_ranks_and_torch_ddp_refuses_cpu(tmp_path) -> None:
    """``medvlp pretrain method=gtgm trainer.sync_batchnorm=true`` under Lightning DDP on 2 CPU gloo processes:
    each rank's model reaches torch's ``DistributedDataParallel`` with SyncBatchNorm layers (its CPU check names
    them), and no training step or checkpoint happens; the same run without SyncBN trains (``test_distributed``)."""
    args = [sys.executable, "-m", "medvlp.cli", "pretrain", "method=gtgm", "preset=tiny", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.strategy=ddp", "trainer.sync_batchnorm=true", "trainer.max_steps=1",
            "trainer.enable_progress_bar=false", f"run.dir={tmp_path / 'run'}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr  # two real processes
    # rank 0 and rank 1 (whose stderr the launcher shares) both fail in DDP's SyncBatchNorm check
    assert proc.stderr.count("SyncBatchNorm layers only work with GPU modules") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
