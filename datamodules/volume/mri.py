"""Brain MRI: BraTS (2018–2021 and 2023+ naming) with WT/TC/ET evaluation regions."""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medvlp.datamodules.io.readers import DataError
from medvlp.datamodules.tabular import hash_split
from medvlp.datamodules.volume.base import VolumeDataModule
from medvlp.registry import register_datamodule

# modality aliases: 2021 naming → 2023 naming
MODALITY_ALIASES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


def brats_regions(seg: np.ndarray | torch.Tensor, year: int) -> dict[str, Any]:
    """Evaluation regions from a BraTS label map: WT = {1,2,ET}, TC = {1,ET}, ET = {ET} with ET = 4
    (≤2021) or 3 (2023+)."""
    et = 4 if year <= 2021 else 3
    return {"WT": (seg == 1) | (seg == 2) | (seg == et), "TC": (seg == 1) | (seg == et), "ET": seg == et}


@register_datamodule("brats")
class BraTSDataModule(VolumeDataModule):
    """BraTS cases ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`` or
    ``BraTS-GLI-XXXXX-XXX/BraTS-GLI-XXXXX-XXX-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (naming detected per case).

    ``sequences`` picks the input channels (2021 or 2023 names). Masks are remapped to contiguous
    classes (ET 4 → 3 for ≤2021), so class 3 is ET in both releases; labels are case-level presence
    of [necrosis/NET, edema, enhancing tumour]. Split: hash 70/10/20.
    """

    name = "brats"
    modality = "mri"

    def __init__(self, root: str, sequences: Sequence[str] = ("flair",), **kwargs: Any) -> None:
        kwargs.setdefault("channels", None)
        super().__init__(root, **kwargs)
        self.sequences = [MODALITY_ALIASES.get(s, s) for s in sequences]

    @property
    def label_names(self) -> list[str]:
        return ["Necrosis", "Edema", "Enhancing tumour"]

    def index(self) -> list[dict[str, Any]]:
        out = []
        for case in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("BraTS")):
            year = 2021 if re.match(r"BraTS20(1\d|2[01])_", case.name) else 2023
            files = {}
            for f in case.glob("*.nii*"):
                stem = f.name.split(".nii")[0]
                suffix = re.split(r"[_-]", stem)[-1].lower()
                files[MODALITY_ALIASES.get(suffix, suffix)] = f
            missing = [s for s in self.sequences if s not in files]
            if missing:
                raise DataError(f"{case}: missing sequences {missing} (found {sorted(files)})")
            rec = {"id": case.name, "split": hash_split(case.name, 0, 0.1, 0.2), "year": year,
                   "image": [files[s] for s in self.sequences]}
            if "seg" in files:
                rec["label"] = files["seg"]
            out.append(rec)
        if not out:
            raise DataError(f"{self.root}: no BraTS case folders (BraTS20XX_* or BraTS-*)")
        return out

    def to_sample(self, item: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
        sample = super().to_sample(item, record)
        if "mask" in sample:
            m = sample["mask"]
            if record["year"] <= 2021:
                m = torch.where(m == 4, torch.full_like(m, 3), m)
            sample["mask"] = m
            sample["labels"] = torch.tensor([float((m == k).any()) for k in (1, 2, 3)])
            sample["label_names"] = self.label_names
        return sample
