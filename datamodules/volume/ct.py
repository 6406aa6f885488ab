"""CT datamodules: CT-RATE (volumes + reports + 18 labels), MSD tasks (``dataset.json``) and BTCV."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from medvlp.datamodules.io.readers import DataError
from medvlp.datamodules.tabular import hash_split
from medvlp.datamodules.volume.base import VolumeDataModule
from medvlp.datamodules.xray.chest import read_csv
from medvlp.registry import register_datamodule

CT_RATE_LABELS = ["Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
                  "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
                  "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
                  "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
                  "Interlobular septal thickening"]
NOT_GIVEN = {"not given.", "not given", ""}


@register_datamodule("ct_rate")
class CTRATEDataModule(VolumeDataModule):
    """CT-RATE: ``dataset/{train_fixed,valid_fixed}/<patient>/<scan>/<vol>.nii.gz`` (or ``train``/``valid``),
    reports ``dataset/radiology_text_reports/{train,validation}_reports.csv`` (text = Findings_EN +
    Impressions_EN; "Not given." is empty), metadata ``dataset/metadata/{train,validation}_metadata.csv``
    (RescaleSlope/Intercept, applied only to volumes not yet in HU — see :class:`RescaleHUd`), labels
    ``dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv`` (18 binary columns). The
    official valid set is the test split; val = 5 % of training patients (hash). CT-CLIP window
    [-1000, 1000] HU.
    """

    name = "ct_rate"

    def __init__(self, root: str, window: Sequence[float] = (-1000.0, 1000.0), **kwargs: Any) -> None:
        super().__init__(root, window=window, **kwargs)

    @property
    def label_names(self) -> list[str]:
        return list(CT_RATE_LABELS)

    def _folder(self, kind: str) -> Path:
        d = self.root / "dataset" if (self.root / "dataset").is_dir() else self.root
        for name in (f"{kind}_fixed", kind):
            if (d / name).is_dir():
                return d / name
        raise DataError(f"{d}: neither {kind}_fixed/ nor {kind}/ exists")

    def index(self) -> list[dict[str, Any]]:
        d = self.root / "dataset" if (self.root / "dataset").is_dir() else self.root
        out = []
        for kind, rep, meta, lab in (("train", "train", "train", "train"), ("valid", "validation", "validation", "valid")):
            reports = read_csv(d / "radiology_text_reports" / f"{rep}_reports.csv",
                               ["VolumeName", "Findings_EN", "Impressions_EN"], dtype=str, keep_default_na=False)
            metadata = read_csv(d / "metadata" / f"{meta}_metadata.csv", ["VolumeName", "RescaleSlope", "RescaleIntercept"])
            labels = read_csv(d / "multi_abnormality_labels" / f"{lab}_predicted_labels.csv", ["VolumeName", *CT_RATE_LABELS])
            bad = labels[~labels[CT_RATE_LABELS].isin([0, 1]).all(axis=1)]
            if len(bad):
                raise DataError(f"{d / 'multi_abnormality_labels'}/{lab}_predicted_labels.csv: row {bad.index[0] + 2}: "
                                "labels must be 0/1")
            table = reports.merge(metadata[["VolumeName", "RescaleSlope", "RescaleIntercept"]], on="VolumeName", how="left")
            table = table.merge(labels, on="VolumeName", how="left")
            folder = self._folder(kind)
            label_matrix = table[CT_RATE_LABELS].to_numpy(np.float32)
            for k, row in enumerate(table.itertuples(index=False)):
                name = row.VolumeName
                parts = name.replace(".nii.gz", "").split("_")  # train_1_a_1 → train_1 / train_1_a
                path = folder / "_".join(parts[:2]) / "_".join(parts[:3]) / name
                text = " ".join(t for t in (row.Findings_EN, row.Impressions_EN) if t.strip().lower() not in NOT_GIVEN)
                if not text:
                    self.index_skips["empty_report"] += 1
                    continue
                lab = label_matrix[k]  # NaN when the volume has no label row
                split = "test" if kind == "valid" else hash_split(parts[1], 0, 0.05, 0.0)
                out.append({"id": name.replace(".nii.gz", ""), "split": split, "image": path, "labels": lab,
                            "text": text, "slope": float(row.RescaleSlope) if pd.notna(row.RescaleSlope) else 1.0,
                            "intercept": float(row.RescaleIntercept) if pd.notna(row.RescaleIntercept) else 0.0})
        return out


@register_datamodule("msd")
class MSDDataModule(VolumeDataModule):
    """Medical Segmentation Decathlon task folder: ``dataset.json`` + ``imagesTr``/``labelsTr``.

    ``training`` entries are split by hash (val/test fractions); macOS ``._*`` files are ignored. The
    modality (``CT`` → HU window, else percentiles) and label names come from ``dataset.json``; a task whose
    ``dataset.json`` lists several modalities (4D images) keeps all of them as channels unless ``channels``
    selects some.
    """

    name = "msd"

    def __init__(self, root: str, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 window: Sequence[float] | None = None, **kwargs: Any) -> None:
        meta = self._meta(Path(root))
        self.task_modality = str(meta.get("modality", {}).get("0", "")).upper()
        default_window = (-175.0, 250.0) if self.task_modality == "CT" else None
        if len(meta.get("modality", {}) or {}) > 1:  # 4D task (e.g. BrainTumour): dataset.json lists the channels
            kwargs.setdefault("channels", "all")
        super().__init__(root, window=window if window is not None else default_window, **kwargs)
        self.modality = "ct" if self.task_modality == "CT" else "mri"
        self.meta = meta
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    @staticmethod
    def _meta(root: Path) -> dict[str, Any]:
        path = root / "dataset.json"
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc})") from exc

    @property
    def label_names(self) -> list[str]:
        return []

    def segmentation_classes(self) -> list[str]:
        """Label map names from ``dataset.json`` (background first)."""
        labels = self.meta.get("labels", {})
        return [labels[k] for k in sorted(labels, key=int)]

    def index(self) -> list[dict[str, Any]]:
        entries = self.meta.get("training")
        if not isinstance(entries, list):
            raise DataError(f"{self.root / 'dataset.json'}: no 'training' list")
        out = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "image" not in e:
                raise DataError(f"{self.root / 'dataset.json'}: training[{i}] has no 'image'")
            img = self.root / e["image"]
            if img.name.startswith("._"):
                continue
            rec = {"id": img.name.replace(".nii.gz", ""), "image": img,
                   "split": hash_split(img.name, 0, self.val_fraction, self.test_fraction)}
            if e.get("label"):
                rec["label"] = self.root / e["label"]
            out.append(rec)
        return out


@register_datamodule("btcv")
class BTCVDataModule(VolumeDataModule):
    """BTCV (Synapse multi-organ): ``RawData/Training/{img/imgXXXX.nii.gz,label/labelXXXX.nii.gz}`` or the
    MONAI/UNETR layout ``imagesTr/imgXXXX.nii.gz``, ``labelsTr/labelXXXX.nii.gz`` (+ ``dataset_0.json``
    whose ``validation`` list becomes the test split). 13 organs; window [-175, 250] HU."""

    name = "btcv"
    ORGANS = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta", "IVC",
              "portal and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland"]

    def __init__(self, root: str, window: Sequence[float] = (-175.0, 250.0), **kwargs: Any) -> None:
        super().__init__(root, window=window, **kwargs)

    def index(self) -> list[dict[str, Any]]:
        raw = self.root / "RawData" / "Training"
        img_dir, lab_dir = (raw / "img", raw / "label") if raw.is_dir() else (self.root / "imagesTr", self.root / "labelsTr")
        if not img_dir.is_dir():
            raise DataError(f"{self.root}: neither RawData/Training/img nor imagesTr exists")
        test_names: set[str] = set()
        js = self.root / "dataset_0.json"
        if js.is_file():
            test_names = {Path(e["image"]).name for e in json.loads(js.read_text()).get("validation", [])}
        out = []
        for img in sorted(img_dir.glob("img*.nii.gz")):
            lab = lab_dir / img.name.replace("img", "label")
            split = "test" if img.name in test_names else hash_split(img.name, 0, 0.1, 0.0 if test_names else 0.2)
            out.append({"id": img.name.replace(".nii.gz", ""), "image": img, "label": lab, "split": split})
        return out
