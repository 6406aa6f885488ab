"""GTGM: generative text-guided 3D vision-language pretraining (Chen et al., arXiv 2306.04811)."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from medvlp.losses import barlow_twins_loss, clip_loss
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

    Objective (official ``loss: only_clip`` branch, the paper's §3.2–3.3):

    ``L = CLIP(v₁, t) + CLIP(v₂, t) + 0.01 · BT(f₁, f₂)``

    where ``v₁, v₂`` are projected embeddings of two augmented views of a volume, ``t`` is the
    projected embedding of its generated caption, ``CLIP`` is symmetric InfoNCE (τ = 0.07) and
    ``BT`` is the Barlow Twins loss (λ = 0.0051) on the raw backbone features ``f₁, f₂`` — the
    negative-free term between views. The text encoder's first ``freeze_layers`` (6) layers are frozen.

    The example data (``medvlp pretrain method=gtgm``) mixes phantom CT, MRI and EM volumes, as the
    official pretraining mixes MSD CT/MRI tasks and EM volumes; per-modality terms are summed.

    Required batch keys: ``image``, ``caption`` (from a caption source: offline file joined by volume
    name, the template captioner, or a user-configured image-to-text model; see
    :mod:`medvlp.datamodules.captions`).

    Deviations:

    * Backbone: our 3D ViT by default; MONAI's Swin trunk (``SwinEncoder``, GTGM's SwinUNETR encoder)
      via ``image_encoder.class_path: medvlp.encoders.swin.SwinEncoder``. The official raw feature is
      2048-d; ours is the backbone width.
    * Views are produced on device by :func:`random_view` (crop-resize, in-plane flips, intensity, noise)
      rather than by the official dataloader's MONAI pipeline.
    * The offline default caption is template text from labels/metadata, not a BLIP/LLM caption.

    Args:
        barlow_lambda: off-diagonal weight λ of Barlow Twins.
        view_crop: minimum crop fraction per side of a view.
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "gtgm"
    required_keys: ClassVar[frozenset[str]] = frozenset({"image", "caption"})
    example_data: ClassVar[dict[str, Any]] = {"name": "mixed", "init_args": {"datamodules": {
        m: {"name": "phantom", "init_args": {"modality": m, "captions": {"type": "template"}}}
        for m in ("ct", "mri", "em")}}}

    def __init__(self, barlow_lambda: float = 0.0051, view_crop: float = 0.85, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.barlow_lambda = barlow_lambda
        self.view_crop = view_crop

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        f1 = self.image_features(random_view(image, crop=self.view_crop))["pooled"]
        f2 = self.image_features(random_view(image, crop=self.view_crop))["pooled"]
        t = self.text_proj(self.text_encoder(list(batch["caption"]))["pooled"])
        v1, v2 = self.image_proj(f1), self.image_proj(f2)
        return {
            "clip1_loss": clip_loss(v1, t, self.temperature, self.gather_negatives),
            "clip2_loss": clip_loss(v2, t, self.temperature, self.gather_negatives),
            "barlow_loss": barlow_twins_loss(f1, f2, self.barlow_lambda),
        }
