"""Caption sources for methods that train on generated text (GTGM).

GTGM's official code joins pre-generated captions by volume name (``match_name``) and falls back to
BLIP on a random slice. medvlp offers the same three routes:

* :class:`HFImageCaptioner` – the paper path: a ``transformers`` image-to-text model (BLIP in GTGM) sees
  only one random slice of the volume; the caption is ``"<name>, <generated text>"`` after the official
  :func:`text_filter` (``pretrain/utils/utils_trainer.py::generate_caption``). Only runs with a model the
  user configures; nothing is downloaded otherwise.
* :class:`CaptionFile` – a CSV/TSV ``id,caption`` joined on ``meta["id"]`` (pre-generated captions).
* :class:`TemplateCaptioner` – **offline demo only**: a caption written from the ground-truth labels that
  zero-shot and linear-probe evaluation later use, so it leaks labels into pretraining (and is identical for
  every volume of a dataset without labels). It logs a warning when built; the benchmark report marks results
  pretrained on it (:func:`uses_label_derived_captions`).

A spec is ``{"type": "file"|"template"|"hf", ...kwargs}``.
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

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


class CaptionFile:
    """Captions joined by sample id from a CSV/TSV file.

    Args:
        path: file with columns ``id_column`` and ``caption_column``.
        id_column: join key, matched against ``meta["id"]`` (GTGM: volume name).
        caption_column: caption text column.
        strip_suffixes: suffixes removed from ids before the join (``.nii.gz`` …).

    Raises:
        CaptionError: at lookup, naming the id and the file, when a caption is missing.
        ValueError: at construction, naming the file and the duplicated ids or missing columns.
    """

    def __init__(self, path: str, id_column: str = "id", caption_column: str = "caption",
                 strip_suffixes: tuple[str, ...] = (".nii.gz", ".nii", ".h5", ".hdf", ".tif")) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption file not found: {self.path}")
        sep = "\t" if self.path.suffix in (".tsv", ".txt") else ","
        df = pd.read_csv(self.path, sep=sep, dtype=str, keep_default_na=False)
        missing = {id_column, caption_column} - set(df.columns)
        if missing:
            raise ValueError(f"{self.path}: missing columns {sorted(missing)} (has {list(df.columns)})")
        self.strip_suffixes = strip_suffixes
        ids = df[id_column].map(self._key)
        dup = ids[ids.duplicated()].tolist()
        if dup:
            raise ValueError(f"{self.path}: duplicate ids {dup[:5]} (rows {list(ids[ids.duplicated()].index[:5] + 2)})")
        empty = df.index[df[caption_column].str.strip() == ""].tolist()
        if empty:
            raise ValueError(f"{self.path}: empty caption in rows {[i + 2 for i in empty[:5]]}")
        self.captions = dict(zip(ids, df[caption_column]))

    def _key(self, name: str) -> str:
        name = Path(str(name)).name
        for s in self.strip_suffixes:
            if name.endswith(s):
                return name[: -len(s)]
        return name

    def __call__(self, sample: Mapping[str, Any]) -> str:
        sid = self._key(sample.get("meta", {}).get("id", ""))
        if sid not in self.captions:
            raise CaptionError(f"no caption for sample id {sid!r} in {self.path}")
        return self.captions[sid]


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
            from transformers import pipeline

            pipe = pipeline("image-to-text", model=model, device=device)
        self.pipe = pipe
        self.prefix_id = prefix_id
        self.rng = random.Random(seed)

    def __call__(self, sample: Mapping[str, Any]) -> str:
        from PIL import Image

        img = sample["image"]
        arr = img[0, self.rng.randint(0, img.shape[1] - 1)] if img.ndim == 4 else img[0]
        arr = arr.float()
        arr = ((arr - arr.min()) / (arr.max() - arr.min() + 1e-6) * 255).to(torch.uint8).numpy()
        text = text_filter(self.pipe(Image.fromarray(np.asarray(arr)).convert("RGB"))[0]["generated_text"])
        name = Path(str(sample.get("meta", {}).get("id", ""))).name.split(".")[0]
        return f"{name}, {text}" if self.prefix_id else text


def build_caption_source(spec: Mapping[str, Any]) -> Any:
    """``{"type": "template"|"file"|"hf", ...}`` → caption source."""
    spec = dict(spec)
    kind = spec.pop("type", "template")
    sources = {"template": TemplateCaptioner, "file": CaptionFile, "hf": HFImageCaptioner}
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
