"""BIMCV-R: 8,069 chest CT volumes with radiology reports (Chen et al., "BIMCV-R: A Landmark Dataset for 3D CT
Text-Image Retrieval", MICCAI 2024; Hugging Face ``cyd0806/BIMCV-R``). UniMedI's 3D pretraining data.

What the published sources establish (and what this loader assumes) is listed in :class:`BIMCVRDataModule`.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medvlp.checks import check_choice
from medvlp.datamodules.io.readers import DataError
from medvlp.datamodules.tabular import hash_split
from medvlp.datamodules.volume.base import VolumeDataModule
from medvlp.datamodules.xray.chest import read_csv
from medvlp.registry import register_datamodule

# Report tables, first found wins: the dataset card's file, MedFinder's, the metadata table of ``meta_1.zip``.
REPORT_TABLES = ("BIMCV-R.csv", "meta/curated_ct_report_path_En.csv", "meta/BIMCV_meta.csv",
                 "curated_ct_report_path_En.csv", "BIMCV_meta.csv")
TEXT_COLUMNS = {"en": "Report_en", "es": "Report"}
# The 10 most frequent findings of the ``Labels`` column of BIMCV_meta.csv (counts printed in
# fitushar/HAID BIMCVR/BIMCV_DataAnalysis.ipynb; "unchanged" is a comparison, not a finding, and left out).
DEFAULT_LABELS = ("ground glass pattern", "pneumonia", "covid 19", "nodule", "pleural effusion", "adenopathy",
                  "vertebral degenerative changes", "calcified densities", "consolidation", "emphysema")
_BIDS = re.compile(r"(?:^|_)(sub-[^_]+)_(ses-[^_]+)")


def bids_ids(filename: str) -> tuple[str, str] | None:
    """``(sub-…, ses-…)`` from a BIMCV volume name such as ``sub-S09754_ses-E22857_acq-1_run-2_bp-chest_ct.nii.gz``
    (``None`` when the name carries no BIDS subject/session)."""
    m = _BIDS.search(filename)
    return (m.group(1), m.group(2)) if m else None


@register_datamodule("bimcv_r")
class BIMCVRDataModule(VolumeDataModule):
    """BIMCV-R chest CT volumes + reports (English machine translation or the Spanish original).

    Layout under ``root``:

    * volumes ``CT*/ct/<name>.nii.gz`` (or ``*/CT*/ct/``, where HSENet's unzip script puts them), found by
      file name;
    * one report table (``reports_csv``, default: the first of ``BIMCV-R.csv``,
      ``meta/curated_ct_report_path_En.csv``, ``meta/BIMCV_meta.csv`` that exists) whose volume column
      (``ct_path`` when present, else ``path``) names each row's volume; only its file name is used.

    Sources, and what each one establishes:

    * **Confirmed (dataset card):** CT scans are stored in folders prefixed ``CT``; the reports are in
      ``BIMCV-R.csv``; 8,069 volumes.
    * **Confirmed (official code, ydchen0806/MedFinder ``main_ddp.py``, by the dataset's first author):** volumes
      are globbed as ``CT*/ct/*.nii.gz`` and matched to table rows by the file name of the ``path`` column of
      ``meta/curated_ct_report_path_En.csv``; the text is ``Report_en``; split = table row order, first 70 %
      train, next 10 % val, rest test (``split_convention: medfinder``).
    * **Confirmed (third-party copies of the metadata table, fitushar/HAID ``BIMCVR/metadata/bimcv_*.csv``,
      split from ``BIMCV_meta.csv``):** columns ``PatientID, ReportID, Report`` (Spanish), ``Labels`` (a
      Python list literal of finding names, some with a leading space), ``Localizations, …, path`` (a
      folder), ``Report_en`` (machine translation), ``ct_path`` (the volume file,
      ``sub-S…_ses-E…[_acq-N]_run-N_bp-chest_ct.nii.gz``); 5,340 patients.
    * **Assumed:** that ``BIMCV-R.csv`` has the columns of ``BIMCV_meta.csv`` (a third-party audit of the
      official ``BIMCV-R.csv`` names its ``PatientID``/``ReportID`` columns and 7,518 rows; its text and volume
      columns were not seen). No official train/val/test split is published; the default split here is by
      patient (sha1 of ``PatientID``, else the volume's ``sub-`` id).

    Bad input: a missing table, a missing column, a volume cell that is not a ``.nii``/``.nii.gz`` name, an
    unparsable ``Labels`` cell, or two volumes of the same name in different ``CT*`` folders is a
    :class:`DataError` naming the file (and row). Counted, logged index skips (``index_skips``):
    ``missing_volume`` (row whose volume is not on disk, e.g. an incomplete download; ``missing_volume: fail``
    makes it an error), ``empty_report``, ``duplicate_row`` (a later row naming an already indexed volume) and
    ``id_mismatch``: the same audit found 1,332 of 7,518 rows whose ``PatientID``/``ReportID`` differ from the
    ``sub-``/``ses-`` ids in the volume name (report and image of different studies); ``id_mismatch: skip``
    (default) drops them, ``fail`` raises naming the row, ``keep`` trains on them.

    Args:
        root: dataset folder.
        reports_csv: report table relative to ``root`` (``None``: the first of the known names that exists).
        language: ``en`` (``Report_en``) or ``es`` (``Report``, the original Spanish).
        labels: finding names read from ``Labels`` (case- and space-insensitive) as multi-hot targets; used
            only when the table has a ``Labels`` column.
        split_convention: ``patient`` (hash of the patient id with ``val_fraction``/``test_fraction``) or
            ``medfinder`` (row order 70/10/20 as MedFinder; patients can straddle splits there).
        window: HU window mapped to [0, 1]; default [-1000, 1000] as CT-RATE (not from a BIMCV-R source:
            MedFinder min–max scales each volume, HSENet clips [-1000, 200]).
    """

    name = "bimcv_r"

    def __init__(self, root: str, reports_csv: str | None = None, language: str = "en",
                 labels: Sequence[str] = DEFAULT_LABELS, split_convention: str = "patient", val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0, id_mismatch: str = "skip", missing_volume: str = "skip",
                 window: Sequence[float] = (-1000.0, 1000.0), **kwargs: Any) -> None:
        super().__init__(root, window=window, **kwargs)
        owner = type(self).__name__
        self.language = check_choice("language", language, tuple(TEXT_COLUMNS), owner)
        self.split_convention = check_choice("split_convention", split_convention, ("patient", "medfinder"), owner)
        self.id_mismatch = check_choice("id_mismatch", id_mismatch, ("skip", "fail", "keep"), owner)
        self.missing_volume = check_choice("missing_volume", missing_volume, ("skip", "fail"), owner)
        self.reports_csv = reports_csv
        self.labels = [str(x).strip().lower() for x in labels]
        self.val_fraction, self.test_fraction, self.seed = float(val_fraction), float(test_fraction), int(seed)
        self._has_labels: bool | None = None

    @property
    def label_names(self) -> list[str]:
        """``labels`` when the table has a ``Labels`` column, else none."""
        if self._has_labels is None:
            self._has_labels = "Labels" in read_csv(self.table_path(), [], nrows=0).columns
        return list(self.labels) if self._has_labels else []

    def table_path(self) -> Path:
        """The report table in use.

        Raises:
            DataError: when ``reports_csv`` is missing, or none of the known tables exists.
        """
        if self.reports_csv:
            return self.root / self.reports_csv
        for name in REPORT_TABLES:
            if (self.root / name).is_file():
                return self.root / name
        raise DataError(f"{self.root}: no BIMCV-R report table (looked for {', '.join(REPORT_TABLES)}); "
                        "set reports_csv")

    def volumes(self) -> dict[str, Path]:
        """Volume file name → path, over every ``CT*/ct/`` folder below ``root``.

        Raises:
            DataError: when two folders hold a volume of the same name (rows could not be matched).
        """
        found: dict[str, Path] = {}
        for p in sorted(self.root.glob("CT*/ct/*.nii*")) + sorted(self.root.glob("*/CT*/ct/*.nii*")):
            if p.name in found and found[p.name] != p:
                raise DataError(f"{self.root}: volume name {p.name} occurs twice ({found[p.name]} and {p}); "
                                "rows are matched by file name")
            found[p.name] = p
        if not found:
            raise DataError(f"{self.root}: no volumes under CT*/ct/*.nii.gz")
        return found

    def _labels(self, cell: str, where: str) -> np.ndarray:
        try:
            names = ast.literal_eval(cell) if cell.strip() else []
        except (ValueError, SyntaxError) as exc:
            raise DataError(f"{where}: Labels is not a list literal ({cell[:60]!r})") from exc
        if not isinstance(names, (list, tuple)):
            raise DataError(f"{where}: Labels is not a list ({cell[:60]!r})")
        present = {str(n).strip().lower() for n in names}
        return np.asarray([float(name in present) for name in self.labels], np.float32)

    def index(self) -> list[dict[str, Any]]:
        path = self.table_path()
        text_col = TEXT_COLUMNS[self.language]
        head = read_csv(path, [], nrows=0)
        vol_col = "ct_path" if "ct_path" in head.columns else "path"
        table = read_csv(path, [vol_col, text_col], dtype=str, keep_default_na=False)
        self._has_labels = "Labels" in table.columns
        has_ids = {"PatientID", "ReportID"} <= set(table.columns)
        volumes = self.volumes()
        n, out, seen = len(table), [], set()
        for k, row in enumerate(table.to_dict("records")):
            where = f"{path}: row {k + 2}"
            name = Path(str(row[vol_col]).strip()).name
            if not name.endswith((".nii", ".nii.gz")):
                raise DataError(f"{where}: column {vol_col!r} must name a .nii/.nii.gz volume, got {row[vol_col]!r}")
            if name not in volumes:
                if self.missing_volume == "fail":
                    raise DataError(f"{where}: volume {name} not found under {self.root}/CT*/ct/")
                self.index_skips["missing_volume"] += 1
                continue
            ids = bids_ids(name)
            if has_ids and ids and (row["PatientID"].strip(), row["ReportID"].strip()) != ids:
                if self.id_mismatch == "fail":
                    raise DataError(f"{where}: PatientID/ReportID {row['PatientID']}/{row['ReportID']} do not match "
                                    f"the volume {name}")
                if self.id_mismatch == "skip":
                    self.index_skips["id_mismatch"] += 1
                    continue
            text = " ".join(str(row[text_col]).split())
            if not text:
                self.index_skips["empty_report"] += 1
                continue
            if name in seen:
                self.index_skips["duplicate_row"] += 1
                continue
            seen.add(name)
            patient = (row.get("PatientID") or "").strip() or (ids[0] if ids else name)
            if self.split_convention == "medfinder":  # main_ddp.py: rows [0, .7n) train, [.7n, .8n) val, rest test
                split = "train" if k < int(n * 0.7) else ("val" if k < int(n * 0.8) else "test")
            else:
                split = hash_split(patient, self.seed, self.val_fraction, self.test_fraction)
            rec: dict[str, Any] = {"id": name.split(".nii")[0], "split": split, "image": volumes[name],
                                   "text": text, "patient": patient}
            if self._has_labels:
                rec["labels"] = self._labels(str(row["Labels"]), where)
            out.append(rec)
        return out
