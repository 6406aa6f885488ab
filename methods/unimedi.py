"""UniMedI: unified 2D/3D medical image pretraining in a language-guided common semantic space
(He et al., ECCV 2024, arXiv 2311.14851). No official code exists; this is a paper-faithful
re-implementation whose design choices are listed in the class docstring."""
from __future__ import annotations

import copy
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.distributed as dist

from medvlp.encoders import ProjectionHead
from medvlp.losses import clip_loss, masked_token_distillation_loss
from medvlp.method import VLPMethod
from medvlp.registry import register_method

ABLATIONS = {"joint": (2, 3), "2d": (2,), "3d": (3,)}


def cls_attention(encoder: Any, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a :class:`~medvlp.encoders.ViTEncoder` and return its final patch tokens ``(B, N, D)`` and the
    [CLS]→patch attention ``(B, N)`` averaged over layers and heads (A-CLIP ``forward_features`` with
    ``need_attn``: mean over blocks of the attention maps, row 0, columns 1:, mean over heads)."""
    tokens, att, _ = cls_attention_with_cls(encoder, image)
    return tokens, att


def cls_attention_with_cls(encoder: Any, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cls_attention` plus the final [CLS] token ``(B, D)``."""
    tokens, _ = encoder.embed(image)
    x = torch.cat([encoder.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    att = torch.zeros(x.shape[0], x.shape[1] - 1, device=x.device, dtype=torch.float32)
    for blk in encoder.blocks:
        b, n, d = x.shape
        heads = blk.attn.num_heads
        q, k, _ = blk.attn.qkv(blk.norm1(x)).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = ((q[:, :, :1] @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)).softmax(-1)  # (B, H, 1, N+1)
        att += a[:, :, 0, 1:].float().mean(1)
        x = blk(x)
    x = encoder.norm(x)
    return x[:, 1:], att / len(encoder.blocks), x[:, 0]


def keep_most_attended(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask ``(B, N)`` of the ``ratio`` most-attended tokens (A-CLIP ``get_att_mask`` keeps the top half)."""
    n = attention.shape[1]
    k = max(1, int(round(ratio * n)))
    idx = attention.topk(k, dim=1).indices
    return torch.zeros_like(attention, dtype=torch.bool).scatter_(1, idx, True)


def slab_scores(attention: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Mean attention per depth index of a 3D token grid ``(d, h, w)`` → ``(B, d)``."""
    if len(grid) != 3:
        raise ValueError(f"slice scores need a 3D token grid, got {grid}")
    return attention.reshape(attention.shape[0], *grid).mean(dim=(2, 3))


def select_slices(attention: torch.Tensor, grid: tuple[int, ...], k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` depth slabs with the highest attention (lesion slices).

    Raises:
        ValueError: when ``k`` is not smaller than the number of candidate slabs (selection would be a no-op).
    """
    scores = slab_scores(attention, grid)
    if not 0 < k < scores.shape[1]:
        raise ValueError(f"select_slices k={k} must be in [1, {scores.shape[1] - 1}]: the volume has "
                         f"{scores.shape[1]} candidate slabs (lower patch_size_3d depth or k)")
    return scores.topk(k, dim=1).indices


def slab_middle_slice(slab_index: torch.Tensor, patch_depth: int, depth: int) -> torch.Tensor:
    """Slice index (depth axis of the volume) that represents each slab: its middle slice,
    ``slab · patch_depth + patch_depth // 2``, clamped to the last slice."""
    return (slab_index * patch_depth + patch_depth // 2).clamp(max=depth - 1)


def slices_from_slabs(volume: torch.Tensor, slab_index: torch.Tensor, patch_depth: int) -> torch.Tensor:
    """Middle 2D slice of each selected slab: ``(B, C, D, H, W)``, ``(B, k)`` → ``(B·k, C, H, W)``."""
    b, k = slab_index.shape
    z = slab_middle_slice(slab_index, patch_depth, volume.shape[2])
    batch_idx = torch.arange(b, device=volume.device).repeat_interleave(k)
    return volume[batch_idx, :, z.reshape(-1)]


def attentive_token_mask(attention: torch.Tensor, mask_ratio: float, attentive_fraction: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask ``mask_ratio · N`` tokens: an ``attentive_fraction`` of them are the most-attended tokens
    (AttMask, Kakogeorgiou et al. 2022: hiding the informative part makes masked distillation harder),
    the rest are drawn at random."""
    b, n = attention.shape
    n_mask = max(1, int(round(mask_ratio * n)))
    n_att = int(round(attentive_fraction * n_mask))
    mask = torch.zeros(b, n, dtype=torch.bool, device=attention.device)
    if n_att:
        mask.scatter_(1, attention.topk(n_att, dim=1).indices, True)
    noise = torch.rand(b, n, generator=generator).to(attention.device)
    noise = noise.masked_fill(mask, 2.0)  # never re-pick attentive tokens
    mask.scatter_(1, noise.argsort(dim=1)[:, : n_mask - n_att], True)
    return mask


@register_method("unimedi")
class UniMedI(VLPMethod):
    """UniMedI (arXiv 2311.14851 v2; no official code).

    One ViT (:class:`~medvlp.encoders.ViTEncoder` with ``spatial_dims=[2, 3]``) encodes 2D X-rays and
    3D CT volumes through separate 2D/3D patch embeddings into one transformer; reports are the common
    semantic space. Per modality batch the objective is ``L = L_itc + L_pseudo (3D only) + L_distill``.

    * **Token relevance** (§3.2) is the EMA teacher's [CLS]→patch attention averaged over layers and
      heads, as in A-CLIP (``microsoft/A-CLIP`` ``models.py``, same group): the teacher's [CLS] is the
      token that ITC aligns with the report, so its attention marks report-relevant regions, and the score
      depends on the image only — the report cannot leak into it.
    * **2D selection** — the student encodes only the ``select_ratio`` most-attended tokens (the affected
      areas); **L_itc** is computed on that embedding. This is A-CLIP's direction (``get_att_mask`` keeps
      the top half, the student sees only kept tokens): dropping text-irrelevant tokens keeps what the
      report describes, so the image–report pair stays a valid positive, whereas removing the attended
      tokens would drop exactly the described content.
    * **3D selection** — the ``select_slices`` depth slabs with the highest mean attention (patch depth
      ≤ ``max_slab_depth`` slices, so selection is at slice resolution; ``k`` must be smaller than the
      number of slabs) give one middle slice each. The slices' 2D tokens are fed with the volume's 3D tokens
      as one sequence for the volume's **L_itc**, and each slice alone is a pseudo 2D image paired with the
      volume's report (**L_pseudo**: InfoNCE of the mean slice embedding vs. the report).
    * **L_distill** — self-distillation with the EMA teacher (§3.3): the student sees the full image with
      ``mask_ratio`` of its tokens replaced by the mask token (an ``attentive_fraction`` of them the most
      attended, AttMask's direction for masked modelling); an iBOT loss matches the student's prototype
      distribution on masked tokens to the teacher's, whose logits are centred (DINO/iBOT: running mean
      with momentum ``center_momentum``, all-reduced across ranks) and sharpened (``teacher_temp``).
    * Multimodal batches run all image (and all text) projections as one concatenated head forward, so
      the BatchNorm heads see the mixed population their running statistics average.

    Deviations / choices not fixed by the paper: the relevance scorer (A-CLIP attention, see above); the
    middle slice represents a selected slab; the distillation head is a 2-layer MLP to ``distill_dim``
    prototypes; the hyperparameters marked "not from the paper" in ``unimedi.yaml``/``unimedi.paper.yaml``.
    Two more are choices, not the paper: **L_pseudo** (the pseudo-pair ITC of each selected slice with the
    volume's report) is medvlp's reading of "pseudo 2D images", not a loss the paper writes down; and the
    self-distillation is iBOT's masked-token term only, without iBOT's [CLS]-level DINO term (iBOT
    ``loss1``: cross-entropy of the student's [CLS] distribution against the teacher's centred, sharpened
    one). ``cls_distill: true`` adds that term as ``cls_distill_loss`` (own running center; off by default).
    Ablation: ``modalities`` ∈ {joint, 2d, 3d} drops the other modality's sub-batches (paper Table 4).

    Required batch keys: ``image``, ``text``; mixed 2D+3D training uses the ``mixed`` datamodule.

    Args:
        modalities: ``joint`` | ``2d`` | ``3d``.
        select_slices: slabs (slices) selected per volume, ``k``.
        select_ratio: fraction of 2D tokens the student keeps (affected areas).
        mask_ratio: fraction of tokens masked for the distillation student.
        attentive_fraction: share of masked tokens chosen by attention.
        distill_dim: prototypes of the distillation head.
        student_temp: student temperature. teacher_temp: teacher temperature.
        center_momentum: momentum of the teacher-logit center.
        max_slab_depth: largest 3D patch depth accepted for slice selection.
        cls_distill: add iBOT's [CLS]-level DINO term (``cls_distill_loss``; default off).
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "unimedi"
    required_keys: ClassVar[frozenset[str]] = frozenset({"image", "text"})
    loss_terms: ClassVar[tuple[str, ...]] = ("itc_loss", "pseudo_itc_loss", "distill_loss", "cls_distill_loss")
    example_data: ClassVar[dict[str, Any]] = {"name": "mixed", "init_args": {"datamodules": {
        "xray": {"name": "phantom", "init_args": {"modality": "xray"}},
        "ct": {"name": "phantom", "init_args": {"modality": "ct"}}}}}

    def __init__(self, modalities: str = "joint", select_slices: int = 2, select_ratio: float = 0.5,
                 mask_ratio: float = 0.3, attentive_fraction: float = 0.5, distill_dim: int = 256,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, center_momentum: float = 0.9,
                 max_slab_depth: int = 4, cls_distill: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if modalities not in ABLATIONS:
            raise ValueError(f"modalities must be one of {sorted(ABLATIONS)}, got {modalities!r}")
        enc_dims = tuple(getattr(self.image_encoder, "spatial_dims", ()))
        if not hasattr(self.image_encoder, "blocks") or not hasattr(self.image_encoder, "embed"):
            raise ValueError("UniMedI needs a ViTEncoder (attention-based selection, token removal)")
        if 3 in ABLATIONS[modalities] and 2 not in enc_dims:
            raise ValueError(f"UniMedI feeds selected CT slices through the 2D path, but the image encoder has "
                             f"spatial_dims={list(enc_dims)}: set image_encoder.spatial_dims: [2, 3]")
        if 3 in enc_dims and self.image_encoder.patch_size(3)[0] > max_slab_depth:
            raise ValueError(f"patch_size_3d depth {self.image_encoder.patch_size(3)[0]} > max_slab_depth "
                             f"{max_slab_depth}: slice selection would pick whole slabs, not slices")
        if not 0 < select_ratio <= 1:
            raise ValueError(f"select_ratio must be in (0, 1], got {select_ratio}")
        self.modalities = modalities
        self.select_k = select_slices
        self.select_ratio = select_ratio
        self.mask_ratio = mask_ratio
        self.attentive_fraction = attentive_fraction
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum = center_momentum
        self.image_encoder.enable_mask_token()  # the student masks tokens (L_distill)
        d = self.image_encoder.embed_dim
        self.distill_head = ProjectionHead(d, distill_dim, d, 2, "ln")
        self.teacher_encoder = copy.deepcopy(self.image_encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.distill_head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(distill_dim))
        self.cls_distill = bool(cls_distill)
        if self.cls_distill:  # iBOT keeps a separate [CLS] center (only then: default checkpoints are unchanged)
            self.register_buffer("cls_center", torch.zeros(distill_dim))

    def momentum_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.image_encoder, self.teacher_encoder), (self.distill_head, self.teacher_head)]

    # ------------------------------------------------------------------ pieces
    def _select_slabs(self, attention: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """The 3D selection of training (``(B, k)`` slab indices from the teacher's attention)."""
        return select_slices(attention, grid, self.select_k)

    @torch.no_grad()
    def selected_slices(self, volume: torch.Tensor, texts: Sequence[str] | None = None) -> dict[str, Any]:
        """The slices the report-guided 3D selection of training picks for ``volume`` ``(B, 1, D, H, W)``.

        Runs the training code path: the EMA teacher's [CLS]→patch attention (:func:`cls_attention`),
        the ``k`` slabs with the highest mean attention (:meth:`_select_slabs`) and the middle slice of each
        (:func:`slab_middle_slice`, the slice fed to the 2D path as a pseudo 2D image).

        Args:
            volume: a normalised 3D batch as the datamodule yields it.
            texts: the volumes' reports. Accepted for the protocol's interface; this selection does not
                read them: the relevance score is the teacher's attention (A-CLIP), which the reports shape
                only through training (L_itc aligns the teacher's [CLS] with the report).

        Returns:
            ``slices``: LongTensor ``(B, k)``, slice indices on the volume's depth axis (the slices fed to
            the 2D path); ``slabs``: ``(B, k)`` slab indices (slab ``s`` covers slices
            ``[s·patch_depth, (s+1)·patch_depth − 1]``); ``patch_depth``: slices per slab;
            ``candidates``: LongTensor ``(num_slabs,)``, every slice the selection can return.
        """
        if volume.ndim != 5:
            raise ValueError(f"selected_slices needs a 3D batch (B, C, D, H, W), got shape {tuple(volume.shape)}")
        if texts is not None and len(texts) != volume.shape[0]:
            raise ValueError(f"selected_slices got {len(texts)} texts for {volume.shape[0]} volumes")
        _, grid = self.teacher_encoder.embed(volume)
        _, attention = cls_attention(self.teacher_encoder, volume)
        slabs = self._select_slabs(attention, grid)
        depth = int(self.teacher_encoder.patch_size(3)[0])
        candidates = slab_middle_slice(torch.arange(grid[0], device=slabs.device), depth, volume.shape[2])
        return {"slices": slab_middle_slice(slabs, depth, volume.shape[2]), "slabs": slabs,
                "patch_depth": depth, "candidates": candidates}

    def _student_pooled(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        return self.image_encoder.forward_tokens(tokens, grid)["pooled"]

    @torch.no_grad()
    def _update_center(self, teacher_logits: torch.Tensor, center: torch.Tensor | None = None) -> None:
        center = self.center if center is None else center
        batch_center = teacher_logits.float().mean(0)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            batch_center /= dist.get_world_size()
        center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def _encode(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Backbone work of one modality batch: pre-projection image features, text features, distillation."""
        image = batch["image"]
        sd = image.ndim - 2
        if sd not in ABLATIONS[self.modalities]:
            raise ValueError(f"UniMedI with modalities={self.modalities!r} got a {sd}D batch")
        enc = self.image_encoder
        with torch.no_grad():
            t_tokens, attention, t_cls = cls_attention_with_cls(self.teacher_encoder, image)
            teacher = self.teacher_head(t_tokens)
        tokens, grid = enc.embed(image)
        parts: dict[str, Any] = {"text": self.text_encoder(list(batch["text"]))["pooled"]}
        if sd == 2:
            keep = keep_most_attended(attention, self.select_ratio)
            kept = tokens[keep].reshape(tokens.shape[0], -1, tokens.shape[-1])  # same count per row
            parts["image"] = self._student_pooled(kept, grid)
            parts["affected_area_attention"] = (attention * keep).sum(1).mean()
        else:
            slabs = self._select_slabs(attention, grid)
            slices = slices_from_slabs(image, slabs, enc.patch_size(3)[0])
            s_tokens, s_grid = enc.embed(slices)  # (B·k, N2, D) through the 2D path
            joint = torch.cat([tokens, s_tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])], dim=1)
            parts["image"] = self._student_pooled(joint, grid)
            parts["pseudo"] = self._student_pooled(s_tokens, s_grid)
        mask = attentive_token_mask(attention, self.mask_ratio, self.attentive_fraction)
        masked = enc.forward_tokens(tokens, grid, mask)
        student = self.distill_head(masked["tokens"])
        parts["distill_loss"] = masked_token_distillation_loss(student, teacher, mask, self.student_temp,
                                                               self.teacher_temp, self.center)
        if self.cls_distill:  # iBOT loss1 form: [CLS] of the masked student vs the teacher's [CLS]
            with torch.no_grad():
                t_cls_logits = self.teacher_head(t_cls)
            s_cls_logits = self.distill_head(masked["pooled"])
            every = torch.ones(s_cls_logits.shape[0], 1, dtype=torch.bool, device=s_cls_logits.device)
            parts["cls_distill_loss"] = masked_token_distillation_loss(
                s_cls_logits[:, None], t_cls_logits[:, None], every, self.student_temp, self.teacher_temp, self.cls_center)
            parts["_teacher_cls"] = t_cls_logits
        parts["_teacher"] = teacher.reshape(-1, teacher.shape[-1])
        return parts

    def _losses_from(self, parts: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        """Project every modality's features in one head forward each (image, text), then the losses."""
        names = list(parts)
        img_in = [parts[m]["image"] for m in names] + [parts[m]["pseudo"] for m in names if "pseudo" in parts[m]]
        img_out = self.image_proj(torch.cat(img_in)).split([x.shape[0] for x in img_in])
        txt = self.text_proj(torch.cat([parts[m]["text"] for m in names])).split(
            [parts[m]["text"].shape[0] for m in names])
        pseudo_out = iter(img_out[len(names):])
        out: dict[str, dict[str, torch.Tensor]] = {}
        for i, m in enumerate(names):
            p = parts[m]
            terms = {"itc_loss": clip_loss(img_out[i], txt[i], self.temperature, self.gather_negatives),
                     "distill_loss": p["distill_loss"]}
            if "cls_distill_loss" in p:
                terms["cls_distill_loss"] = p["cls_distill_loss"]
            if "pseudo" in p:
                pseudo = next(pseudo_out).reshape(txt[i].shape[0], -1, txt[i].shape[-1]).mean(1)
                terms["pseudo_itc_loss"] = clip_loss(pseudo, txt[i], self.temperature, self.gather_negatives)
            else:
                terms["affected_area_attention"] = p["affected_area_attention"].detach()
            out[m] = terms
        if self.training:
            self._update_center(torch.cat([p["_teacher"] for p in parts.values()]))
            if self.cls_distill:
                self._update_center(torch.cat([p["_teacher_cls"] for p in parts.values()]), self.cls_center)
        return out

    # ------------------------------------------------------------------ objective
    def compute_multimodal_losses(self, batches: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        allowed = ABLATIONS[self.modalities]
        kept = {k: b for k, b in batches.items() if b["image"].ndim - 2 in allowed}
        if not kept:
            raise ValueError(f"modalities={self.modalities!r} leaves no sub-batch of {sorted(batches)}")
        per = self._losses_from({m: self._encode(b) for m, b in kept.items()})
        return {f"{m}_{k}": v for m, terms in per.items() for k, v in terms.items()}

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self._losses_from({"_": self._encode(batch)})["_"]
