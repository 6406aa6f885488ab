"""UMCL: unified medical image-text-label contrastive learning with continuous prompts
(Wang, arXiv 2307.05920). No official code exists; implemented from the paper and its closest
references (UniCL targets, MedCLIP semantic matching, CoOp context vectors)."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.encoders import ProjectionHead
from medvlp.losses import gather_global, soft_target_contrastive_loss
from medvlp.method import VLPMethod
from medvlp.registry import register_method


def label_set_targets(labels: torch.Tensor, report_mask: torch.Tensor | None = None) -> torch.Tensor:
    """UniCL-style targets ``(B, B)``: 1 on the diagonal and wherever two samples have the same,
    fully known label set (NaN anywhere in a row = unknown → only its own pair is positive)."""
    b = labels.shape[0]
    known = ~torch.isnan(labels).any(1)
    lab = torch.nan_to_num(labels, nan=-1.0)
    same = (lab.unsqueeze(1) == lab.unsqueeze(0)).all(-1) & known.unsqueeze(1) & known.unsqueeze(0)
    return (same | torch.eye(b, dtype=torch.bool, device=labels.device)).float()


def jaccard_targets(labels: torch.Tensor) -> torch.Tensor:
    """Soft targets ``(B, B)``: the Jaccard overlap of two samples' positive label sets (two empty sets =
    1), 1 on the diagonal. Unknown labels are masked as :func:`label_set_targets` does: a row with a NaN
    label is only its own positive (a NaN is not a negative, so unlabelled samples are not positives of
    each other nor of "no finding" samples)."""
    known = ~torch.isnan(labels).any(1)
    lab = torch.nan_to_num(labels, nan=0.0).clamp(min=0)
    inter = lab @ lab.t()
    union = lab.sum(1, keepdim=True) + lab.sum(1) - inter
    jac = torch.where(union > 0, inter / union.clamp_min(1e-8), torch.ones_like(inter))
    jac = jac * (known.unsqueeze(1) & known.unsqueeze(0)).to(jac.dtype)
    return torch.maximum(jac, torch.eye(len(lab), device=lab.device, dtype=jac.dtype))


class PromptLearner(nn.Module):
    """CoOp continuous prompts for class names (and their negations) fed to a BERT-like text encoder.

    Sequence layout (word embeddings): ``[CLS] <prompt> [SEP]`` where ``<prompt>`` is, for
    ``position``: ``end`` → ``ctx₁…ctxₙ CLASS .``, ``front`` → ``CLASS ctx₁…ctxₙ .``,
    ``middle`` → ``ctx₁…ctx_{n/2} CLASS ctx_{n/2+1}…ctxₙ .``. Negated prompts insert "no" before the
    class name with the same context vectors.

    Args:
        text_encoder: a :class:`~medvlp.encoders.TextEncoder`.
        class_names: classes with learned prompts.
        n_ctx: number of context vectors.
        position: ``end`` | ``front`` | ``middle``.
        class_specific: one context per class (CoOp CSC) instead of one shared context.
    """

    def __init__(self, text_encoder: Any, class_names: Sequence[str], n_ctx: int = 4, position: str = "end",
                 class_specific: bool = False) -> None:
        super().__init__()
        if position not in ("end", "front", "middle"):
            raise ValueError(f"prompt position must be end|front|middle, got {position!r}")
        self.class_names = list(class_names)
        self.n_ctx, self.position, self.class_specific = n_ctx, position, class_specific
        dim = text_encoder.input_embeddings().embedding_dim
        shape = (len(self.class_names), n_ctx, dim) if class_specific else (n_ctx, dim)
        self.ctx = nn.Parameter(torch.randn(shape) * 0.02)

    def _ids(self, text_encoder: Any, phrase: str) -> list[int]:
        return text_encoder.tokenizer(phrase, add_special_tokens=False)["input_ids"]

    def sequences(self, text_encoder: Any, names: Sequence[str], negate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings ``(K, L, D)`` and attention mask ``(K, L)`` for ``names``."""
        emb = text_encoder.input_embeddings()
        device = emb.weight.device
        cls_id, sep_id, pad_id = text_encoder.special_ids()
        dot = self._ids(text_encoder, ".")
        seqs = []
        for k, name in enumerate(names):
            if self.class_specific:
                if name not in self.class_names:
                    raise KeyError(f"class-specific prompts have no context for {name!r}; learned: {self.class_names}")
                ctx = self.ctx[self.class_names.index(name)]
            else:
                ctx = self.ctx
            word = emb(torch.tensor(self._ids(text_encoder, ("no " if negate else "") + name.lower()) + dot, device=device))
            half = self.n_ctx // 2
            parts = {"end": [ctx, word], "front": [word[:-len(dot)], ctx, word[-len(dot):]],
                     "middle": [ctx[:half], word[:-len(dot)], ctx[half:], word[-len(dot):]]}[self.position]
            seqs.append(torch.cat([emb(torch.tensor([cls_id], device=device)), *parts,
                                   emb(torch.tensor([sep_id], device=device))]))
        length = max(s.shape[0] for s in seqs)
        pad = emb(torch.tensor([pad_id], device=device))
        mask = torch.zeros(len(seqs), length, dtype=torch.long, device=device)
        out = []
        for i, s in enumerate(seqs):
            mask[i, : s.shape[0]] = 1
            out.append(torch.cat([s, pad.expand(length - s.shape[0], -1)]))
        return torch.stack(out), mask


@register_method("umcl")
class UMCL(VLPMethod):
    """UMCL (arXiv 2307.05920; abstract-level description, no code).

    One batch stream mixes image–report pairs and image–label samples. Every sample ``i`` gets a
    text embedding ``t_i``: its report when it has one, otherwise the mean embedding of the learned
    prompts of its positive classes (or of the negated prompts when no class is positive).

    * **Image–text–label contrastive** (``itl_loss``; UniCL eq. 3–4): symmetric cross-entropy against
      targets ``T_ij = 1`` for ``i = j`` or when ``i`` and ``j`` have the same fully known label set
      (false negatives become positives), rows/columns normalised (:func:`label_set_targets`).
    * **Image–label term** (``label_loss``; CXR-CLIP/MedCLIP-style prompt classification): for class
      ``k``, logit ``(cos(v_i, p_k) − cos(v_i, n_k)) / τ`` with learned positive/negated prompts,
      BCE against the labels (NaN ignored).
    * **Continuous prompts** (CoOp): ``n_ctx`` context vectors, ``position`` configurable, shared or
      class-specific; they also serve zero-shot classification (``learned_zero_shot_classifier``).
      Prompts go through their own projection head ``prompt_proj`` (same widths as ``text_proj``, but
      LayerNorm, ``prompt_head_norm``): a BatchNorm head shared with report batches would normalise
      prompts with batch statistics in training and with report running statistics in evaluation, so
      the zero-shot classifier would score embeddings the loss never trained. With LayerNorm the
      prompt embeddings are the same in train and eval mode (up to the text encoder's dropout).

    Required batch keys: ``image`` and at least one of ``text`` / ``labels`` (+ ``label_names``);
    an empty report string marks a label-only sample.

    Design choices: label source = the datamodule's labels (CheXpert labeler for MIMIC-CXR); label-only
    texts use prompt means; same-label-set positives (not Jaccard weights; ``target: jaccard`` offers
    MedCLIP-style soft weights).

    Args:
        class_names: classes with learned prompts (default: the datamodule's label names).
        n_ctx: context vectors. prompt_position: end|front|middle. class_specific: CoOp CSC.
        target: ``label_set`` (default) or ``jaccard``.
        freeze_text: freeze the text encoder (prompts still learn through it).
        prompt_head_norm: norm of the prompt projection head, ``ln`` (default) or ``none``.
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "umcl"
    required_keys: ClassVar[frozenset[str]] = frozenset({"image"})

    def __init__(self, class_names: Sequence[str] | None = None, n_ctx: int = 4, prompt_position: str = "end",
                 class_specific: bool = False, target: str = "label_set", freeze_text: bool = False,
                 prompt_head_norm: str = "ln", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not class_names:
            raise ValueError("UMCL needs class_names (set method.init_args.class_names or use a labelled datamodule)")
        if target not in ("label_set", "jaccard"):
            raise ValueError(f"target must be label_set|jaccard, got {target!r}")
        self.target = target
        self.prompts = PromptLearner(self.text_encoder, class_names, n_ctx, prompt_position, class_specific)
        if prompt_head_norm not in ("ln", "none"):
            raise ValueError(f"prompt_head_norm must be ln|none (a BatchNorm head differs between train and eval), "
                             f"got {prompt_head_norm!r}")
        hp = self.hparams
        self.prompt_proj = ProjectionHead(self.text_encoder.embed_dim, self.embed_dim, hp.get("proj_hidden_dim"),
                                          hp.get("proj_layers", 2), prompt_head_norm)  # type: ignore[arg-type]
        if freeze_text:
            self.text_encoder.requires_grad_(False)

    def prompt_embeddings(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected (unnormalised) learned-prompt embeddings ``(K, E)`` for positive and negated prompts
        (one text-encoder pass over all 2K prompts, through ``prompt_proj``)."""
        pos_e, pos_m = self.prompts.sequences(self.text_encoder, names, negate=False)
        neg_e, neg_m = self.prompts.sequences(self.text_encoder, names, negate=True)
        length = max(pos_e.shape[1], neg_e.shape[1])

        def pad(e: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            extra = length - e.shape[1]
            return F.pad(e, (0, 0, 0, extra)), F.pad(m, (0, extra))

        (pe, pm), (ne, nm) = pad(pos_e, pos_m), pad(neg_e, neg_m)
        z = self.prompt_proj(self.text_encoder.forward_embeds(torch.cat([pe, ne]), torch.cat([pm, nm])))
        return z[: len(names)], z[len(names):]

    @torch.no_grad()
    def learned_zero_shot_classifier(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised learned-prompt class embeddings (positive, negated) for the benchmark harness."""
        pos, neg = self.prompt_embeddings(names)
        return F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        if self.target == "label_set":
            return label_set_targets(labels)
        return jaccard_targets(labels)

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if "text" not in batch and "labels" not in batch:
            raise KeyError(f"UMCL needs 'text' or 'labels' in the batch; it has {sorted(batch)}")
        image = batch["image"]
        b = image.shape[0]
        img = self.image_proj(self.image_features(image)["pooled"])
        out: dict[str, torch.Tensor] = {}
        texts = list(batch.get("text", [""] * b))
        has_report = torch.tensor([bool(t.strip()) for t in texts], device=image.device)
        labels = batch.get("labels")
        if labels is not None:
            labels = labels.float().to(image.device)
            names = list(batch["label_names"])
            pos, neg = self.prompt_embeddings(names)
            cos_pos = F.normalize(img, dim=-1) @ F.normalize(pos, dim=-1).t()
            cos_neg = F.normalize(img, dim=-1) @ F.normalize(neg, dim=-1).t()
            logits = (cos_pos - cos_neg) / self.temperature
            known = ~torch.isnan(labels)
            out["label_loss"] = F.binary_cross_entropy_with_logits(logits[known], labels[known])
        txt = torch.zeros_like(img)
        if has_report.any():
            idx = has_report.nonzero().squeeze(1)
            txt = txt.index_put((idx,), self.text_proj(self.text_encoder([texts[i] for i in idx.tolist()])["pooled"]))
        if (~has_report).any():
            if labels is None:
                raise ValueError("a sample has an empty report and the batch has no labels to build its text from")
            lab = torch.nan_to_num(labels, nan=0.0).clamp(min=0)
            pos_n, neg_n = F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
            from_pos = lab @ pos_n / lab.sum(1, keepdim=True).clamp_min(1.0)
            label_text = torch.where(lab.sum(1, keepdim=True) > 0, from_pos, neg_n.mean(0, keepdim=True).expand(b, -1))
            idx = (~has_report).nonzero().squeeze(1)
            txt = txt.index_put((idx,), label_text[idx])
        if self.gather_negatives:  # global negatives; label-set targets built on the gathered labels
            img, txt = gather_global(img, txt)
            labels = gather_global(labels, grad=False)[0] if labels is not None else None
            b = img.shape[0]
        targets = self._targets(labels) if labels is not None else torch.eye(b, device=image.device)
        out["itl_loss"] = soft_target_contrastive_loss(img, txt, targets, self.temperature)
        out["false_negatives_removed"] = (targets.sum() - b).detach() / b
        return out
