"""Self-distillation of masked tokens from an EMA teacher (UniMedI §3.3; iBOT/AttMask-style)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                                   student_temp: float = 0.1, teacher_temp: float = 0.04,
                                   center: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy between teacher and student token distributions on masked positions (iBOT eq. 2).

    Args:
        student: ``(B, N, K)`` student head logits (from the masked input).
        teacher: ``(B, N, K)`` teacher head logits (from the unmasked input); no gradient flows.
        mask: ``(B, N)`` bool, positions that were masked for the student.
        student_temp: student softmax temperature.
        teacher_temp: teacher softmax temperature (sharpening).
        center: optional ``(K,)`` running center subtracted from teacher logits (DINO).

    Returns:
        Mean over masked tokens; 0 (with a graph) when nothing is masked.
    """
    mask = mask.bool()
    if not mask.any():
        return student.sum() * 0.0
    t = teacher.detach()
    if center is not None:
        t = t - center
    t_prob = F.softmax(t[mask] / teacher_temp, dim=-1)
    s_logp = F.log_softmax(student[mask] / student_temp, dim=-1)
    return -(t_prob * s_logp).sum(-1).mean()
