"""``data=csv``: bring your own dataset as a CSV or Parquet manifest, no code needed.

One row per sample: an image path (2D PNG/JPEG/DICOM, or a 3D NIfTI/HDF5/TIFF volume), a report text
and/or label columns, and optionally a split column. Paths are relative to ``root`` (default: the
manifest's folder). 2D images get the X-ray preprocessing (grey, resize longer side + pad to
``image_size``); volumes get the MONAI pipeline of :class:`~medvlp.datamodules.volume.base.VolumeDataModule`
(``volume_size``, ``window``, ``pixdim``, ``cache`` …).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medvlp.checks import check_choice
from medvlp.datamodules.io.store import image2d_spec, volume_spec
from medvlp.datamodules.io.readers import DataError, read_image_2d
from medvlp.datamodules.tabular import UNCERTAINTY_POLICIES, RecordDataModule, apply_uncertainty, hash_split, resize_2d
from medvlp.datamodules.volume.base import VolumeDataModule, add_record_targets
from medvlp.registry import register_datamodule
import pandas as pd

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
NORM_MEAN, NORM_STD = 0.5, 0.25


def read_manifest(path: Path) -> Any:
    """Read a ``.csv`` (or ``.tsv``) or ``.parquet`` manifest as a DataFrame of strings/numbers.

    Raises:
        FileNotFoundError: naming the manifest.
        ImportError: a Parquet manifest without a Parquet engine (pyarrow or fastparquet).
        DataError: an unreadable or empty manifest.
    """

    if not path.is_file():
        raise FileNotFoundError(f"csv datamodule: manifest {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            try:
                df = pd.read_parquet(path)
            except ImportError as exc:
                raise ImportError(f"{path}: Parquet manifests need pyarrow or fastparquet (pip install pyarrow): {exc}") from exc
        else:
            df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", keep_default_na=True)
    except (ImportError, FileNotFoundError):
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read manifest ({type(exc).__name__}: {exc})") from exc
    if df.empty:
        raise DataError(f"{path}: manifest has no rows")
    return df


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip())


@register_datamodule("csv")
class CSVDataModule(VolumeDataModule):
    """Your own image–report (or image–label) dataset from a manifest file.

    Bad input follows the policy of the other loaders: a missing manifest, a missing column, an unknown
    split name, a label value outside {1, 0, −1, blank} or a duplicate id is an error naming the file, row
    and column; a row without an image path or (when ``text_column`` is set) with an empty report is
    skipped, counted and logged at index time (``on_error="fail"`` makes it an error); an unreadable image
    is skipped and counted at load time (or an error with ``on_error="fail"``).

    Without a report column, ``text_from_labels`` writes one sentence per sample from its positive labels
    ("Findings: a, b." / "No findings.") so that a labels-only dataset can still be pretrained on; that is
    a label-derived caption, not a report, and the README says so.

    Args:
        manifest: path of the ``.csv``/``.tsv``/``.parquet`` manifest.
        image_column: column with the image/volume path (relative to ``root``; ``path.h5:key`` for HDF5).
        text_column: column with the report text, or ``None``.
        label_columns: binary label columns (1 positive, 0 negative, −1 uncertain, blank unknown).
        split_column: column with ``train``/``val``/``test`` (``valid``/``validation`` accepted); ``None`` or
            absent: a deterministic hash split of the ids (``val_fraction``, ``test_fraction``, ``split_seed``).
        id_column: column with unique sample ids (default: the image path).
        spatial_dims: 2 (images) or 3 (volumes).
        image_size: 2D side length after resize + pad.
        modality: ``xray`` (2D default) | ``ct`` | ``mri`` (3D default) | ``em``; CT reads HU.
        uncertain: policy for −1 labels (``ones`` | ``zeros`` | ``ignore`` | ``mgca``).
        text_from_labels: caption from labels when there is no ``text_column``.
        val_fraction: hash-split validation share.
        test_fraction: hash-split test share.
        split_seed: hash-split seed.
        root: folder the paths are relative to (default: the manifest's folder).
        **kwargs: :class:`~medvlp.datamodules.volume.base.VolumeDataModule` arguments (``volume_size``,
            ``window``, ``pixdim``, ``resize``, ``cache``, ``nonfinite``, ``on_error``, ``limit``,
            ``batch_size`` …).
    """

    name = "csv"

    def __init__(self, manifest: str, image_column: str = "image", text_column: str | None = "report",
                 label_columns: Sequence[str] | None = None, split_column: str | None = "split",
                 id_column: str | None = None, spatial_dims: int = 2, image_size: int = 224,
                 modality: str | None = None, uncertain: str = "zeros", text_from_labels: bool = True,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
                 root: str | None = None, **kwargs: Any) -> None:
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise FileNotFoundError(f"csv datamodule: manifest {self.manifest} does not exist")
        super().__init__(str(root or self.manifest.parent), **kwargs)
        self.dims = int(check_choice("spatial_dims", spatial_dims, (2, 3), "CSVDataModule"))
        self.modality = modality or ("xray" if self.dims == 2 else "mri")
        check_choice("modality", self.modality, ("xray", "ct", "mri", "em"), "CSVDataModule")
        self.uncertain = check_choice("uncertain", uncertain, UNCERTAINTY_POLICIES, "CSVDataModule")
        self.image_column, self.text_column, self.split_column, self.id_column = (
            image_column, text_column, split_column, id_column)
        self.label_columns = list(label_columns or [])
        self.image_size = int(image_size)
        self.text_from_labels = text_from_labels
        self.val_fraction, self.test_fraction, self.split_seed = float(val_fraction), float(test_fraction), int(split_seed)
        if not self.label_columns and not self.text_column:
            raise ValueError("csv datamodule needs text_column and/or label_columns")

    # ------------------------------------------------------------------------------ data description
    @property
    def spatial_dims(self) -> int:
        return self.dims

    def prepared_spec(self, size: int | None = None) -> dict[str, Any]:
        """2D manifests are stored as 2D images, 3D ones as volumes (see :mod:`medvlp.datamodules.io.store`)."""
        return image2d_spec(self, size) if self.dims == 2 else volume_spec(self)

    @property
    def label_names(self) -> list[str]:
        return list(self.label_columns)

    @property
    def dataset_version(self) -> str:
        return f"csv:{self.manifest.name}:{hashlib.sha1(self.manifest.read_bytes()).hexdigest()[:12]}"

    def encoder_hints(self) -> dict[str, Any]:
        if self.dims == 2:
            return {"spatial_dims": [2], "img_size_2d": self.image_size}
        return super().encoder_hints()

    # ------------------------------------------------------------------------------ index
    def index(self) -> list[dict[str, Any]]:
        df = read_manifest(self.manifest)
        wanted = [self.image_column, *self.label_columns] + [c for c in (self.text_column, self.id_column) if c]
        missing = [c for c in wanted if c not in df.columns]
        if missing:
            raise DataError(f"{self.manifest}: missing column(s) {missing}; columns are {list(df.columns)}")
        use_split = bool(self.split_column) and self.split_column in df.columns
        labels = None
        if self.label_columns:
            try:
                raw = df[self.label_columns].apply(lambda col: col.map(lambda v: np.nan if _blank(v) else float(v))).to_numpy()
            except ValueError as exc:
                raise DataError(f"{self.manifest}: non-numeric label value ({exc})") from exc
            labels = apply_uncertainty(raw, self.label_columns, self.uncertain, blank=None, where=str(self.manifest))
        records = []
        for i, row in enumerate(df.to_dict("records")):
            where = f"{self.manifest} row {i + 2}"  # 1-based with the header line
            if _blank(row[self.image_column]):
                self._index_skip("no_image_path", f"{where}: empty {self.image_column!r}")
                continue
            text = None
            if self.text_column:
                if _blank(row[self.text_column]):
                    self._index_skip("empty_report", f"{where}: empty {self.text_column!r}")
                    continue
                text = " ".join(str(row[self.text_column]).split())
            rec: dict[str, Any] = {"image": self._path(str(row[self.image_column])),
                                   "id": str(row[self.id_column]) if self.id_column else str(row[self.image_column])}
            if use_split:
                name = str(row[self.split_column]).strip().lower()
                if name not in SPLIT_NAMES:
                    raise DataError(f"{where}: split {row[self.split_column]!r} is not one of train/val/test")
                rec["split"] = SPLIT_NAMES[name]
            else:
                rec["split"] = hash_split(rec["id"], self.split_seed, self.val_fraction, self.test_fraction)
            if labels is not None:
                rec["labels"] = labels[i]
                if text is None and self.text_from_labels:
                    text = self.caption_from_labels(labels[i])
            if text is not None:
                rec["text"] = text
            records.append(rec)
        return records

    def _path(self, value: str) -> Path | str:
        if ":" in value and not Path(value).exists() and Path(value.rsplit(":", 1)[0]).suffix in (".h5", ".hdf", ".hdf5"):
            path, key = value.rsplit(":", 1)
            return f"{self.root / path}:{key}"
        return self.root / value

    def _index_skip(self, reason: str, message: str) -> None:
        if self.on_error == "fail":
            raise DataError(message)
        self.index_skips[reason] += 1

    def caption_from_labels(self, labels: np.ndarray) -> str:
        """``"Findings: a, b."`` for the positive labels, ``"No findings."`` when none is positive."""
        pos = [n for n, v in zip(self.label_columns, labels) if v == 1.0]
        return f"Findings: {', '.join(p.lower() for p in pos)}." if pos else "No findings."

    # ------------------------------------------------------------------------------ loading
    def build_dataset(self, split: str, augment: bool) -> Dataset:
        if self.dims == 3:
            return super().build_dataset(split, augment)
        return RecordDataModule.build_dataset(self, split, augment)

    def load(self, record: Mapping[str, Any], augment: bool) -> dict[str, Any]:
        """One sample in the batch schema: 2D through the image reader, 3D through the MONAI volume pipeline
        (:meth:`VolumeDataModule.load <medvlp.datamodules.volume.base.VolumeDataModule.load>`)."""
        if self.dims == 3:
            return super().load(record, augment)
        img = resize_2d(read_image_2d(record["image"], nonfinite=self.nonfinite), self.image_size)
        if augment:
            img = img * (1 + 0.1 * (2 * torch.rand(1) - 1)) + 0.1 * (2 * torch.rand(1) - 1)
        sample: dict[str, Any] = {"image": (img - NORM_MEAN) / NORM_STD, "modality": self.modality,
                                  "meta": {"id": record["id"], "path": str(record["image"])}}
        return add_record_targets(sample, record, self.label_names)
