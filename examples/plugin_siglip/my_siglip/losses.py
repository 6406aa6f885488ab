"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``-1/|B| Σ_i Σ_j log σ(z_ij (t <x_i, y_j> + b))`` with ``z_ij = 1`` for matching pairs, else -1.

    Args:
        img: L2-normalised image embeddings ``(B, D)``.
        txt: L2-normalised text embeddings ``(B, D)``.
        log_scale: ``log t`` (learned).
        bias: ``b`` (learned).
    """
    logits = log_scale.exp() * img @ txt.t() + bias
    signs = 2 * torch.eye(len(img), device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(img)
