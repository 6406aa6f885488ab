"""The batch schema shared by every datamodule, method and benchmark.

A batch is a plain dict (MONAI style); absent parts are absent keys, never ``None`` placeholders.

=================  ==========================================================================
key                content
=================  ==========================================================================
``image``          float tensor ``(B, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (3D)
``modality``       list of ``"xray" | "ct" | "mri" | "em"``
``text``           list of raw report strings (tokenisation belongs to the text encoder)
``sections``       dict section name → list of strings (``findings``, ``impression``)
``labels``         float tensor ``(B, K)``; ``NaN`` = unknown (after the uncertainty policy)
``label_names``    list of K class names (same for the whole batch)
``mask``           segmentation target ``(B, 1, *spatial)`` (integer class ids)
``regions``        float tensor ``(B, R, 4)`` boxes ``x1, y1, x2, y2`` in pixels of ``image``
``region_present`` bool tensor ``(B, R)``: the region is visible/annotated
``triplets``       list (per sample) of ``(region, finding, existence)`` tuples
``caption``        list of generated captions (GTGM)
``index``          long tensor ``(B,)`` of dataset row indices
``meta``           list of per-sample dicts (ids, paths)
=================  ==========================================================================

Mixed 2D+3D training passes a dict of such batches keyed by modality (Lightning ``CombinedLoader``).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

SHARED_KEYS = ("label_names",)  # one value for the whole batch


def is_multimodal(batch: Mapping[str, Any]) -> bool:
    """True when ``batch`` is a dict of sub-batches keyed by modality (mixed 2D+3D training)."""
    return bool(batch) and all(isinstance(v, Mapping) and "image" in v for v in batch.values())


def batch_size(batch: Mapping[str, Any]) -> int:
    """Number of samples in a (single-modality) batch."""
    if "image" in batch:
        return int(batch["image"].shape[0])
    for key in ("text", "labels", "caption"):
        if key in batch:
            return len(batch[key])
    raise KeyError("cannot infer batch size: no image, text, labels or caption key")


def check_required_keys(batch: Mapping[str, Any], required: Iterable[str], who: str) -> None:
    """Raise a ``KeyError`` naming what ``who`` needs and what the batch has.

    For a multimodal batch every sub-batch is checked.
    """
    subs = batch.items() if is_multimodal(batch) else [("", batch)]
    for mod, sub in subs:
        missing = sorted(set(required) - set(sub))
        if missing:
            where = f" (sub-batch {mod!r})" if mod else ""
            raise KeyError(
                f"{who} needs batch keys {missing}{where}; the batch has {sorted(sub)}. "
                "Use a datamodule that provides them (see `medvlp list`)."
            )


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate per-sample dicts into the batch schema.

    Tensors are stacked; strings and nested structures become lists; ``sections`` become a dict of
    lists; ``label_names`` is taken from the first sample and must be equal across the batch.

    Raises:
        ValueError: naming the key and the sample when shapes disagree.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    out: dict[str, Any] = {}
    keys = set().union(*[s.keys() for s in samples])
    for key in sorted(keys):
        present = [s for s in samples if key in s]
        if len(present) != len(samples):
            raise ValueError(f"key {key!r} is present in only {len(present)}/{len(samples)} samples")
        values = [s[key] for s in samples]
        if key in SHARED_KEYS:
            if any(list(v) != list(values[0]) for v in values):
                raise ValueError(f"{key!r} differs between samples of one batch")
            out[key] = list(values[0])
        elif key == "sections":
            names = sorted(set().union(*[v.keys() for v in values]))
            out[key] = {n: [v.get(n, "") for v in values] for n in names}
        elif isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack {key!r}: shapes differ across samples {sorted(shapes)}")
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            out[key] = torch.as_tensor(values)
        else:
            out[key] = values
    return out
