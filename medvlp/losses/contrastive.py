"""Image–text contrastive losses.

* :func:`clip_loss` – symmetric InfoNCE (ConVIRT eq. 2–3 with λ=0.5; CLIP).
* :func:`soft_target_contrastive_loss` – cross-entropy against soft targets (UniCL/UMCL).
* :func:`asg_soft_targets` / :func:`symmetric_kl_contrastive_loss` – ASG's soft-label term: forward and
  backward KL between the soft target distribution and the softmax of the logits, for i2t and t2i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medvlp.losses.distributed import gather_with_grad, is_distributed, rank_offset


def contrastive_logits(image: torch.Tensor, text: torch.Tensor, temperature: float | torch.Tensor,
                       gather: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine-similarity logits between L2-normalised image and text embeddings.

    Args:
        image: ``(B, D)`` image embeddings (normalised here).
        text: ``(B, D)`` text embeddings (normalised here).
        temperature: softmax temperature τ (logits are ``cos / τ``).
        gather: use every rank's samples as negatives (with gradients); per-device otherwise.

    Returns:
        ``(logits_i2t (B, B_global), logits_t2i (B, B_global), positive_index (B,))``.
    """
    image = F.normalize(image, dim=-1)
    text = F.normalize(text, dim=-1)
    b = image.shape[0]
    if gather and is_distributed():
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)
        offset = rank_offset(b)
    else:
        all_image, all_text, offset = image, text, 0
    logits_i2t = image @ all_text.t() / temperature
    logits_t2i = text @ all_image.t() / temperature
    target = torch.arange(b, device=image.device) + offset
    return logits_i2t, logits_t2i, target


def clip_loss(image: torch.Tensor, text: torch.Tensor, temperature: float | torch.Tensor = 0.07,
              gather: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE: ``(CE(i2t) + CE(t2i)) / 2`` with the matching pair as the positive."""
    logits_i2t, logits_t2i, target = contrastive_logits(image, text, temperature, gather)
    return 0.5 * (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target))


def soft_target_contrastive_loss(image: torch.Tensor, text: torch.Tensor, targets: torch.Tensor,
                                 temperature: float | torch.Tensor = 0.07) -> torch.Tensor:
    """Symmetric cross-entropy against soft targets (UniCL eq. 3–4).

    Args:
        image: ``(B, D)``.
        text: ``(B, D)``; row ``j`` is the text paired with image ``j``.
        targets: ``(B, B)`` non-negative; ``targets[i, j] > 0`` marks text ``j`` as a positive of image
            ``i``. Rows (i2t) and columns (t2i) are normalised to distributions here.
        temperature: τ.
    """
    if targets.shape != (image.shape[0], text.shape[0]):
        raise ValueError(f"targets shape {tuple(targets.shape)} != ({image.shape[0]}, {text.shape[0]})")
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t() / temperature
    t_i2t = targets / targets.sum(1, keepdim=True).clamp_min(1e-12)
    t_t2i = targets.t() / targets.t().sum(1, keepdim=True).clamp_min(1e-12)
    loss_i2t = -(t_i2t * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t2i = -(t_t2i * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def asg_soft_targets(tags: torch.Tensor, soft_weight: float = 0.2, eps: float = 1e-6) -> torch.Tensor:
    """ASG's ERL target (official ``main.py``): ``L1norm((1 − w)·I + w·S + eps)`` row-wise.

    ``S_ij = cos(tag_i, tag_j)`` with ``F.normalize`` semantics: a sample without positive tags has a zero
    tag vector, hence a zero row/column in ``S`` (it is no soft positive of anything), and its target row
    is ``(1 − w)·e_i + eps`` renormalised.

    Args:
        tags: ``(B, T)`` tag vectors (ASG: 1 positive, 0 otherwise; uncertain already mapped to 0).
        soft_weight: ``w`` (official 0.2).
        eps: the official ``+ 1e-6`` that keeps every entry positive (finite ``log``).
    """
    unit = F.normalize(tags.float(), dim=-1)
    soft = unit @ unit.t()
    hard = torch.eye(len(tags), device=tags.device, dtype=soft.dtype)
    return F.normalize((1 - soft_weight) * hard + soft_weight * soft + eps, p=1, dim=-1)


def symmetric_kl_contrastive_loss(image: torch.Tensor, text: torch.Tensor, soft_targets: torch.Tensor,
                                  temperature: float | torch.Tensor = 0.07) -> torch.Tensor:
    """ASG's soft-label contrastive term ``loss_soft`` (official ``main.py``).

    With ``p = softmax(logits)`` and ``batchmean`` KL divergences::

        loss_i2t = (KL(target ‖ p_i2t) + KL(p_i2t ‖ target)) / 2
        loss_t2i = (KL(target ‖ p_t2i) + KL(p_t2i ‖ target)) / 2
        loss     = (loss_i2t + loss_t2i) / 2

    i.e. the four KL terms divided by 4. The t2i direction uses the same row-normalised target as
    i2t (the official code does not transpose it).

    Args:
        image: ``(B, D)``; text: ``(B, D)`` (normalised here).
        soft_targets: ``(B, B)`` row-stochastic, strictly positive targets (:func:`asg_soft_targets`).
        temperature: τ.
    """
    if soft_targets.shape != (image.shape[0], text.shape[0]):
        raise ValueError(f"soft_targets shape {tuple(soft_targets.shape)} != ({image.shape[0]}, {text.shape[0]})")
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t() / temperature
    log_t = soft_targets.clamp_min(1e-12).log()

    def sym_kl(lg: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(lg, dim=1)
        forward = (soft_targets * (log_t - log_p)).sum(1).mean()
        backward = (log_p.exp() * (log_p - log_t)).sum(1).mean()
        return (forward + backward) / 2

    return (sym_kl(logits) + sym_kl(logits.t())) / 2
