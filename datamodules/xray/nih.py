"""NIH ChestX-ray14 (``Data_Entry_2017.csv`` layout)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medvlp.datamodules.io.readers import DataError
from medvlp.datamodules.tabular import hash_split
from medvlp.datamodules.xray.chest import XrayDataModule, read_csv
from medvlp.registry import register_datamodule

NIH_14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
          "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


@register_datamodule("nih_chestxray14")
class NIHChestXray14DataModule(XrayDataModule):
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` (``Image Index``, ``Finding Labels`` joined by ``|``,
    ``Patient ID``), ``train_val_list.txt``/``test_list.txt`` and PNGs anywhere under ``root`` (``images/``
    or the Kaggle ``images_001/images/`` … folders).

    Labels: the 14 findings as multi-hot (``No Finding`` = all zero). Splits:

    * ``official`` (default): ``test_list.txt`` is the test split; ``val_fraction`` (0.1, as ASG's README:
      "split 10% of original training set for validation") of the ``train_val_list.txt`` *patients*
      become validation by sha1 rank of the patient id (no patient in two splits);
    * ``benchx``: BenchX's/KAD's ``train_list.txt``, ``val_list.txt``, ``test_list.txt`` in ``root`` (first
      token of each line is the image name; labels still come from ``Data_Entry_2017.csv``).

    Label fractions for BenchX's tables come from its ``train_1.txt``/``train_10.txt`` files
    (``fraction_source: file``). Images listed in a split file but missing on disk are counted
    (``index_skips["missing_image"]``) and logged.

    Raises:
        DataError: naming the file for a missing table or list, unknown finding names, or an image listed
            in two splits.
    """

    name = "nih_chestxray14"
    SPLIT_CONVENTIONS = ("official", "benchx")

    def __init__(self, root: str, val_fraction: float = 0.1, split_convention: str = "official",
                 **kwargs: Any) -> None:
        super().__init__(root, split_convention=split_convention, **kwargs)
        self.val_fraction = val_fraction

    @property
    def label_names(self) -> list[str]:
        return list(NIH_14)

    def _list(self, name: str) -> list[str]:
        path = self.root / name
        if not path.is_file():
            raise DataError(f"{path}: file not found (split_convention {self.split_convention!r} needs it)")
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]

    def index(self) -> list[dict[str, Any]]:
        table = self.root / "Data_Entry_2017.csv"
        df = read_csv(table, ["Image Index", "Finding Labels", "Patient ID"])
        labels, patient = {}, {}
        for row_no, (img, findings, pid) in enumerate(zip(df["Image Index"], df["Finding Labels"], df["Patient ID"]), 2):
            names = [f for f in str(findings).split("|") if f and f != "No Finding"]
            unknown = [f for f in names if f not in NIH_14]
            if unknown:
                raise DataError(f"{table}: row {row_no}: unknown finding(s) {unknown} for {img}")
            labels[str(img)] = np.array([float(c in names) for c in NIH_14], np.float32)
            patient[str(img)] = str(pid)
        if self.split_convention == "benchx":
            split_of = {}
            for split, name in (("train", "train_list.txt"), ("val", "val_list.txt"), ("test", "test_list.txt")):
                for img in self._list(name):
                    if split_of.setdefault(img, split) != split:
                        raise DataError(f"{self.root / name}: {img} is also listed in the {split_of[img]} split")
        else:
            test = set(self._list("test_list.txt"))
            split_of = {img: "test" for img in test}
            for img in self._list("train_val_list.txt"):
                if img in test:
                    raise DataError(f"{self.root / 'train_val_list.txt'}: {img} is also in test_list.txt")
                if img not in patient:
                    raise DataError(f"{self.root / 'train_val_list.txt'}: {img} is not in {table.name}")
                split_of[img] = "val" if hash_split(patient[img], 0, self.val_fraction, 0.0) == "val" else "train"
        files = {p.name: p for p in self.root.rglob("*.png")}
        out = []
        for img, split in split_of.items():
            if img not in labels:
                raise DataError(f"{self.root}: {img} (split {split}) is not in {table.name}")
            if img not in files:
                self.index_skips["missing_image"] += 1
                continue
            out.append({"id": img, "split": split, "path": files[img], "labels": labels[img]})
        return out

    @property
    def dataset_version(self) -> str:
        return f"{type(self).__name__}:{Path(self.root).name}:{self.split_convention}"
