"""MIMIC-CXR 5x200: 5 classes × 200 frontal studies with reports (BenchX's zero-shot / retrieval set)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medvlp.datamodules.io.readers import DataError
from medvlp.datamodules.xray.chest import CHEXPERT_5, CHEXPERT_14, MIMICCXRDataModule, read_csv
from medvlp.registry import register_datamodule

_OTHERS = ["Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax",
           "Pleural Other", "Fracture", "Support Devices"]


def five_by_200(labels: np.ndarray, per_class: int = 200, seed: int = 0) -> list[tuple[int, str]]:
    """``(row, class)`` pairs of a 5x200 set over CheXpert-14 label rows (the GLoRIA/MGCA rule of
    :func:`~medvlp.datamodules.xray.chest.chexpert_5x200`: the class is 1, the other 4 competition labels and
    8 more are 0, blanks count as 0), ``per_class`` rows per class drawn with
    ``RandomState(seed).choice`` in row order.

    Raises:
        DataError: when a class has fewer than ``per_class`` candidates.
    """
    col = {n: i for i, n in enumerate(CHEXPERT_14)}
    lab = np.nan_to_num(labels, nan=0.0)
    out = []
    rng = np.random.RandomState(seed)
    for c in CHEXPERT_5:
        rest = [col[x] for x in CHEXPERT_5 + _OTHERS if x != c]
        pool = np.flatnonzero((lab[:, col[c]] == 1) & (lab[:, rest] == 0).all(1))
        if len(pool) < per_class:
            raise DataError(f"MIMIC 5x200: class {c!r} has only {len(pool)} candidates (< {per_class})")
        out += [(int(r), c) for r in sorted(rng.choice(pool, size=per_class, replace=False).tolist())]
    return out


@register_datamodule("mimic_5x200")
class MIMIC5x200DataModule(MIMICCXRDataModule):
    """MIMIC-CXR with the test split replaced by MIMIC 5x200 (one-hot labels over the 5 CheXpert
    competition classes, paired reports), for ``zero_shot_argmax`` and ``category_retrieval``.

    The set is BenchX's ``datasets/MIMIC_5x200/mimic_5x200_ids.csv`` when ``ids_file`` is given (its
    ``dicom_id`` column; each image's class is its single positive competition label) or else built by
    :func:`five_by_200` over the frontal studies with reports (``per_class``, ``seed``). The chosen
    images are removed from train and val. Other arguments as :class:`MIMICCXRDataModule`.

    Raises:
        DataError: an id of ``ids_file`` that is not among the indexed frontal images with reports, or
            whose labels do not name exactly one competition class.
    """

    name = "mimic_5x200"

    def __init__(self, root: str, ids_file: str | None = None, per_class: int = 200, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.ids_file, self.per_class, self.seed = ids_file, per_class, seed

    @property
    def label_names(self) -> list[str]:
        return list(CHEXPERT_5)

    def index(self) -> list[dict[str, Any]]:
        recs = super().index()
        full = np.stack([r["labels"] for r in recs]) if recs else np.zeros((0, 14))
        if self.ids_file:
            path = Path(self.ids_file)
            wanted = [str(i) for i in read_csv(path, ["dicom_id"], dtype=str)["dicom_id"]]
            pos = {r["id"]: i for i, r in enumerate(recs)}
            chosen = []
            for d in wanted:
                if d not in pos:
                    raise DataError(f"{path}: dicom_id {d} is not an indexed frontal image with a report")
                row = np.nan_to_num(full[pos[d]], nan=0.0)
                classes = [c for c in CHEXPERT_5 if row[CHEXPERT_14.index(c)] == 1]
                if len(classes) != 1:
                    raise DataError(f"{path}: dicom_id {d} has competition labels {classes}, not exactly one")
                chosen.append((pos[d], classes[0]))
        else:
            chosen = five_by_200(full, self.per_class, self.seed)
        test = dict(chosen)
        out = []
        for i, r in enumerate(recs):
            r = dict(r)
            if i in test:
                r["split"] = "test"
                r["labels"] = np.array([float(c == test[i]) for c in CHEXPERT_5], np.float32)
            elif r["split"] == "test":
                continue  # the official test split is not used beside the 5x200 set
            else:
                r["labels"] = r["labels"][[CHEXPERT_14.index(c) for c in CHEXPERT_5]]
            out.append(r)
        return out

