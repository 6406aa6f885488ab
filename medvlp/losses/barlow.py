"""Barlow Twins redundancy-reduction losses (Zbontar et al. 2021, eq. 1), GTGM's negative-free term.

* :func:`barlow_twins_loss` – the paper's form: batch-standardised features, ``C = z1ᵀz2 / B``.
* :func:`gtgm_barlow_loss` – the GTGM official code's form (``ydchen0806/GTGM``,
  ``pretrain/utils/utils_trainer.py::covar_loss``): raw (not standardised) features, ``C = f1ᵀf2 / B``
  with ``B`` the per-GPU batch (2 in ``config/pretraining_all.yaml``), loss ``(on + λ·off) / 2``.
  Standardising over a batch of 2 makes every entry ±1 (loss ≈ D + λD(D−1)), so only the raw form is
  meaningful at the official batch size.
"""
from __future__ import annotations

import torch


def _check(z1: torch.Tensor, z2: torch.Tensor) -> None:
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"barlow twins needs two (B, D) tensors of one shape, got {tuple(z1.shape)} {tuple(z2.shape)}")


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Batch cross-correlation matrix ``C = z1ᵀ z2 / B`` of batch-standardised ``(B, D)`` features."""
    _check(z1, z2)
    if z1.shape[0] < 2:
        raise ValueError("barlow twins needs a batch of at least 2 samples (batch statistics)")
    z1 = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + eps)
    z2 = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + eps)
    return z1.t() @ z2 / z1.shape[0]


def _on_off(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    diag = torch.diagonal(c)
    return (diag - 1).pow(2).sum(), (c - torch.diag(diag)).pow(2).sum()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """``Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²`` on batch-standardised features (the paper's eq. 1)."""
    on_diag, off_diag = _on_off(cross_correlation(z1.float(), z2.float()))
    return on_diag + lambd * off_diag


def gtgm_barlow_loss(f1: torch.Tensor, f2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """GTGM's official covariance term: ``C = f1ᵀ f2 / B`` on raw features, ``(Σ(C_ii−1)² + λΣ_{i≠j}C_ij²) / 2``.

    Args:
        f1: ``(B, D)`` raw backbone features of view 1 (no standardisation, no normalisation).
        f2: ``(B, D)`` raw backbone features of view 2.
        lambd: off-diagonal weight (0.0051 in the official code).
    """
    _check(f1, f2)
    f1, f2 = f1.float(), f2.float()
    on_diag, off_diag = _on_off(f1.t() @ f2 / f1.shape[0])
    return (on_diag + lambd * off_diag) / 2
