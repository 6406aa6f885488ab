"""Shared machinery for datamodules over published layouts: record indexing with a bad-input policy,
per-sample loading with a counted skip policy, deterministic split assignment and 2D preprocessing."""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from medvlp.batch import collate
from medvlp.datamodules.base import RecordDataset, VLPDataModule
from medvlp.datamodules.io.readers import DataError, resize_2d  # noqa: F401  (resize_2d: re-exported)
from medvlp.datamodules.io.store import PreparedStore
from medvlp.checks import check_choice
from medvlp.datamodules.base import POLICIES

log = logging.getLogger(__name__)
UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore", "mgca")
# GLoRIA/MGCA per-class uncertainty map (mgca/constants.py); blank → 0
MGCA_UNCERTAIN_MAP = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0, "Pleural Effusion": 1.0}


def apply_uncertainty(values: np.ndarray, names: Sequence[str], policy: str, blank: float | None = 0.0,
                      where: str = "") -> np.ndarray:
    """Map CheXpert-style label values {1, 0, -1, blank} to floats under ``policy``.

    ``ones`` (U-Ones): −1 → 1; ``zeros`` (U-Zeros): −1 → 0; ``ignore`` (U-Ignore): −1 → NaN;
    ``mgca``: the GLoRIA/MGCA per-class map (other classes U-Zeros). Blank → ``blank`` (NaN if None).

    Raises:
        DataError: naming ``where`` and the column when a value is not one of {1, 0, −1, blank}.
    """
    if policy not in UNCERTAINTY_POLICIES:
        raise ValueError(f"uncertainty policy must be one of {UNCERTAINTY_POLICIES}, got {policy!r}")
    out = values.astype(np.float64).copy()
    ok = np.isnan(out) | np.isin(out, (-1.0, 0.0, 1.0))
    if not ok.all():
        r, c = np.argwhere(~ok)[0]
        raise DataError(f"{where}: unknown label value {float(out[r, c])!r} in column {names[c]!r} (row {r + 2})")
    for j, name in enumerate(names):
        col = out[:, j]
        unc = col == -1
        if policy == "ones":
            col[unc] = 1.0
        elif policy == "zeros":
            col[unc] = 0.0
        elif policy == "ignore":
            col[unc] = np.nan
        else:
            col[unc] = MGCA_UNCERTAIN_MAP.get(name, 0.0)
        col[np.isnan(values[:, j].astype(np.float64))] = np.nan if blank is None else blank
    return out.astype(np.float32)


def hash_split(key: str, seed: int, val: float, test: float) -> str:
    """Deterministic split of one id by sha1 rank (train/val/test fractions)."""
    u = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else ("val" if u < test + val else "train")


def duplicate_ids(ids: Iterable[Any]) -> list[Any]:
    """Sorted ids that occur more than once (one pass with a set: linear in the number of ids)."""
    seen: set[Any] = set()
    dup: set[Any] = set()
    for i in ids:
        if i in seen:
            dup.add(i)
        else:
            seen.add(i)
    return sorted(dup, key=str)


def collate_skipping(samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """:func:`medvlp.batch.collate` after dropping skipped (``None``) samples."""
    kept = [s for s in samples if s is not None]
    return collate(kept) if kept else None


class RecordDataModule(VLPDataModule):
    """A datamodule whose splits are lists of records read from the dataset's index files.

    Subclasses implement :meth:`index` (all records, each with a ``split``) and :meth:`load`.

    Args:
        root: dataset folder in its published layout.
        on_error: ``fail`` (default for schema/index errors) or ``skip`` for unreadable samples.
        limit: keep at most this many records per split (quick runs).
        **loader_kwargs: :class:`VLPDataModule` arguments.
    """

    collate_fn = staticmethod(collate_skipping)

    def __init__(self, root: str, on_error: str = "skip", limit: int | None = None, **loader_kwargs: Any) -> None:
        super().__init__(**loader_kwargs)
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"{type(self).__name__}: dataset root {self.root} does not exist")

        self.on_error = check_choice("on_error", on_error, POLICIES, type(self).__name__)
        self.limit = limit
        self._records: list[dict[str, Any]] | None = None
        self.index_skips: Counter[str] = Counter()

    def index(self) -> list[dict[str, Any]]:
        """Every record (dicts with at least ``id`` and ``split``)."""
        raise NotImplementedError

    def load(self, record: Mapping[str, Any], augment: bool) -> dict[str, Any]:
        """One sample in the batch schema."""
        raise NotImplementedError

    def prepared_spec(self, size: int | None = None) -> dict[str, Any]:
        """What ``medvlp prepare`` stores for this datamodule (its kind's spec from
        :mod:`medvlp.datamodules.io.store`); the X-ray and volume bases define it."""
        raise NotImplementedError(f"{type(self).__name__} does not say what `medvlp prepare` stores for it")

    @property
    def store(self) -> PreparedStore | None:
        """The :class:`~medvlp.datamodules.io.store.PreparedStore` of ``prepared`` (``None`` without it)."""
        prepared = getattr(self, "prepared", None)
        if prepared and getattr(self, "_store", None) is None:
            self._store = PreparedStore(prepared, self.name, self.prepared_spec())
        return getattr(self, "_store", None)

    def check_split(self, split: str, recs: Sequence[Any]) -> None:
        """An empty train/test split is an error; an empty val split only disables validation."""
        if not recs:
            if split == "val":
                log.warning("%s: validation split is empty under %s; validation is skipped", type(self).__name__, self.root)
                return
            raise DataError(f"{type(self).__name__}: split {split!r} is empty under {self.root}")

    def records(self, split: str) -> list[dict[str, Any]]:
        """Records of one split (after ``limit``)."""
        if self._records is None:
            self._records = self.index()
            dup = duplicate_ids(r["id"] for r in self._records)
            if dup:
                raise DataError(f"{self.root}: duplicate sample ids {dup[:5]}")
            if self.index_skips:
                log.warning("%s: index skipped %s", type(self).__name__, dict(self.index_skips))
        out = [r for r in self._records if r["split"] == split]
        return out[: self.limit] if self.limit else out

    def build_dataset(self, split: str, augment: bool) -> Dataset:
        recs = self.records(split)
        self.check_split(split, recs)
        return RecordDataset(recs, lambda r: self.load(r, augment), self.on_error, f"{type(self).__name__}/{split}")

    @property
    def dataset_version(self) -> str:
        return f"{type(self).__name__}:{self.root.name}"
