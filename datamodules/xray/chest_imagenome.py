"""Chest ImaGenome scene graphs as the region source of MIMIC-CXR (ASG's region–sentence pairs).

Chest ImaGenome v1.0.0 (PhysioNet) ships one ``<dicom_id>_SceneGraph.json`` per MIMIC-CXR image
(``silver_dataset/scene_graph/``). The parts read here:

* top level: ``image_id`` (the MIMIC-CXR ``dicom_id``), ``objects``, ``attributes``;
* ``objects[]``: ``bbox_name`` (e.g. ``right lower lung zone``) and the box on the original image,
  ``original_x1, original_y1, original_x2, original_y2`` (``x1..y2`` are the same box on the dataset's
  224×224 resized copy and are not used);
* ``attributes[]``: per region (``bbox_name``), the report sentences that describe it in ``phrases``
  (aligned with ``attributes``, ``phrase_IDs``, ``sections`` and the ``*_cues`` lists).

:class:`ChestImaGenomeRegions` turns a scene graph into ASG's training pairs: every region that has a box
and at least one phrase found in the sample's report text becomes one (box, sentence spans) pair;
regions whose sentence sets are identical are merged into one pair (box = the union of their boxes), so
ARSA never gets two identical target columns; at most ``max_pairs`` (ASG: 23) pairs are kept in the
file's order. Boxes are mapped with the same geometry as the image (longest side resized to
``image_size``, centred zero padding: :func:`letterbox_box`; then the image's crop, if any:
:func:`crop_box`).
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from medvlp.datamodules.io.readers import DataError

log = logging.getLogger(__name__)

BOX_KEYS = ("original_x1", "original_y1", "original_x2", "original_y2")


@dataclass(frozen=True)
class RegionPhrases:
    """One anatomical region of a scene graph: its original-image box and its report sentences."""

    names: tuple[str, ...]
    box: tuple[float, float, float, float]
    phrases: tuple[str, ...]


def read_scene_graph(path: str | Path) -> list[RegionPhrases]:
    """Regions with a box and at least one phrase, in the file's ``attributes`` order.

    Raises:
        DataError: naming the file and key when the JSON is malformed or a box is not numeric.
    """
    path = Path(path)
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable scene graph ({exc})") from exc
    for key in ("image_id", "objects", "attributes"):
        if key not in graph:
            raise DataError(f"{path}: scene graph has no {key!r} key (Chest ImaGenome layout expected)")
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for i, obj in enumerate(graph["objects"]):
        name = obj.get("bbox_name")
        try:
            box = tuple(float(obj[k]) for k in BOX_KEYS)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: objects[{i}] ({name!r}) needs numeric {', '.join(BOX_KEYS)} ({exc})") from exc
        if not isinstance(name, str):
            raise DataError(f"{path}: objects[{i}] has no bbox_name")
        boxes[name] = box  # type: ignore[assignment]
    out = []
    for attr in graph["attributes"]:
        name = attr.get("bbox_name")
        phrases = tuple(p.strip() for p in attr.get("phrases") or [] if isinstance(p, str) and p.strip())
        if name in boxes and phrases:
            out.append(RegionPhrases((name,), boxes[name], tuple(dict.fromkeys(phrases))))
    return out


def letterbox_box(box: Sequence[float], height: int, width: int, size: int) -> tuple[float, float, float, float]:
    """Map an original-image box through "resize the longest side to ``size`` + centre zero-pad"
    (:func:`~medvlp.datamodules.tabular.resize_2d`)."""
    scale = size / max(height, width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    top, left = (size - nh) // 2, (size - nw) // 2
    sx, sy = nw / width, nh / height
    x1, y1, x2, y2 = box
    clamp = lambda v: min(max(v, 0.0), float(size))  # noqa: E731
    return (clamp(x1 * sx + left), clamp(y1 * sy + top), clamp(x2 * sx + left), clamp(y2 * sy + top))


def crop_box(box: Sequence[float], top: int, left: int, size: int) -> tuple[float, float, float, float]:
    """Shift a box by a ``size × size`` crop at ``(top, left)`` and clip it to the crop (albumentations
    ``RandomCrop``/``CenterCrop`` with ``pascal_voc`` boxes, as ASG's pretrain_dataset.py)."""
    x1, y1, x2, y2 = box
    clamp = lambda v: min(max(v, 0.0), float(size))  # noqa: E731
    return (clamp(x1 - left), clamp(y1 - top), clamp(x2 - left), clamp(y2 - top))


def _phrase_span(text: str, phrase: str) -> tuple[int, int] | None:
    """Character span of ``phrase`` in ``text`` (case- and whitespace-insensitive), or None."""
    pattern = r"\s+".join(re.escape(w) for w in phrase.split())
    m = re.search(pattern, text, flags=re.IGNORECASE)
    return (m.start(), m.end()) if m else None


class ChestImaGenomeRegions:
    """Per-image ASG region–sentence pairs from Chest ImaGenome scene graphs.

    Args:
        scene_graph_dir: folder with ``<dicom_id>_SceneGraph.json`` files (searched recursively once).
        max_pairs: region–sentence pairs per image (ASG ``num_region`` 23).
        max_phrases: sentences kept per (merged) region in the padded span tensor.
    """

    def __init__(self, scene_graph_dir: str | Path, max_pairs: int = 23, max_phrases: int = 8) -> None:
        self.root = Path(scene_graph_dir)
        if not self.root.is_dir():
            raise DataError(f"Chest ImaGenome scene_graph_dir {self.root} is not a folder")
        self.files = {p.name[: -len("_SceneGraph.json")]: p for p in self.root.rglob("*_SceneGraph.json")}
        self.max_pairs, self.max_phrases = max_pairs, max_phrases
        self.stats: Counter[str] = Counter()

    def has(self, dicom_id: str) -> bool:
        """Whether a scene graph exists for this image."""
        return dicom_id in self.files

    def pairs(self, dicom_id: str, text: str) -> list[tuple[tuple[float, float, float, float], list[tuple[int, int]]]]:
        """(original box, sentence spans in ``text``) pairs after merging and truncation."""
        merged: dict[tuple[tuple[int, int], ...], list[tuple[float, float, float, float]]] = {}
        for region in read_scene_graph(self.files[dicom_id]):
            spans = []
            for phrase in region.phrases:
                span = _phrase_span(text, phrase)
                if span is None:
                    self.stats["phrase_not_in_text"] += 1
                else:
                    spans.append(span)
            if spans:
                merged.setdefault(tuple(sorted(set(spans))), []).append(region.box)
        if any(len(b) > 1 for b in merged.values()):
            self.stats["merged_regions"] += sum(len(b) - 1 for b in merged.values())
        out = []
        for spans, boxes in merged.items():
            union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
            out.append((union, list(spans)))
        if len(out) > self.max_pairs:
            self.stats["pairs_truncated"] += len(out) - self.max_pairs
        return out[: self.max_pairs]

    def sample_fields(self, dicom_id: str, text: str, height: int, width: int, size: int,
                      crop: tuple[int, int, int] | None = None) -> dict[str, Any]:
        """Batch fields for one image: ``regions`` (max_pairs, 4) pixel boxes in the model input,
        ``region_present`` (max_pairs,) and ``region_spans`` (max_pairs, max_phrases, 2), −1 padded.

        ``crop``: ``(top, left, crop_size)`` of the image's crop after the resize + pad to ``size``;
        a box left with no area inside the crop is dropped (counted as ``regions_cropped_out``), as
        albumentations drops it in ASG."""
        boxes = torch.zeros(self.max_pairs, 4)
        present = torch.zeros(self.max_pairs, dtype=torch.bool)
        spans = torch.full((self.max_pairs, self.max_phrases, 2), -1, dtype=torch.long)
        k = 0
        for box, sp in self.pairs(dicom_id, text):
            mapped = letterbox_box(box, height, width, size)
            if crop is not None:
                mapped = crop_box(mapped, *crop)
                if mapped[2] <= mapped[0] or mapped[3] <= mapped[1]:
                    self.stats["regions_cropped_out"] += 1
                    continue
            boxes[k] = torch.tensor(mapped)
            present[k] = True
            for j, (s, e) in enumerate(sp[: self.max_phrases]):
                spans[k, j, 0], spans[k, j, 1] = s, e
            k += 1
        return {"regions": boxes, "region_present": present, "region_spans": spans}


def spans_from_tensor(spans: torch.Tensor) -> list[list[list[tuple[int, int]]]]:
    """``(B, R, S, 2)`` −1-padded spans → per sample, per region, list of ``(start, end)``."""
    out = []
    for sample in spans.tolist():
        out.append([[(s, e) for s, e in region if s >= 0] for region in sample])
    return out


def summarize(stats: Mapping[str, int]) -> str:
    """One log line of the region source's counters."""
    return ", ".join(f"{k}={v}" for k, v in sorted(stats.items())) or "no events"
