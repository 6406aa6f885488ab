"""All-gather with gradients (open_clip ``gather_features`` with ``local_loss=False``)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients for the local slice.

    The backward all-reduces the gradient of the concatenation, so every rank's loss (each computed on
    the full global batch) contributes to every rank's local features; with DDP's gradient averaging this
    equals the single-process gradient of the mean loss. Identity outside distributed runs.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def rank_offset(local_batch: int) -> int:
    """Index of this rank's first sample in the gathered batch."""
    return dist.get_rank() * local_batch if is_distributed() else 0
