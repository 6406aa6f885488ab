"""Fine-grained alignment between image regions and report sentences (ASG's ARSA term)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def region_sentence_alignment_loss(region: torch.Tensor, sentence: torch.Tensor, present: torch.Tensor,
                                   temperature: float | torch.Tensor = 0.07, normalize: bool = False) -> torch.Tensor:
    """Bidirectional InfoNCE over the anatomical regions of each image (ASG official ``loss_arsa``).

    For image ``b``, region ``r`` must match the sentence that describes ``r`` among the sentences of
    the same report, and vice versa. Regions without a describing sentence (``present=False``) are
    masked with ``-inf`` as candidates and contribute no term (ASG's ``count_matrix`` / ``-100`` labels).
    Each direction is the mean cross-entropy over the present (image, region) pairs of the batch, and the
    two directions are **summed**, as in the official code.

    Args:
        region: ``(B, R, D)`` region features. ASG passes RoI-pooled, already L2-normalised patch
            embeddings, and its logits are their plain dot products (no re-normalisation after pooling).
        sentence: ``(B, R, D)`` sentence features aligned to the region index (mean of L2-normalised
            word embeddings in ASG).
        present: ``(B, R)`` bool.
        temperature: τ (official 0.07).
        normalize: L2-normalise ``region`` and ``sentence`` before the dot product (cosine logits).

    Returns:
        ``CE(region→sentence) + CE(sentence→region)``; 0 (with a graph) when no region is present (the
        official code would return NaN there).
    """
    if region.shape != sentence.shape or present.shape != region.shape[:2]:
        raise ValueError(f"shape mismatch: region {tuple(region.shape)}, sentence {tuple(sentence.shape)}, "
                         f"present {tuple(present.shape)}")
    present = present.bool()
    if not present.any():
        return (region.sum() + sentence.sum()) * 0.0
    if normalize:
        region, sentence = F.normalize(region, dim=-1), F.normalize(sentence, dim=-1)
    logits = torch.einsum("brd,bsd->brs", region, sentence) / temperature
    pair_mask = present.unsqueeze(1) & present.unsqueeze(2)
    logits = logits.masked_fill(~pair_mask, float("-inf"))
    target = torch.arange(region.shape[1], device=region.device).expand(region.shape[0], -1)
    rows = present  # (B, R) valid anchors
    l_r2s = F.cross_entropy(logits[rows], target[rows])
    l_s2r = F.cross_entropy(logits.transpose(1, 2)[rows], target[rows])
    return l_r2s + l_s2r
