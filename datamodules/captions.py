"""Caption sources for methods that train on generated text (GTGM).

GTGM's official code joins pre-generated captions by volume name (``match_name``) and falls back to
BLIP on a random slice. medvlp offers the same three routes:

* :class:`CaptionFile` – a CSV/TSV ``id,caption`` joined on ``meta["id"]``.
* :class:`TemplateCaptioner` – the offline default: a caption written from metadata/labels.
* :class:`HFImageCaptioner` – a ``transformers`` image-to-text model run on the middle slice (only
  when the user configures a model; nothing is downloaded otherwise).

A spec is ``{"type": "file"|"template"|"hf", ...kwargs}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

MODALITY_WORDS = {"xray": "chest radiograph", "ct": "chest CT volume", "mri": "brain MRI volume",
                  "em": "electron microscopy volume"}


class CaptionError(KeyError):
    """A sample has no caption in the configured source."""


class TemplateCaptioner:
    """Caption from modality and positive labels, e.g. "A chest CT volume showing lung nodule."."""

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
    """Caption the middle slice with a user-configured ``transformers`` image-to-text model (e.g. BLIP).

    Args:
        model: hub name or local path (the user's explicit choice; downloads only if allowed).
        prefix_id: prefix the caption with the sample id, as GTGM's ``generate_caption`` does.
    """

    def __init__(self, model: str, prefix_id: bool = True, device: str = "cpu") -> None:
        from transformers import pipeline

        self.pipe = pipeline("image-to-text", model=model, device=device)
        self.prefix_id = prefix_id

    def __call__(self, sample: Mapping[str, Any]) -> str:
        from PIL import Image

        img = sample["image"]
        arr = img[0, img.shape[1] // 2] if img.ndim == 4 else img[0]
        arr = arr.float()
        arr = ((arr - arr.min()) / (arr.max() - arr.min() + 1e-6) * 255).to(torch.uint8).numpy()
        text = self.pipe(Image.fromarray(np.asarray(arr)).convert("RGB"))[0]["generated_text"]
        return f"{sample.get('meta', {}).get('id', '')}: {text}" if self.prefix_id else text


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
