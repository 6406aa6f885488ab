"""Barlow Twins redundancy-reduction loss (Zbontar et al. 2021, eq. 1), GTGM's negative-free term."""
from __future__ import annotations

import torch


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Batch cross-correlation matrix ``C = z1ᵀ z2 / B`` of batch-standardised ``(B, D)`` features."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"barlow twins needs two (B, D) tensors of one shape, got {tuple(z1.shape)} {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("barlow twins needs a batch of at least 2 samples (batch statistics)")
    z1 = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + eps)
    z2 = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + eps)
    return z1.t() @ z2 / z1.shape[0]


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """``Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²``: zero when the two views' features are perfectly correlated
    per dimension and decorrelated across dimensions."""
    c = cross_correlation(z1.float(), z2.float())
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on_diag + lambd * off_diag
