"""Projection heads built from (in, out, norm, activation) blocks, lightly-style."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["bn", "ln", "none"]


def _norm(kind: Norm, dim: int, affine: bool = True) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(dim, affine=affine)
    if kind == "ln":
        return nn.LayerNorm(dim, elementwise_affine=affine)
    return nn.Identity()


class ProjectionHead(nn.Module):
    """MLP projection ``in → hidden → ... → out``.

    With ``num_layers=2`` and ``norm="bn"`` this is MGCA/ASG's ``GlobalEmbedding``
    (Linear-BN-ReLU-Linear-BN(affine=False)). Inputs may have extra leading dims (tokens); they are
    flattened for the norm and restored.

    Args:
        in_dim: input width.
        out_dim: output width.
        hidden_dim: hidden width (defaults to ``in_dim``).
        num_layers: number of Linear layers (1 = a single linear map).
        norm: normalisation after each Linear; the last one has no affine parameters.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, num_layers: int = 2,
                 norm: Norm = "bn") -> None:
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == num_layers - 1
            layers.append(nn.Linear(a, b, bias=norm == "none" or not last))
            if num_layers > 1:
                layers.append(_norm(norm, b, affine=not last))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``(..., in_dim)`` to ``(..., out_dim)``."""
        lead = x.shape[:-1]
        return self.net(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_dim)
