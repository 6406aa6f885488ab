"""Projection heads rebuilt from a checkpoint's shapes, keeping the source's module indices."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from medvlp.pretrained.surgery import layout_error


def bn_mlp_head(sd: Mapping[str, torch.Tensor], source: str) -> nn.Sequential:
    """MGCA/GLoRIA-style ``GlobalEmbedding``: ``Linear → BN → ReLU → Linear → BN(affine=False)`` as
    ``head.{0,1,2,3,4}`` (both Linears with bias; ``mgca/models/backbones/encoder.py``)."""
    need = ("0.weight", "0.bias", "1.weight", "3.weight", "3.bias", "4.running_mean")
    if any(k not in sd for k in need):
        raise layout_error(source, "not a Linear-BN-ReLU-Linear-BN head", need, sd)
    hidden, in_dim = sd["0.weight"].shape
    out_dim = sd["3.weight"].shape[0]
    head = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim), nn.BatchNorm1d(out_dim, affine=False))
    return head


def linear_head(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A Linear layer holding ``weight`` (and ``bias``)."""
    out_dim, in_dim = weight.shape
    lin = nn.Linear(in_dim, out_dim, bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin
