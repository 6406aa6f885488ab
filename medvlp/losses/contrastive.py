"""Image–text contrastive losses.

* :func:`clip_loss` – symmetric InfoNCE (ConVIRT eq. 2–3 with λ=0.5; CLIP).
* :func:`soft_target_contrastive_loss` – cross-entropy against soft targets (UniCL/UMCL).
* :func:`symmetric_kl_contrastive_loss` – ASG's soft-label term: forward and backward KL between
  the soft target distribution and the softmax of the logits, for i2t and t2i.
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


def symmetric_kl_contrastive_loss(image: torch.Tensor, text: torch.Tensor, soft_targets: torch.Tensor,
                                  temperature: float | torch.Tensor = 0.07) -> torch.Tensor:
    """ASG's soft-label contrastive term (official ``main.py``).

    ``p = softmax(logits)``; loss = ``KL(target‖p) + KL(p‖target)`` averaged over rows, for both i2t and
    t2i logits, summed and halved.

    Args:
        soft_targets: ``(B, B)`` row-stochastic targets (e.g. ``L1norm(0.8·I + 0.2·soft)``).
    """
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t() / temperature
    eps = 1e-8
    target = soft_targets.clamp_min(eps)

    def sym_kl(lg: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(lg, dim=1)
        p = log_p.exp()
        forward = (tgt * (tgt.log() - log_p)).sum(1)
        backward = (p * (log_p - tgt.log())).sum(1)
        return (forward + backward).mean()

    return 0.5 * (sym_kl(logits, target) + sym_kl(logits.t(), target.t() / target.t().sum(1, keepdim=True)))
