"""UniMedI: unified 2D/3D medical image pretraining in a language-guided common semantic space
(He et al., ECCV 2024, arXiv 2311.14851). No official code exists; this is a paper-faithful
re-implementation whose design choices are listed in the class docstring."""
from __future__ import annotations

import copy
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from medvlp.encoders import ProjectionHead
from medvlp.losses import clip_loss, masked_token_distillation_loss
from medvlp.method import VLPMethod
from medvlp.registry import register_method

ABLATIONS = {"joint": (2, 3), "2d": (2,), "3d": (3,)}


def text_guided_relevance(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine relevance ``(B, N)`` of each visual token (already in the joint space) to its report."""
    return torch.einsum("bnd,bd->bn", F.normalize(tokens, dim=-1), F.normalize(text, dim=-1))


def slice_scores(relevance: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Mean relevance per depth index of a 3D token grid ``(d, h, w)`` → ``(B, d)``."""
    if len(grid) != 3:
        raise ValueError(f"slice scores need a 3D token grid, got {grid}")
    return relevance.reshape(relevance.shape[0], *grid).mean(dim=(2, 3))


def select_slices(relevance: torch.Tensor, grid: tuple[int, ...], k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` depth token-slabs most relevant to the report (lesion slices)."""
    scores = slice_scores(relevance, grid)
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


def select_patches(relevance: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask ``(B, N)`` of the ``ratio`` most report-relevant tokens (affected areas)."""
    n = relevance.shape[1]
    k = max(1, int(round(ratio * n)))
    idx = relevance.topk(k, dim=1).indices
    return torch.zeros_like(relevance, dtype=torch.bool).scatter_(1, idx, True)


def attentive_token_mask(relevance: torch.Tensor, mask_ratio: float, attentive_fraction: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask ``mask_ratio · N`` tokens: an ``attentive_fraction`` of them are the most text-relevant
    tokens (AttMask-style "hide the informative part"), the rest are drawn at random."""
    b, n = relevance.shape
    n_mask = max(1, int(round(mask_ratio * n)))
    n_att = int(round(attentive_fraction * n_mask))
    mask = torch.zeros(b, n, dtype=torch.bool, device=relevance.device)
    if n_att:
        mask.scatter_(1, relevance.topk(n_att, dim=1).indices, True)
    noise = torch.rand(b, n, generator=generator).to(relevance.device)
    noise = noise.masked_fill(mask, 2.0)  # never re-pick attentive tokens
    rand_idx = noise.argsort(dim=1)[:, : n_mask - n_att]
    mask.scatter_(1, rand_idx, True)
    return mask


def slices_from_slabs(volume: torch.Tensor, slab_index: torch.Tensor, patch_depth: int) -> torch.Tensor:
    """Middle 2D slice of each selected token slab: ``(B, C, D, H, W)``, ``(B, k)`` → ``(B·k, C, H, W)``."""
    b, k = slab_index.shape
    z = (slab_index * patch_depth + patch_depth // 2).clamp(max=volume.shape[2] - 1)
    batch_idx = torch.arange(b, device=volume.device).repeat_interleave(k)
    return volume[batch_idx, :, z.reshape(-1)]


@register_method("unimedi")
class UniMedI(VLPMethod):
    """UniMedI (arXiv 2311.14851 v2; no official code).

    One ViT (:class:`~medvlp.encoders.ViTEncoder` with ``spatial_dims=[2, 3]``) encodes 2D X-rays and
    3D CT volumes through separate 2D/3D patch embeddings into one transformer; reports are the common
    semantic space. Per modality batch the objective is

    ``L = L_itc + L_pseudo (3D only) + L_distill + L_token``

    * **L_itc** – symmetric image–report InfoNCE on both modalities (§3.1).
    * **Text-guided selection** (§3.2) – visual tokens are projected into the joint space and scored
      by cosine with the report embedding. 3D: the ``select_slices`` depth slabs with the highest
      mean relevance are the lesion slices; their middle slices go through the 2D path as pseudo 2D
      images paired with the volume's report (**L_pseudo**, InfoNCE of the mean pseudo-slice embedding
      vs. the report). 2D: the top ``select_ratio`` tokens are the affected areas.
    * **L_distill** – self-distillation with an EMA teacher (§3.3): the student sees the image with
      ``mask_ratio`` of its tokens replaced by the mask token, an ``attentive_fraction`` of them being
      the most report-relevant tokens (language-guided masking); an iBOT-style loss matches the
      student's head distribution on masked tokens to the teacher's on the unmasked image.
    * **L_token** – trains the token projection that scores relevance: the relevance-softmax-weighted
      token embedding (temperature 0.1) is contrasted with the report embedding (InfoNCE). Without it the
      relevance head would receive no gradient (selection and masking use detached scores).

    Design choices (paper details not public in code): relevance is cosine in the joint space rather
    than raw [CLS] attention weights; pseudo pairs use the middle slice of each selected slab; the
    distillation head is a 2-layer MLP to ``distill_dim`` prototypes with teacher temperature 0.04 and
    no centering; ``L_token`` is our addition to train the relevance scorer; loss weights are 1. Ablation: ``modalities`` ∈ {joint, 2d, 3d} drops the other
    modality's sub-batches (paper Table 4 setting).

    Required batch keys: ``image``, ``text``; mixed 2D+3D training uses the ``mixed`` datamodule.

    Args:
        modalities: ``joint`` | ``2d`` | ``3d``.
        select_slices: lesion slabs selected per volume.
        select_ratio: fraction of 2D tokens marked as affected areas (logged; guides masking).
        mask_ratio: fraction of tokens masked for the student.
        attentive_fraction: share of masked tokens chosen by text relevance.
        distill_dim: prototypes of the distillation head.
        student_temp: student temperature. teacher_temp: teacher temperature.
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "unimedi"
    required_keys: ClassVar[frozenset[str]] = frozenset({"image", "text"})
    example_data: ClassVar[dict[str, Any]] = {"name": "mixed", "init_args": {"datamodules": {
        "xray": {"name": "phantom", "init_args": {"modality": "xray"}},
        "ct": {"name": "phantom", "init_args": {"modality": "ct"}}}}}

    def __init__(self, modalities: str = "joint", select_slices: int = 2, select_ratio: float = 0.25,
                 mask_ratio: float = 0.3, attentive_fraction: float = 0.5, distill_dim: int = 256,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if modalities not in ABLATIONS:
            raise ValueError(f"modalities must be one of {sorted(ABLATIONS)}, got {modalities!r}")
        self.modalities = modalities
        self.select_k = select_slices
        self.select_ratio = select_ratio
        self.mask_ratio = mask_ratio
        self.attentive_fraction = attentive_fraction
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        d = self.image_encoder.embed_dim
        self.token_proj = ProjectionHead(d, self.embed_dim, None, 2, "ln")
        self.distill_head = ProjectionHead(d, distill_dim, d, 2, "ln")
        self.teacher_encoder = copy.deepcopy(self.image_encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.distill_head).requires_grad_(False)

    def momentum_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.image_encoder, self.teacher_encoder), (self.distill_head, self.teacher_head)]

    def relevance(self, tokens: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Text-guided token relevance ``(B, N)``."""
        return text_guided_relevance(self.token_proj(tokens), text_emb)

    def compute_multimodal_losses(self, batches: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        allowed = ABLATIONS[self.modalities]
        kept = {k: b for k, b in batches.items() if b["image"].ndim - 2 in allowed}
        if not kept:
            raise ValueError(f"modalities={self.modalities!r} leaves no sub-batch of {sorted(batches)}")
        return super().compute_multimodal_losses(kept)

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        sd = image.ndim - 2
        if sd not in ABLATIONS[self.modalities]:
            raise ValueError(f"UniMedI with modalities={self.modalities!r} got a {sd}D batch")
        feats = self.image_features(image)
        txt_emb = self.text_proj(self.text_encoder(list(batch["text"]))["pooled"])
        img_emb = self.image_proj(feats["pooled"])
        out = {"itc_loss": clip_loss(img_emb, txt_emb, self.temperature, self.gather_negatives)}
        rel = self.relevance(feats["tokens"], txt_emb.detach())
        if sd == 3:
            slabs = select_slices(rel.detach(), feats["grid"], self.select_k)
            pd = self.image_encoder.patch_size(3)[0]
            slices = slices_from_slabs(image, slabs, pd)
            if 2 in getattr(self.image_encoder, "spatial_dims", (2,)):
                pseudo = self.image_proj(self.image_features(slices)["pooled"])
                pseudo = pseudo.reshape(image.shape[0], -1, pseudo.shape[-1]).mean(1)
                out["pseudo_itc_loss"] = clip_loss(pseudo, txt_emb, self.temperature, self.gather_negatives)
        else:
            out["affected_area_relevance"] = (rel * select_patches(rel.detach(), self.select_ratio)).sum(1).mean().detach()
        mask = attentive_token_mask(rel.detach(), self.mask_ratio, self.attentive_fraction)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(image)["tokens"])
        student = self.distill_head(self.image_features(image, token_mask=mask)["tokens"])
        out["distill_loss"] = masked_token_distillation_loss(student, teacher, mask, self.student_temp, self.teacher_temp)
        # the relevance head learns to find report-relevant tokens: align the relevance-weighted token
        # embedding with the report (a token-level ITC; keeps token_proj trained)
        att = torch.softmax(rel / 0.1, dim=1)
        pooled_rel = torch.einsum("bn,bnd->bd", att, self.token_proj(feats["tokens"]))
        out["token_itc_loss"] = clip_loss(pooled_rel, txt_emb, self.temperature, self.gather_negatives)
        return out
