"""ConVIRT / CLIP baseline: symmetric image–report InfoNCE."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from medvlp.losses import clip_loss, contrastive_logits
from medvlp.method import VLPMethod
from medvlp.registry import register_method


@register_method("clip")
class CLIP(VLPMethod):
    """ConVIRT (Zhang et al. 2020, arXiv 2010.00747) / CLIP (Radford et al. 2021) baseline.

    Objective (ConVIRT eq. 2–4): for normalised projections ``v_i`` (image) and ``u_i`` (report),

    ``ℓ_i^(v→u) = −log exp(⟨v_i,u_i⟩/τ) / Σ_k exp(⟨v_i,u_k⟩/τ)`` and symmetrically ``ℓ_i^(u→v)``;
    ``L = mean_i [λ ℓ_i^(v→u) + (1−λ) ℓ_i^(u→v)]``.

    ``λ = 0.5`` gives CLIP's symmetric loss; ConVIRT used ``λ = 0.75``, ``τ = 0.1``. The temperature is
    fixed (ConVIRT) or learned (``learn_temperature=True``, CLIP).

    Loss keys: ``clip_loss``. Logged: ``i2t_acc`` (in-batch top-1). Required batch keys: image, text.

    Deviations: projection heads default to MGCA's 2-layer BN head (ConVIRT: Linear-ReLU-Linear);
    choose ``proj_norm: none`` for ConVIRT's. Negatives are per device unless ``gather_negatives``.

    Args:
        i2t_weight: λ above.
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "clip"
    required_keys: ClassVar[frozenset[str]] = frozenset({"image", "text"})

    def __init__(self, i2t_weight: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= i2t_weight <= 1.0:
            raise ValueError(f"i2t_weight must be in [0, 1], got {i2t_weight}")
        self.i2t_weight = i2t_weight

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        img = self.encode_image(batch["image"], normalize=False)
        txt = self.encode_text(batch["text"], normalize=False)
        if self.i2t_weight == 0.5:
            loss = clip_loss(img, txt, self.temperature, self.gather_negatives)
            logits, _, target = contrastive_logits(img.detach(), txt.detach(), self.temperature)
        else:
            logits, logits_t2i, target = contrastive_logits(img, txt, self.temperature, self.gather_negatives)
            ce = torch.nn.functional.cross_entropy
            loss = self.i2t_weight * ce(logits, target) + (1 - self.i2t_weight) * ce(logits_t2i, target)
        acc = (logits.argmax(1) == target).float().mean()
        return {"clip_loss": loss, "i2t_acc": acc}
