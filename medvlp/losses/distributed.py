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


def gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 without gradients (labels, tags: the inputs of target
    matrices built on the gathered batch). Identity outside distributed runs.

    Every rank must pass the same shape (equal per-rank batches; see the datamodules' skip policy).
    """
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, 0)


def gather_global(*tensors: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, ...]:
    """The global batch of several tensors (embeddings with gradients, or targets' inputs with
    ``grad=False``).

    A loss computed on the full gathered batch on every rank (the same value everywhere) has, after
    :func:`gather_with_grad`'s all-reduce and DDP's gradient averaging, exactly the single-process gradient
    on the global batch; this is how the soft-target terms (ASG ERL, UMCL ITL) use global negatives.
    """
    fn = gather_with_grad if grad else gather_tensor
    return tuple(fn(t) for t in tensors)


def rank_offset(local_batch: int) -> int:
    """Index of this rank's first sample in the gathered batch."""
    return dist.get_rank() * local_batch if is_distributed() else 0
