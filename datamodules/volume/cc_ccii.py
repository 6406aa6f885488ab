"""CC-CCII: chest CT scans of the China Consortium of Chest CT Image Investigation (Zhang et al., "Clinically
Applicable AI System for Accurate Diagnosis, Quantitative Measurements, and Prognosis of COVID-19 Pneumonia Using
Computed Tomography", Cell 2020; released by the China National Center for Bioinformation, ncov-ai.big.ac.cn).
Three classes: novel coronavirus pneumonia (NCP), common pneumonia (CP), normal controls (Normal). UniMedI's 3D
classification data.

What the published sources establish (and what this loader assumes) is listed in :class:`CCCCIIDataModule`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medvlp.checks import check_choice
from medvlp.datamodules.io.readers import DataError
from medvlp.datamodules.tabular import hash_split
from medvlp.datamodules.volume.base import ReadVolumed, VolumeDataModule
from medvlp.datamodules.xray.chest import read_csv
from medvlp.registry import register_datamodule
from PIL import Image

CLASSES = ("NCP", "CP", "Normal")
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
TABLE_COLUMNS = ["label", "patient_id", "scan_id"]
_NUMBERS = re.compile(r"\d+")


def slice_files(scan_dir: Path) -> list[Path]:
    """The slice images of one scan folder (``.png``/``.jpg``/``.jpeg``), in numeric file-name order
    (``2.png`` before ``10.png``; the numbers in the stem compare as integers, ties by name)."""
    files = [p for p in scan_dir.iterdir() if p.is_file() and p.suffix.lower() in SLICE_SUFFIXES]
    return sorted(files, key=lambda p: ([int(n) for n in _NUMBERS.findall(p.stem)], p.name))


def read_slice_stack(scan_dir: str | Path) -> np.ndarray:
    """Stack a scan folder's slices (numeric file-name order) into a ``(D, H, W)`` float32 array of grey values.

    Raises:
        DataError: naming the folder when it holds no slice, naming the file when a slice cannot be decoded,
            or naming both shapes when slices differ in size.
    """

    scan_dir = Path(scan_dir)
    if not scan_dir.is_dir():
        raise DataError(f"{scan_dir}: scan folder not found")
    files = slice_files(scan_dir)
    if not files:
        raise DataError(f"{scan_dir}: no slice images ({', '.join(SLICE_SUFFIXES)})")
    slices = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
        except Exception as exc:  # PIL raises several types for truncated/corrupt files
            raise DataError(f"{f}: cannot read slice ({type(exc).__name__}: {exc})") from exc
        if slices and arr.shape != slices[0].shape:
            raise DataError(f"{f}: slice of shape {arr.shape} in a scan whose first slice {files[0].name} is "
                            f"{slices[0].shape}")
        slices.append(arr)
    return np.stack(slices)


class ReadSliceStackd(MapTransform):
    """Read ``record[key]`` (a scan folder of 2D slices) into a ``(1, x, y, z)`` MetaTensor with an identity
    affine (MONAI's axis order; :meth:`VolumeDataModule.to_sample` turns it back into ``(C, D, H, W)``)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            dhw = read_slice_stack(d[key])
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(dhw.transpose(2, 1, 0)))[None],
                                affine=torch.eye(4, dtype=torch.float64))
        return d


@register_datamodule("cc_ccii")
class CCCCIIDataModule(VolumeDataModule):
    """CC-CCII 3-class CT classification (NCP / CP / Normal), image only, one-hot ``labels``.

    Layout under ``root`` (or ``root/images``, where some download scripts unzip it):
    ``<class>/<patient_id>/<scan_id>/<slice>.png|.jpg`` with ``<class>`` in ``NCP``, ``CP``, ``Normal``, plus
    ``unzip_filenames.csv`` (columns ``zip_file, label, patient_id, scan_id, n_slice``) in ``root``. Each scan
    folder is one sample: its slices, in numeric file-name order, stacked into ``(D, H, W)`` and resized to
    ``volume_size``. Grey values are 8-bit image values (already windowed by the release), so the default
    ``window`` is ``[0, 255]``; the slice images carry no spacing or orientation (identity affine,
    ``orientation`` off).

    Sources, and what each one establishes:

    * **Confirmed (COVIDx-CT's data instructions and ``cncb`` preparation code, which read the release):** the
      release is zip files per class; extracted, ``root`` holds ``CP/``, ``NCP/``, ``Normal/``,
      ``unzip_filenames.csv`` and ``lesions_slices.csv``; scans sit at ``<class>/<patient_id>/<scan_id>/`` as
      image files; ``unzip_filenames.csv`` has ``label``, ``patient_id``, ``scan_id``; ``lesions_slices.csv``
      lists slice paths ``<class>/<patient_id>/<scan_id>/<file>`` (only lesion slices of NCP/CP scans; not used
      here: a scan is classified as a whole).
    * **Confirmed (third-party download checks over ``unzip_filenames.csv``):** its columns are ``zip_file,
      label, patient_id, scan_id, n_slice``; ``n_slice`` is the number of files in the scan folder; one zip
      (``NCP-13.zip``) is reported broken, so incomplete folders do occur.
    * **Assumed:** slice file names carry the slice number (sorted numerically, as the brief for this loader
      states; the exact names, e.g. ``0000.png`` vs ``0.jpg``, were not seen). No official train/val/test split
      or patient list is published with the release; the split here is by patient (sha1 of ``patient_id`` with ``seed``,
      ``val_fraction``, ``test_fraction``), so no patient crosses splits. Whether patient ids are unique across
      the class folders was not seen: the split keys on the id alone, so a shared id keeps its scans together
      (at worst two patients are grouped; never one patient split). The cleaned subset
      some papers use ("Clean-CC-CCII"; its cleaning rules and files were not read here) is assumed to keep the
      same ``<class>/<patient>/<scan>/`` folders; it is read with ``table: null`` (folder walk) when it
      ships without ``unzip_filenames.csv``. UniMedI's own CC-CCII split and preprocessing are not recoverable
      offline.

    Index: with ``table`` present (default ``unzip_filenames.csv``) the scans are its rows; otherwise every
    ``<class>/<patient>/<scan>/`` folder on disk. Bad input: a table without the needed columns or a row whose
    ``label`` is not one of the classes is a :class:`DataError` naming the file and row; a slice that cannot
    be decoded (or differs in size from the scan's first slice) is a :class:`DataError` naming the file when the
    sample is read (``on_error: skip`` counts and logs it instead). Counted, logged index skips (``index_skips``):
    ``missing_scan`` (a table row whose folder is absent, e.g. a broken zip), ``empty_scan`` (a scan folder with
    no slice image), ``duplicate_row`` (a row naming an already indexed scan) and ``incomplete_scan`` (the folder
    holds another number of slice images than the row's ``n_slice``: a partly extracted zip would otherwise be
    a silently shorter volume; ``incomplete_scan: skip`` (default), ``fail`` raises naming the row, ``keep``
    reads what is there). An ``n_slice`` cell that is not a count is a :class:`DataError` naming the row.

    Args:
        root: dataset folder.
        table: scan table relative to ``root`` (``None``: walk the class folders).
        val_fraction: share of patients in the validation split.
        test_fraction: share of patients in the test split.
        seed: split seed.
        incomplete_scan: ``skip`` | ``fail`` | ``keep`` for scans whose slice count differs from ``n_slice``.
        window: grey-value window mapped to [0, 1] (default ``[0, 255]``, the 8-bit slice range).
    """

    name = "cc_ccii"

    def __init__(self, root: str, table: str | None = "unzip_filenames.csv", val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0, window: Sequence[float] | None = (0.0, 255.0),
                 orientation: bool = False, incomplete_scan: str = "skip", **kwargs: Any) -> None:
        super().__init__(root, window=window, orientation=orientation, **kwargs)
        self.table = table
        self.incomplete_scan = check_choice("incomplete_scan", incomplete_scan, ("skip", "fail", "keep"),
                                            type(self).__name__)
        self.val_fraction, self.test_fraction, self.seed = float(val_fraction), float(test_fraction), int(seed)

    @property
    def label_names(self) -> list[str]:
        return list(CLASSES)

    def deterministic_steps(self) -> list[Any]:
        """The volume pipeline with the slice-folder reader in place of the file reader."""
        steps = super().deterministic_steps()
        return [ReadSliceStackd(["image"]) if isinstance(s, ReadVolumed) else s for s in steps]

    def image_root(self) -> Path:
        """``root``, or ``root/images`` when the class folders are there."""
        if not any((self.root / c).is_dir() for c in CLASSES) and any((self.root / "images" / c).is_dir()
                                                                       for c in CLASSES):
            return self.root / "images"
        return self.root

    def scans(self) -> list[tuple[str, str, str, str, int | None]]:
        """``(class, patient_id, scan_id, where, n_slice)`` of every scan, from the table or the folders
        (``n_slice``: the table's slice count, ``None`` without that column or table).

        Raises:
            DataError: a table without ``label``/``patient_id``/``scan_id``, a row with an unknown class, or
                no class folder at all (folder walk).
        """
        if self.table and (self.root / self.table).is_file():
            path = self.root / self.table
            rows = read_csv(path, TABLE_COLUMNS, dtype=str, keep_default_na=False).to_dict("records")
            out = []
            for k, row in enumerate(rows):
                where = f"{path}: row {k + 2}"
                label = str(row["label"]).strip()
                if label not in CLASSES:
                    raise DataError(f"{where}: label {row['label']!r} is not one of {', '.join(CLASSES)}")
                n_slice = str(row.get("n_slice", "")).strip()
                if n_slice and not n_slice.isdigit():
                    raise DataError(f"{where}: n_slice {n_slice!r} is not a slice count")
                out.append((label, str(row["patient_id"]).strip(), str(row["scan_id"]).strip(), where,
                            int(n_slice) if n_slice else None))
            return out
        base = self.image_root()
        if not any((base / c).is_dir() for c in CLASSES):
            raise DataError(f"{self.root}: no class folder ({', '.join(CLASSES)}) and no {self.table or 'scan table'}")
        return [(c, p.name, s.name, str(s), None) for c in CLASSES if (base / c).is_dir()
                for p in sorted(x for x in (base / c).iterdir() if x.is_dir())
                for s in sorted(x for x in p.iterdir() if x.is_dir())]

    def index(self) -> list[dict[str, Any]]:
        base, out, seen = self.image_root(), [], set()
        for label, patient, scan, where, n_slice in self.scans():
            folder = base / label / patient / scan
            if not folder.is_dir():
                self.index_skips["missing_scan"] += 1
                continue
            n_found = len(slice_files(folder))
            if not n_found:
                self.index_skips["empty_scan"] += 1
                continue
            if n_slice is not None and n_found != n_slice and self.incomplete_scan != "keep":
                if self.incomplete_scan == "fail":
                    raise DataError(f"{where}: n_slice is {n_slice} but {folder} holds {n_found} slice images")
                self.index_skips["incomplete_scan"] += 1
                continue
            key = f"{label}/{patient}/{scan}"
            if key in seen:
                self.index_skips["duplicate_row"] += 1
                continue
            seen.add(key)
            onehot = np.zeros(len(CLASSES), np.float32)
            onehot[CLASSES.index(label)] = 1.0
            out.append({"id": key, "image": folder, "labels": onehot, "patient": patient,
                        "split": hash_split(patient, self.seed, self.val_fraction, self.test_fraction)})
        return out
