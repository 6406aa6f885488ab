"""GTGM: generative text-guided 3D vision-language pretraining (Chen et al., arXiv 2306.04811)."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

from medvlp.losses import barlow_twins_loss, clip_loss
from medvlp.losses.barlow import gtgm_barlow_loss
from medvlp.method import VLPMethod
from medvlp.registry import register_method


def random_view(x: torch.Tensor, generator: torch.Generator | None = None, crop: float = 0.85,
                intensity: float = 0.1, noise: float = 0.05) -> torch.Tensor:
    """One random augmented view of a batch of 2D/3D images (applied per sample, on device).

    Random spatial crop of ``crop``–1.0 of each side resized back, random flips of the in-plane axes,
    random intensity scale/shift (±``intensity``) and Gaussian noise (σ ``noise``).
    """
    b = x.shape[0]
    spatial = x.shape[2:]
    sd = len(spatial)
    mode = "bilinear" if sd == 2 else "trilinear"
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    views = []
    for i in range(b):
        v = x[i:i + 1]
        frac = crop + (1 - crop) * float(rand(1))
        size = [max(1, int(round(s * frac))) for s in spatial]
        start = [int(float(rand(1)) * (s - c + 1)) for s, c in zip(spatial, size)]
        sl = tuple(slice(st, st + c) for st, c in zip(start, size))
        v = F.interpolate(v[(slice(None), slice(None)) + sl], size=spatial, mode=mode, align_corners=False)
        for axis in range(2 + sd - 2, 2 + sd):  # in-plane axes only (H, W)
            if float(rand(1)) < 0.5:
                v = v.flip(axis)
        v = v * (1 + intensity * (2 * float(rand(1)) - 1)) + intensity * (2 * float(rand(1)) - 1)
        views.append(v)
    out = torch.cat(views)
    return out + noise * torch.randn(out.shape, generator=generator).to(dev)


@register_method("gtgm")
class GTGM(VLPMethod):
    """GTGM (arXiv 2306.04811; official code ``ydchen0806/GTGM``, config ``pretraining_all.yaml``).

    Objective (official ``loss: only_clip`` branch of ``pretrain/utils/utils_trainer.py``, the paper's
    §3.2–3.3):

    ``L = CLIP(v₁, t) + CLIP(v₂, t) + 0.01 · BT(f₁, f₂)``

    where ``v₁, v₂`` are projected embeddings of two augmented views of a volume, ``t`` is the projected
    [CLS] embedding of its generated caption and ``f₁, f₂`` are the raw backbone features.

    * ``CLIP`` is the official ``clip_loss``: ``CE(i2t) + CE(t2i)`` summed over the two directions
      (``clip_reduction: sum``; ``mean`` halves it, our :func:`~medvlp.losses.clip_loss`), τ = 0.07.
    * ``BT`` is the official ``covar_loss`` (``barlow_form: official``,
      :func:`~medvlp.losses.barlow.gtgm_barlow_loss`): ``C = f₁ᵀf₂ / B`` on raw features,
      ``(Σ(C_ii−1)² + 0.0051·Σ_{i≠j}C_ij²) / 2``; ``standardised`` is the Barlow Twins paper's form.
    * Heads (``utils_builder.py``): ``Linear(D, 2048)-BN-ReLU-Linear(2048, 512)-BN(affine=False)``
      for image and text (``proj_hidden_dim: 2048``, ``embed_dim: 512``).
    * Multimodal batches (CT + MRI + EM sub-batches of the ``mixed`` datamodule) are concatenated
      after the backbone: one head forward and one objective over the whole mixed batch, as the
      official dataloader draws one batch from the joint CT/MRI/EM dataset. The BatchNorm heads
      therefore normalise train-time embeddings with mixed-modality statistics, the same population
      their running statistics (used at evaluation) average.

    The paper setup (``preset=paper``: SwinUNETR feature size 48, BioBERT v1.1 with layers 0–5 frozen
    and trainable embeddings, warm-restart cosine T₀ = 10k, 200k iterations, per-GPU batch 2, SyncBN,
    random 32×160×160 crops) is ``methods/gtgm.paper.yaml``, every value with its source.

    Required batch keys: ``image``, ``caption`` (a caption source: offline file joined by volume name,
    the ``hf`` image captioner on a random slice — the paper path — or, for the offline demo only,
    label-derived template captions; see :mod:`medvlp.datamodules.volume.captions`).

    Deviations:

    * Backbone: our 3D ViT under the demo/tiny presets; MONAI's Swin trunk (:class:`~medvlp.encoders.swin.SwinEncoder`)
      under ``preset=paper``. The official SwinUNETR ``for_pretrain`` feature is 2048-d (its pretraining
      neck is not in the published code); ours is the pooled last Swin stage, ``16 · feature_size`` = 768-d.
    * Views are produced on device by :func:`random_view` (crop-resize, in-plane flips, intensity, noise)
      rather than by the official dataloader's augmentation pipeline (flip, rotation, intensity, noise,
      blur), which is not in the published code.
    * The knowledge-graph caption refinement of GTGM+ is not implemented.

    Args:
        barlow_lambda: off-diagonal weight λ of Barlow Twins.
        barlow_form: ``official`` (GTGM code) | ``standardised`` (Barlow Twins paper).
        clip_reduction: ``sum`` (official: both directions summed) | ``mean``.
        view_crop: minimum crop fraction per side of a view.
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "gtgm"
    required_keys: ClassVar[frozenset[str]] = frozenset({"image", "caption"})
    loss_terms: ClassVar[tuple[str, ...]] = ("clip1_loss", "clip2_loss", "barlow_loss")
    example_data: ClassVar[dict[str, Any]] = {"name": "mixed", "init_args": {"datamodules": {
        m: {"name": "phantom", "init_args": {"modality": m, "captions": {"type": "template"}}}
        for m in ("ct", "mri", "em")}}}

    def __init__(self, barlow_lambda: float = 0.0051, barlow_form: str = "official", clip_reduction: str = "sum",
                 view_crop: float = 0.85, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if barlow_form not in ("official", "standardised"):
            raise ValueError(f"barlow_form must be official|standardised, got {barlow_form!r}")
        if clip_reduction not in ("sum", "mean"):
            raise ValueError(f"clip_reduction must be sum|mean, got {clip_reduction!r}")
        self.barlow_lambda = barlow_lambda
        self.barlow_form = barlow_form
        self.clip_reduction = clip_reduction
        self.view_crop = view_crop

    def _view_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f1 = self.image_features(random_view(image, crop=self.view_crop))["pooled"]
        f2 = self.image_features(random_view(image, crop=self.view_crop))["pooled"]
        return f1, f2

    def _objective(self, f1: torch.Tensor, f2: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        t = self.text_proj(self.text_encoder(list(captions))["pooled"])
        v1, v2 = self.image_proj(f1), self.image_proj(f2)
        scale = 2.0 if self.clip_reduction == "sum" else 1.0
        barlow = gtgm_barlow_loss if self.barlow_form == "official" else barlow_twins_loss
        return {
            "clip1_loss": scale * clip_loss(v1, t, self.temperature, self.gather_negatives),
            "clip2_loss": scale * clip_loss(v2, t, self.temperature, self.gather_negatives),
            "barlow_loss": barlow(f1, f2, self.barlow_lambda),
        }

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        f1, f2 = self._view_features(batch["image"])
        return self._objective(f1, f2, batch["caption"])

    def compute_multimodal_losses(self, batches: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """One objective over the concatenated modalities (see the class docstring)."""
        feats = [self._view_features(b["image"]) for b in batches.values()]
        captions = [c for b in batches.values() for c in b["caption"]]
        return self._objective(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), captions)
