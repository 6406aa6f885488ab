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


#: the perturbations GTGM's two-view provider chooses from (one per view)
PERTURBATIONS = ("rescale", "flip", "intensity", "noise", "blur")


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator))


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[lo, hi]`` (both included, Python's ``random.randint``)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def _minmax(v: torch.Tensor) -> torch.Tensor:
    lo, hi = v.min(), v.max()
    return (v - lo) / (hi - lo) if float(hi - lo) > 0 else v - lo


def _gauss_blur_slices(v: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """2D Gaussian blur of every slice (last two axes) of ``(C, *spatial)``."""
    if sigma <= 0:
        return v
    r = torch.arange(k, dtype=v.dtype, device=v.device) - k // 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    flat = v.reshape(-1, 1, *v.shape[-2:])
    flat = F.conv2d(F.pad(flat, (k // 2,) * 4, mode="reflect"), g.view(1, 1, 1, k))
    flat = F.conv2d(flat, g.view(1, 1, k, 1))
    return flat.reshape(v.shape)


def official_view(v: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                  scale_factor: float = 1.5) -> tuple[torch.Tensor, str]:
    """One view of GTGM's two-view provider (``pretrain/dataloader/data_provider_pretraining_caption_match.py``
    @ e92b287) from the shared sub-volume ``v`` ``(C, *spatial)`` (the datamodule's crop, in-plane
    ``padding`` wider on each side than the view): one perturbation chosen uniformly among
    :data:`PERTURBATIONS` (L161-181, L370-394, ``per_mode: 1``), then the centre crop removing ``padding``
    in-plane (L399-401; rescale resizes instead), then per-view min-max (L272-273, L328-332).

    * rescale (``consistency_aug_perturbations.py`` L234-252): side ``2·randint(⌊det/1.5⌋//2, ⌊det·1.5⌋//2)``,
      centre-cropped when smaller than the source, resized (linear) to the view size;
    * flip (L255-262): four random bits: flip depth, flip H, flip W, transpose H/W (``simple_augment``);
    * intensity (L288-342): contrast ×(1 + (U−0.5)·0.1), brightness + (U−0.5)·0.1, clip [0, 1], gamma
      ``x ** 2^(2U−1)``, clip; the whole volume with p 0.25, else per slice;
    * noise (L361-371): Gaussian, σ ~ U(0.01, 0.2), clipped to [0, 1];
    * blur (L345-358): per slice, kernel ∈ {3, 5, 7, 9}, σ ~ U(0, 2).
    Returns the view and the perturbation's name."""
    h, w = v.shape[-2:]
    det = (h - 2 * padding, w - 2 * padding)
    if min(det) <= 0:
        raise ValueError(f"GTGM official views: padding {padding} leaves no view in a {h}x{w} crop")
    kind = PERTURBATIONS[_randint(0, len(PERTURBATIONS) - 1, generator)]
    x = _minmax(v)  # the provider's images are in [0, 1] (imgs / 255) before perturbing
    if kind == "rescale":
        lo, hi = int(det[0] // scale_factor) // 2, int(det[0] * scale_factor) // 2
        side = 2 * _randint(lo, hi, generator)
        if side < h:
            t, left = (h - side) // 2, (w - side) // 2
            x = x[..., t:t + side, left:left + side]
        mode = "trilinear" if x.dim() == 4 else "bilinear"
        out = F.interpolate(x[None], size=(*x.shape[1:-2], *det), mode=mode, align_corners=False)[0]
        return _minmax(out), kind
    if kind == "flip":
        rule = [_rand(generator) < 0.5 for _ in range(4)]
        if rule[0] and x.dim() == 4:
            x = x.flip(1)
        if rule[1]:
            x = x.flip(-2)
        if rule[2]:
            x = x.flip(-1)
        if rule[3] and h == w:
            x = x.transpose(-1, -2)
    elif kind == "intensity":
        def jitter(y: torch.Tensor) -> torch.Tensor:
            y = y * (1 + (_rand(generator) - 0.5) * 0.1) + (_rand(generator) - 0.5) * 0.1
            y = y.clamp(0, 1)
            return (y ** (2 ** (_rand(generator) * 2 - 1))).clamp(0, 1)

        if _rand(generator) > 0.75 or x.dim() < 4:
            x = jitter(x)
        else:
            x = torch.stack([jitter(x[:, z]) for z in range(x.shape[1])], 1)
    elif kind == "noise":
        std = 0.01 + (0.2 - 0.01) * _rand(generator)
        x = (x + std * torch.randn(x.shape, generator=generator).to(x.device)).clamp(0, 1)
    else:
        k = 2 * _randint(1, 4, generator) + 1
        x = _gauss_blur_slices(x, k, 2.0 * _rand(generator))
    x = x[..., padding:h - padding, padding:w - padding]
    return _minmax(x), kind


def official_views(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two :func:`official_view` s of every sample of a batch ``(B, C, *spatial)``: both from the same
    shared sub-volume, each with its own perturbation."""
    v1, v2 = [], []
    for i in range(x.shape[0]):
        v1.append(official_view(x[i], padding, generator)[0])
        v2.append(official_view(x[i], padding, generator)[0])
    return torch.stack(v1), torch.stack(v2)


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
      after the backbone: one head forward and one objective over the whole mixed batch (or
      ``joint_batch_size`` samples of it), as the official dataloader draws one batch from the joint
      CT/MRI/EM pool. The BatchNorm heads
      therefore normalise train-time embeddings with mixed-modality statistics, the same population
      their running statistics (used at evaluation) average.

    The paper setup (``preset=paper``: SwinUNETR feature size 48, BioBERT v1.1 with layers 0–5 frozen
    and trainable embeddings, warm-restart cosine T₀ = 10k, 200k iterations, per-GPU batch 2 from the joint
    pool, SyncBN, the official two views of a 32×320×320 sub-volume) is ``methods/gtgm.paper.yaml``, every
    value with its source.

    Required batch keys: ``image``, ``caption`` (a caption source: offline file joined by volume name,
    the ``hf`` image captioner on a random slice — the paper path — or, for the offline demo only,
    label-derived template captions; see :mod:`medvlp.datamodules.volume.captions`).

    Deviations:

    * Backbone: our 3D ViT under the demo/tiny presets; MONAI's Swin trunk (:class:`~medvlp.encoders.swin.SwinEncoder`)
      under ``preset=paper``. The official pretraining neck *is* published (``pretrain/utils/swin_unetr.py``
      @ e92b287: ``encoder10`` on the last hidden state, ``AdaptiveAvgPool3d(1)``, ``Linear(384, 2048)``,
      L106, L187-195, L248-253, L319-322), but as shipped it is shape-consistent only for feature size 24
      while the builder uses 48 (768 channels into ``Linear(384, ·)``); medvlp uses the pooled last Swin
      stage, ``16 · feature_size`` = 768-d, without that neck.
    * Views: ``view_mode: official`` (the paper preset) is the published two-view recipe
      (:func:`official_views`: one shared random sub-volume — the datamodule's crop, ``view_padding``
      wider in-plane — then per view one random perturbation among rescale / flip / intensity / noise /
      blur, centre crop, per-view min-max). Caveats from the code: ``pretrain/main.py`` L14 imports the
      *single-view* provider (``data_provider_pretraining``) while the trainer unpacks two views
      (``utils_trainer.py`` L256), which only the two-view provider returns; that provider crops 18×160×160
      for ``model_type: superhuman`` (the config) although the encoder is built for 32×160×160 (medvlp
      keeps 32); the provider divides every modality by 255 (medvlp min-max scales the crop first).
      ``view_mode: medvlp`` (default) is :func:`random_view` on device.
    * Batch: with ``joint_batch_size`` (the paper preset: 2, the official per-GPU batch) a multimodal
      step keeps that many samples drawn uniformly from the concatenated CT/MRI/EM sub-batches (official:
      2 files drawn uniformly from the joint pool, so modalities weigh by file count; here every modality
      offers the same number per step). The shipped config trains on EM only (``DATA.type: 'EM'``, L63).
    * The knowledge-graph caption refinement of GTGM+ is not implemented.

    Args:
        barlow_lambda: off-diagonal weight λ of Barlow Twins.
        barlow_form: ``official`` (GTGM code) | ``standardised`` (Barlow Twins paper).
        clip_reduction: ``sum`` (official: both directions summed) | ``mean``.
        view_crop: minimum crop fraction per side of a view (``view_mode: medvlp``).
        view_mode: ``medvlp`` (:func:`random_view`) | ``official`` (:func:`official_views`).
        view_padding: in-plane padding per side of the shared sub-volume around a view (official 80).
        joint_batch_size: samples kept per multimodal step (``None`` = all; official 2).
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "gtgm"
    required_keys: ClassVar[frozenset[str]] = frozenset({"image", "caption"})
    loss_terms: ClassVar[tuple[str, ...]] = ("clip1_loss", "clip2_loss", "barlow_loss")
    example_data: ClassVar[dict[str, Any]] = {"name": "mixed", "init_args": {"datamodules": {
        m: {"name": "phantom", "init_args": {"modality": m, "captions": {"type": "template"}}}
        for m in ("ct", "mri", "em")}}}

    def __init__(self, barlow_lambda: float = 0.0051, barlow_form: str = "official", clip_reduction: str = "sum",
                 view_crop: float = 0.85, view_mode: str = "medvlp", view_padding: int = 80,
                 joint_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if barlow_form not in ("official", "standardised"):
            raise ValueError(f"barlow_form must be official|standardised, got {barlow_form!r}")
        if clip_reduction not in ("sum", "mean"):
            raise ValueError(f"clip_reduction must be sum|mean, got {clip_reduction!r}")
        self.barlow_lambda = barlow_lambda
        self.barlow_form = barlow_form
        self.clip_reduction = clip_reduction
        self.view_crop = view_crop
        if view_mode not in ("medvlp", "official"):
            raise ValueError(f"view_mode must be medvlp|official, got {view_mode!r}")
        if joint_batch_size is not None and joint_batch_size < 1:
            raise ValueError(f"joint_batch_size must be >= 1, got {joint_batch_size}")
        self.view_mode, self.view_padding, self.joint_batch_size = view_mode, int(view_padding), joint_batch_size

    def views(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two augmented views of a batch (``view_mode``)."""
        if self.view_mode == "official":
            return official_views(image, self.view_padding)
        return random_view(image, crop=self.view_crop), random_view(image, crop=self.view_crop)

    def _view_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v1, v2 = self.views(image)
        return self.image_features(v1)["pooled"], self.image_features(v2)["pooled"]

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
        """One objective over the concatenated modalities (see the class docstring); with
        ``joint_batch_size`` only that many samples, drawn uniformly from the concatenation, are used."""
        images = [b["image"] for b in batches.values()]
        captions = [c for b in batches.values() for c in b["caption"]]
        if self.joint_batch_size is not None:
            sizes = [len(x) for x in images]
            keep = torch.randperm(sum(sizes))[: self.joint_batch_size].sort().values.tolist()
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            picked = [(m, j - starts[m]) for j in keep for m in range(len(sizes)) if starts[m] <= j < starts[m] + sizes[m]]
            groups = {m: [i for mm, i in picked if mm == m] for m in range(len(sizes))}
            images = [images[m][idx] for m, idx in groups.items() if idx]
            captions = [captions[j] for j in keep]
        feats = [self._view_features(x) for x in images]
        return self._objective(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), captions)
