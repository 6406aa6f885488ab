"""FSDP on 2 CPU gloo processes with raw ``torch.distributed.fsdp`` (Lightning refuses FSDP on CPU): the EMA
update of sharded student/teacher pairs, wrapping and activation checkpointing by block class, and the
YAML strategy builder."""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from medvlp.encoders.vit import Block, ViTEncoder
from medvlp.method import ema_update
from medvlp.scale import block_classes, build_strategy


class _Pair(nn.Module):
    """A student (ViT + head) and its EMA teacher, as UniMedI holds them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.online = ViTEncoder(embed_dim=16, depth=2, num_heads=2, img_size_2d=16, patch_size_2d=8)
        self.head = nn.Linear(16, 3)
        self.teacher = copy.deepcopy(self.online).requires_grad_(False)
        with torch.no_grad():  # the student has moved away from the teacher
            for p in self.online.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.online(x)["pooled"]).pow(2).mean()


def _forward_loss(model: nn.Module) -> torch.Tensor:
    x = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)
    return model(x)


def _worker(rank: int, port: int, out: dict) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    blocks = block_classes(["vit_block"], "auto_wrap_policy")
    model = FSDP(_Pair(), auto_wrap_policy=ModuleWrapPolicy(blocks), use_orig_params=True,
                 device_id=torch.device("cpu"))
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))  # what Lightning's policy does
    sharded = [tuple(p.shape) for p in model.teacher.parameters()] != [tuple(p.shape) for p in model.online.parameters()]
    with pytest.raises(ValueError, match="EMA pair does not match"):
        ema_update(model.online, model.teacher, 0.9)  # sharded views without the root: a clear error
    ema_update(model.online, model.teacher, 0.9, root=model)
    loss = _forward_loss(model)
    loss.backward()
    with FSDP.summon_full_params(model, with_grads=True):
        out[rank] = {"teacher": [p.detach().clone() for p in model.teacher.parameters()],
                     "grads": [p.grad.clone() for p in model.online.parameters()],
                     "sharded": sharded, "checkpointed": any(isinstance(m, CheckpointWrapper) for m in model.modules()),
                     "loss": float(loss)}
    dist.destroy_process_group()


def test_fsdp_ema_wrapping_and_activation_checkpointing_on_two_gloo_processes() -> None:
    ref = _Pair()
    ema_update(ref.online, ref.teacher, 0.9)
    loss = _forward_loss(ref)
    loss.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        r = results[rank]
        assert r["sharded"] and r["checkpointed"]
        for got, want in zip(r["teacher"], ref.teacher.parameters()):
            assert torch.allclose(got, want, atol=1e-6)
        assert abs(r["loss"] - float(loss)) < 1e-5  # same batch on both ranks: averaged grads = one process
        for got, p in zip(r["grads"], ref.online.parameters()):
            assert torch.allclose(got, p.grad, atol=1e-5)


def test_strategy_from_yaml_resolves_block_classes_and_refuses_other_code() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    from medvlp.registry import ClassPathError

    s = build_strategy({"name": "fsdp", "auto_wrap_policy": ["vit_block", "bert_layer"],
                        "activation_checkpointing_policy": ["vit_block", "bert_layer"]})
    assert isinstance(s, FSDPStrategy)
    assert build_strategy("ddp") == "ddp"
    with pytest.raises(ClassPathError):
        build_strategy({"name": "fsdp", "auto_wrap_policy": ["os.system"]})
    with pytest.raises(ValueError, match="auto_wrap_policy must be a list"):
        build_strategy({"name": "fsdp", "auto_wrap_policy": "vit_block"})
    with pytest.raises(ValueError, match="name must be fsdp or ddp"):
        build_strategy({"name": "deepspeed"})
