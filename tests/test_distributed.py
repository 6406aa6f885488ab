"""Global negatives under DDP: with 2 gloo processes on CPU, the gathered contrastive loss and the
(DDP-averaged) gradients equal the single-process loss and gradients on the same global batch."""
from __future__ import annotations

import socket

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
