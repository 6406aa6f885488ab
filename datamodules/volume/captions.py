"""Caption sources for methods that train on generated text (GTGM).

GTGM's official code joins pre-generated captions by volume name (``match_name``) and falls back to
BLIP on a random slice. medvlp offers the same three routes:

* :class:`HFImageCaptioner` – the paper path: a ``transformers`` image-to-text model (BLIP in GTGM) sees
  only one random slice of the volume; the caption is ``"<name>, <generated text>"`` after the official
  :func:`text_filter` (``pretrain/utils/utils_trainer.py::generate_caption``). Only runs with a model the
  user configures; nothing is downloaded otherwise.
* :class:`CaptionFile` – a CSV/TSV ``id,caption`` joined on ``meta["id"]`` (pre-generated captions). As the
  official two-view provider (``pretrain/dataloader/data_provider_pretraining_caption_match.py`` L290-305
  @ e92b287), a file may hold *located* captions (``location_column``: several rows per volume, the one
  nearest (squared Euclidean) to the sample's crop origin ``meta["crop_origin"]`` is used) and the caption
  may be prefixed with the volume's name (``prefix_name``: ``"<name>, <caption>"``).
* :class:`ImageStatsCaptioner` – an offline, label-free stand-in for the captioner: like the ``hf`` path it
  sees only one random slice of the image (never the labels, mask or report) and writes ``"<name>, <text>"``
  where the text says what a captioner could see there (overall brightness; location and size of the most
  distinct bright and dark spots). No finding word can occur in it.
* :class:`TemplateCaptioner` – **offline demo only**: a caption written from the ground-truth labels that
  zero-shot and linear-probe evaluation later use, so it leaks labels into pretraining (and is identical for
  every volume of a dataset without labels). It logs a warning when built; the benchmark report marks results
  pretrained on it (:func:`uses_label_derived_captions`).

A spec is ``{"type": "file"|"template"|"hf"|"image_stats", ...kwargs}``.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from PIL import Image

MODALITY_WORDS = {"xray": "chest radiograph", "ct": "chest CT volume", "mri": "brain MRI volume",
                  "em": "electron microscopy volume"}


LOG = logging.getLogger(__name__)
# GTGM's text_filter: "figure 1 : ", "fig. 2. ", "figure 3. ", "fig. 4 " at the start, "figure 5 " anywhere
_FIGURE_PREFIX = re.compile(r"^figure\s\d+\s:\s|^fig\.\s\d+\.\s|^figure\s\d+\.\s|^fig\.\s\d+\s|figure\s\d+\s")


class CaptionError(KeyError):
    """A sample has no caption in the configured source."""


def text_filter(text: str) -> str:
    """Remove figure prefixes that captioners trained on papers emit (GTGM ``text_filter``)."""
    return _FIGURE_PREFIX.sub("", text)


def uses_label_derived_captions(spec: Any) -> bool:
    """True when a data config (any nesting, e.g. ``mixed`` children) uses ``captions: {type: template}``."""
    if isinstance(spec, Mapping):
        cap = spec.get("captions")
        if isinstance(cap, Mapping) and cap.get("type", "template") == "template":
            return True
        return any(uses_label_derived_captions(v) for v in spec.values())
    if isinstance(spec, (list, tuple)):
        return any(uses_label_derived_captions(v) for v in spec)
    return False


class TemplateCaptioner:
    """Caption from modality and positive labels, e.g. "A chest CT volume showing lung nodule.".

    Offline demo only: the text is derived from the ground-truth labels (see the module docstring).
    """

    label_derived: ClassVar[bool] = True

    def __init__(self) -> None:
        LOG.warning("template captions are written from ground-truth labels: offline demo only (results "
                    "pretrained on them are marked as label-derived in benchmark reports)")

    def __call__(self, sample: Mapping[str, Any]) -> str:
        modality = MODALITY_WORDS.get(sample.get("modality", ""), "medical image")
        names = sample.get("label_names") or []
        labels = sample.get("labels")
        pos = [n for n, v in zip(names, labels.tolist()) if v == 1] if labels is not None else []
        if not pos:
            return f"A {modality} with no visible abnormality."
        return f"A {modality} showing {', '.join(p.lower() for p in pos)}."


def parse_location(text: str, where: str) -> tuple[float, ...]:
    """``"z,y,x"`` / ``"[z, y, x]"`` / ``"(z y x)"`` → floats.

    Raises:
        ValueError: naming ``where`` when the text holds no number.
    """
    nums = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(text))
    if not nums:
        raise ValueError(f"{where}: location {text!r} holds no coordinates")
    return tuple(float(n) for n in nums)


class CaptionFile:
    """Captions joined by sample id from a CSV/TSV file.

    Args:
        path: file with columns ``id_column`` and ``caption_column``.
        id_column: join key, matched against ``meta["id"]`` (GTGM: volume name).
        caption_column: caption text column.
        strip_suffixes: suffixes removed from ids before the join (``.nii.gz`` …).
        location_column: optional column of caption locations (``z,y,x`` voxel coordinates of the
            described region); then an id may have several rows and the one nearest to
            ``meta["crop_origin"]`` is chosen (GTGM's ``find_nearest_neighbor`` on the crop origin).
        prefix_name: prefix the caption with the volume name, ``"<name>, <caption>"`` (GTGM L303).

    Raises:
        CaptionError: at lookup, naming the id and the file, when a caption is missing, or when located
            captions are used and the sample carries no ``meta["crop_origin"]``.
        ValueError: at construction, naming the file and the duplicated ids or missing columns.
    """

    def __init__(self, path: str, id_column: str = "id", caption_column: str = "caption",
                 strip_suffixes: tuple[str, ...] = (".nii.gz", ".nii", ".h5", ".hdf", ".tif"),
                 location_column: str | None = None, prefix_name: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption file not found: {self.path}")
        sep = "\t" if self.path.suffix in (".tsv", ".txt") else ","
        df = pd.read_csv(self.path, sep=sep, dtype=str, keep_default_na=False)
        missing = {id_column, caption_column, *([location_column] if location_column else [])} - set(df.columns)
        if missing:
            raise ValueError(f"{self.path}: missing columns {sorted(missing)} (has {list(df.columns)})")
        self.strip_suffixes = strip_suffixes
        self.prefix_name = prefix_name
        self.located = location_column is not None
        ids = df[id_column].map(self._key)
        keys = pd.Series(list(zip(ids, df[location_column]))) if self.located else ids
        dup = ids[keys.duplicated().to_numpy()].tolist()
        if dup:
            raise ValueError(f"{self.path}: duplicate ids {dup[:5]} (rows {list(ids[keys.duplicated().to_numpy()].index[:5] + 2)})")
        empty = df.index[df[caption_column].str.strip() == ""].tolist()
        if empty:
            raise ValueError(f"{self.path}: empty caption in rows {[i + 2 for i in empty[:5]]}")
        self.captions = dict(zip(ids, df[caption_column]))
        self.by_location: dict[str, list[tuple[tuple[float, ...], str]]] = {}
        if self.located:
            for row, (sid, loc, cap) in enumerate(zip(ids, df[location_column], df[caption_column])):
                self.by_location.setdefault(sid, []).append((parse_location(loc, f"{self.path} row {row + 2}"), cap))

    def _key(self, name: str) -> str:
        name = Path(str(name)).name
        for s in self.strip_suffixes:
            if name.endswith(s):
                return name[: -len(s)]
        return name

    def __call__(self, sample: Mapping[str, Any]) -> str:
        meta = sample.get("meta", {})
        sid = self._key(meta.get("id", ""))
        if sid not in self.captions:
            raise CaptionError(f"no caption for sample id {sid!r} in {self.path}")
        caption = self.captions[sid]
        if self.located:
            origin = meta.get("crop_origin")
            if origin is None:
                raise CaptionError(f"{self.path}: located captions need the sample's meta['crop_origin'] (id {sid!r})")
            o = np.asarray(origin, np.float64)
            caption = min(self.by_location[sid], key=lambda lc: float(((np.asarray(lc[0]) - o) ** 2).sum()))[1]
        return f"{sid}, {caption}" if self.prefix_name else caption


class HFImageCaptioner:
    """Caption one random slice with a user-configured ``transformers`` image-to-text model (GTGM: BLIP).

    As GTGM's ``generate_caption``: a uniformly random depth index, the generated text cleaned by
    :func:`text_filter` and prefixed with the volume name (the id up to its first ``.``) as
    ``"<name>, <caption>"``. Deviation: the slice is min–max scaled to 0–255 (the official code multiplies
    an already [0, 1]-scaled slice by 255).

    Args:
        model: hub name or local path (the user's explicit choice; downloads only if allowed).
        prefix_id: prefix the caption with the volume name.
        device: pipeline device.
        seed: seed of the slice choice (None: nondeterministic, as the official ``random.randint``).
        pipe: an already built image-to-text callable (tests, custom models); ``model`` is then unused.
    """

    label_derived: ClassVar[bool] = False

    def __init__(self, model: str = "", prefix_id: bool = True, device: str = "cpu", seed: int | None = None,
                 pipe: Any = None) -> None:
        if pipe is None:
            if not model:
                raise ValueError("captions type hf needs model: <image-to-text model path or hub name>")
            from transformers import pipeline  # lazy: heavy optional import (transformers)

            pipe = pipeline("image-to-text", model=model, device=device)
        self.pipe = pipe
        self.prefix_id = prefix_id
        self.rng = random.Random(seed)

    def __call__(self, sample: Mapping[str, Any]) -> str:

        img = sample["image"]
        arr = img[0, self.rng.randint(0, img.shape[1] - 1)] if img.ndim == 4 else img[0]
        arr = arr.float()
        arr = ((arr - arr.min()) / (arr.max() - arr.min() + 1e-6) * 255).to(torch.uint8).numpy()
        text = text_filter(self.pipe(Image.fromarray(np.asarray(arr)).convert("RGB"))[0]["generated_text"])
        return f"{_volume_name(sample)}, {text}" if self.prefix_id else text


def _volume_name(sample: Mapping[str, Any]) -> str:
    """GTGM's caption prefix: the volume name (the id up to its first ``.``)."""
    return Path(str(sample.get("meta", {}).get("id", ""))).name.split(".")[0]


class ImageStatsCaptioner:
    """Label-free offline captions from one slice of the image (a stand-in for GTGM's BLIP path).

    The caption is a function of the image (and ``seed``) only: the slice index of a volume is drawn from a
    generator seeded by ``seed`` and a hash of the image's bytes (a "random slice", reproducible for the
    same image), the slice is min–max scaled to [0, 1] as :class:`HFImageCaptioner` does before the
    captioner, and the text describes:

    * overall brightness — mean of the scaled slice: ``< 1/3`` "mostly dark", ``< 2/3`` "mid-grey",
      else "mostly bright";
    * up to ``max_spots`` bright and dark spots — connected regions (≥ ``min_area`` pixels) where the
      slice (Gaussian-smoothed, σ 0.7 px) differs from its local median (window ``max(5, max(H, W) // 7)``
      px, which keeps edges and removes small structures) by more than ``threshold`` of the slice's range;
      the strongest first (area × mean difference), each with its place in a 3 × 3 grid of the slice
      (upper/middle/lower × left/centre/right, image coordinates) and its size as a share of the slice
      (< 0.5 % "small", < 2 % "medium", else "large").

    The words come from a fixed vocabulary of brightness, size and position words, so no finding, label or
    report word can appear. Text: ``"<name>, <description>"`` (GTGM's format; ``prefix_id=False`` drops the
    name).

    Args:
        seed: seed of the slice choice.
        prefix_id: prefix the caption with the volume name.
        max_spots: spots described at most (bright and dark together).
        threshold: smallest difference from the local median (share of the slice's range) of a spot.
        min_area: smallest spot in pixels.
    """

    label_derived: ClassVar[bool] = False

    def __init__(self, seed: int = 0, prefix_id: bool = True, max_spots: int = 2, threshold: float = 0.15,
                 min_area: int = 4) -> None:
        if max_spots < 0 or not 0 < threshold < 1 or min_area < 1:
            raise ValueError(f"image_stats captions need max_spots >= 0, 0 < threshold < 1, min_area >= 1; got "
                             f"{max_spots}, {threshold}, {min_area}")
        self.seed, self.prefix_id = int(seed), prefix_id
        self.max_spots, self.threshold, self.min_area = int(max_spots), float(threshold), int(min_area)

    def slice_of(self, image: Any) -> tuple[np.ndarray, int | None]:
        """The 2D slice the caption describes and its depth index (``None`` for a 2D image)."""
        arr = np.asarray(image.detach().cpu().float() if torch.is_tensor(image) else image, np.float32)
        arr = arr[0] if arr.ndim in (3, 4) and arr.shape[0] == 1 else arr  # channel
        if arr.ndim == 2:
            return arr, None
        if arr.ndim != 3:
            raise ValueError(f"image_stats captions need a (1,) H, W or (1,) D, H, W image, got shape {arr.shape}")
        digest = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).digest()
        z = int(np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")]).integers(arr.shape[0]))
        return arr[z], z

    def describe(self, sl: np.ndarray) -> str:
        """Description of one 2D slice (see the class docstring)."""
        from scipy import ndimage  # lazy: heavy import (scipy), only this path needs it

        lo, hi = float(sl.min()), float(sl.max())
        if not np.isfinite([lo, hi]).all():
            raise ValueError("image_stats captions: the image has non-finite values")
        if hi - lo < 1e-6:
            return "a uniform image without distinct spots"
        x = (sl - lo) / (hi - lo)
        mean = float(x.mean())
        tone = "mostly dark" if mean < 1 / 3 else ("mid-grey" if mean < 2 / 3 else "mostly bright")
        smooth = ndimage.gaussian_filter(x, 0.7)
        diff = smooth - ndimage.median_filter(smooth, size=max(5, max(x.shape) // 7))
        spots = []
        for word, region in (("bright", diff > self.threshold), ("dark", diff < -self.threshold)):
            comps, n = ndimage.label(region)
            for c in range(1, n + 1):
                where = comps == c
                area = int(where.sum())
                if area >= self.min_area:
                    cy, cx = ndimage.center_of_mass(where)
                    spots.append((area * float(np.abs(diff[where]).mean()), word, area, cy, cx))
        spots.sort(key=lambda t: -t[0])
        parts = [f"a {self._size(area / x.size)} {word} spot in the {self._where(cy, cx, x.shape)}"
                 for _, word, area, cy, cx in spots[: self.max_spots]]
        return f"a {tone} image with {' and '.join(parts) if parts else 'no distinct spots'}"

    @staticmethod
    def _size(share: float) -> str:
        return "small" if share < 0.005 else ("medium" if share < 0.02 else "large")

    @staticmethod
    def _where(cy: float, cx: float, shape: tuple[int, ...]) -> str:
        row = ("upper", "middle", "lower")[min(2, int(3 * cy / shape[0]))]
        col = ("left", "centre", "right")[min(2, int(3 * cx / shape[1]))]
        return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"

    def __call__(self, sample: Mapping[str, Any]) -> str:
        sl, _ = self.slice_of(sample["image"])
        text = self.describe(sl)
        return f"{_volume_name(sample)}, {text}" if self.prefix_id else text


def build_caption_source(spec: Mapping[str, Any]) -> Any:
    """``{"type": "template"|"file"|"hf"|"image_stats", ...}`` → caption source."""
    spec = dict(spec)
    kind = spec.pop("type", "template")
    sources = {"template": TemplateCaptioner, "file": CaptionFile, "hf": HFImageCaptioner,
               "image_stats": ImageStatsCaptioner}
    if kind not in sources:
        raise ValueError(f"caption source type must be one of {sorted(sources)}, got {kind!r}")
    return sources[kind](**spec)


class CaptionedDataset(Dataset):
    """Wraps a dataset and adds ``caption`` to every sample."""

    def __init__(self, base: Dataset, source: Any) -> None:
        self.base = base
        self.source = source

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.base[i]
        sample["caption"] = self.source(sample)
        return sample


def attach_captions(ds: Dataset, spec: Mapping[str, Any]) -> Dataset:
    """Wrap ``ds`` with the caption source described by ``spec``."""
    return CaptionedDataset(ds, build_caption_source(spec))
