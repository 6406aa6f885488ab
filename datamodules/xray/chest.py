"""Chest X-ray datamodules over the published layouts (see README "Datasets" and
``shared`` data notes): MIMIC-CXR(-JPG), CheXpert, RSNA Pneumonia, SIIM-ACR, COVIDx, Open-i."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from medvlp.pretrained.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported for callers)
from medvlp.checks import check_choice
from medvlp.datamodules.io.readers import DataError, image_shape_2d, read_image_2d, rle_decode_siim
from medvlp.datamodules.io.store import image2d_spec
from medvlp.datamodules.tabular import (
    UNCERTAINTY_POLICIES, RecordDataModule, apply_uncertainty, hash_split, resize_2d,
)
from medvlp.registry import register_datamodule
from medvlp.reports import ADDENDUM_POLICIES, parse_sections
from medvlp.datamodules.xray.chest_imagenome import ChestImaGenomeRegions
from PIL import Image

CHEXPERT_14 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
               "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
               "Pneumothorax", "Support Devices"]
log = logging.getLogger(__name__)
#: why a MIMIC-CXR study's report gave no text (the skip-count keys under ``empty_report=skip``)
REPORT_PROBLEMS = {
    "missing_file": "report file is missing",
    "empty_file": "report file is empty",
    "decode": "report is not UTF-8",
    "no_sections": "empty or missing FINDINGS/IMPRESSION",
}
CHEXPERT_5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
NORM_MEAN, NORM_STD = 0.5, 0.25
#: per-channel ImageNet statistics (ASG's ``A.Normalize`` in datasets/pretrain_dataset.py)


def read_csv(path: Path, required: Sequence[str], **kwargs: Any) -> pd.DataFrame:
    """Read a CSV (optionally .gz) and check its columns.

    Raises:
        DataError: naming the file when it is missing, unreadable or lacks columns.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, **kwargs)
    except Exception as exc:
        raise DataError(f"{path}: cannot parse CSV ({type(exc).__name__}: {exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]  # SIIM's " EncodedPixels"
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing} (has {list(df.columns)[:12]})")
    return df


def _first(root: Path, *names: str) -> Path:
    for n in names:
        if (root / n).is_file():
            return root / n
    return root / names[0]


class XrayDataModule(RecordDataModule):
    """Shared 2D loading: read, resize longest side + pad (``image_size``), normalise, augment.

    ``split_convention``: ``hash`` (deterministic sha1 rank) or ``mgca`` (the dataset's MGCA/ASG
    preprocessing split, where the subclass implements one).

    Args:
        decode: ``fast`` (default: JPEG DCT draft and area resize to ``image_size`` before float conversion,
            see :func:`read_image_2d`) or ``full`` (full-resolution float decode, then bilinear resize).
        prepared: a folder written by ``medvlp prepare`` for this dataset: images are read from its shards
            (by id, random access), labels/reports/masks still from the dataset's index.
        channels: 1 (default) or 3 (the grey image replicated, as ``cv2.COLOR_GRAY2RGB`` in ASG/MGCA).
        normalize: ``medvlp`` (default: ``(v - 0.5) / 0.25`` on [0, 1]) or ``imagenet`` (per-channel
            ImageNet mean/std; needs ``channels=3``).
        crop_size: ``None`` (default: the model input is the ``image_size`` square) or a size: after the
            resize + pad to ``image_size``, a random ``crop_size`` crop in training and the centre crop
            otherwise (ASG: 256 then 224); region boxes and masks get the same crop.
        intensity_jitter: training-time random gain and offset, each uniform in ``±intensity_jitter``
            (default 0.1; 0 turns it off).
    """

    modality = "xray"
    SPLIT_CONVENTIONS = ("hash", "mgca")
    #: ``(mean, std)`` applied to [0, 1] intensities (reference protocols renormalise from it)
    intensity_norm = (NORM_MEAN, NORM_STD)

    def __init__(self, root: str, image_size: int = 224, split_convention: str = "hash", decode: str = "fast",
                 prepared: str | None = None, channels: int = 1, normalize: str = "medvlp",
                 crop_size: int | None = None, intensity_jitter: float = 0.1, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        owner = type(self).__name__
        check_choice("split_convention", split_convention, self.SPLIT_CONVENTIONS, owner)
        check_choice("decode", decode, ("fast", "full"), owner)
        check_choice("channels", channels, (1, 3), owner)
        check_choice("normalize", normalize, ("medvlp", "imagenet"), owner)
        if normalize == "imagenet" and channels != 3:
            raise ValueError(f"{owner}: normalize=imagenet needs channels=3, got channels={channels}")
        if crop_size is not None and not 0 < crop_size <= image_size:
            raise ValueError(f"{owner}: crop_size must be in (0, image_size={image_size}], got {crop_size}")
        if intensity_jitter < 0:
            raise ValueError(f"{owner}: intensity_jitter must be >= 0, got {intensity_jitter}")
        self.channels, self.normalize, self.crop_size = channels, normalize, crop_size
        self.intensity_jitter = intensity_jitter
        if normalize != "medvlp":  # per-channel statistics: reference views cannot renormalise a scalar (mean, std)
            self.intensity_norm = None
        self.image_size = image_size
        self.split_convention = split_convention
        self.decode = decode
        self.prepared = prepared
        self._store: Any = None

    @property
    def input_size(self) -> int:
        """Side of the model input: ``crop_size`` when cropping, else ``image_size``."""
        return self.crop_size or self.image_size

    def encoder_hints(self) -> dict[str, Any]:
        hints: dict[str, Any] = {"spatial_dims": [2], "img_size_2d": self.input_size}
        if self.channels != 1:  # the encoders' default is 1 channel
            hints["in_channels"] = self.channels
        return hints

    def crop_offset(self, augment: bool) -> tuple[int, int] | None:
        """``(top, left)`` of the ``crop_size`` crop in the ``image_size`` square: uniform in training
        (``augment``), centred otherwise (albumentations ``CenterCrop`` rounding); ``None`` without a crop."""
        if self.crop_size is None:
            return None
        span = self.image_size - self.crop_size
        if augment:
            top, left = (int(v) for v in torch.randint(span + 1, (2,)))
            return top, left
        return span // 2, span // 2

    def crop(self, t: torch.Tensor, offset: tuple[int, int] | None) -> torch.Tensor:
        """``t[..., top:top + crop_size, left:left + crop_size]`` (``t`` unchanged without an offset)."""
        if offset is None:
            return t
        top, left = offset
        return t[..., top:top + self.crop_size, left:left + self.crop_size]

    def prepared_spec(self, size: int | None = None) -> dict[str, Any]:
        """What ``medvlp prepare`` stores for this datamodule: 2D images (:func:`~medvlp.datamodules.io.store.image2d_spec`)."""
        return image2d_spec(self, size)

    def image_array(self, record: Mapping[str, Any]) -> np.ndarray:
        """The image in [0, 1]; its longer side is ``image_size`` (fast), the prepared size, or the source's."""
        if self.store is not None:
            return self.store.read(record["id"])[0]["image"].astype(np.float32) / 255.0
        if self.decode == "full":  # every pixel decoded and in the min-max; resized in 8 bits before float
            return read_image_2d(record["path"], max_side=self.image_size, full_decode=True)
        return read_image_2d(record["path"], max_side=self.image_size)

    def image_tensor(self, record: Mapping[str, Any] | str | Path, augment: bool,
                     offset: tuple[int, int] | None = None) -> torch.Tensor:
        """Normalised ``(channels, input_size, input_size)`` image of a record (or of an image file path).

        ``offset``: the crop's ``(top, left)`` (drawn by :meth:`crop_offset` when ``None`` and cropping)."""
        if not isinstance(record, Mapping):
            record = {"id": str(record), "path": record}
        if offset is None:
            offset = self.crop_offset(augment)
        img = self.crop(resize_2d(self.image_array(record), self.image_size), offset)
        if augment and self.intensity_jitter:
            j = self.intensity_jitter
            img = img * (1 + j * (2 * torch.rand(1) - 1)) + j * (2 * torch.rand(1) - 1)
        img = img.expand(self.channels, -1, -1)
        if self.normalize == "imagenet":
            return (img - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        return (img - NORM_MEAN) / NORM_STD

    def base_sample(self, record: Mapping[str, Any], augment: bool,
                    offset: tuple[int, int] | None = None) -> dict[str, Any]:
        """Image, labels, text and meta of a record; ``offset`` as in :meth:`image_tensor`."""
        sample: dict[str, Any] = {"image": self.image_tensor(record, augment, offset), "modality": "xray",
                                  "meta": {"id": record["id"], "path": str(record["path"])}}
        if "labels" in record:
            sample["labels"] = torch.as_tensor(record["labels"], dtype=torch.float32)
            sample["label_names"] = self.label_names
        if "text" in record:
            sample["text"] = record["text"]
            sample["sections"] = record.get("sections", {})
        return sample

    def source_shape(self, record: Mapping[str, Any]) -> tuple[int, int]:
        """``(H, W)`` of the source image (for masks drawn in source pixels), without decoding pixels."""
        if self.store is not None:
            return tuple(self.store.read(record["id"])[1]["meta"]["orig_shape"])
        return image_shape_2d(record["path"])

    def load(self, record: Mapping[str, Any], augment: bool) -> dict[str, Any]:
        return self.base_sample(record, augment)


@register_datamodule("mimic_cxr")
class MIMICCXRDataModule(XrayDataModule):
    """MIMIC-CXR-JPG 2.x images + MIMIC-CXR reports.

    Layout: ``<root>/files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg``, ``mimic-cxr-2.0.0-{metadata,split,chexpert,
    negbio}.csv(.gz)``; reports ``<reports_root>/files/pXX/pSUBJECT/sSTUDY.txt`` (default: ``root``).
    MGCA conventions: frontal views only (``views``), caption = impression + findings; official split
    with ``validate`` → val. Sections are read by :func:`~medvlp.reports.parse_sections` (MIMIC section
    names, case-insensitive; sub-headers stay in their section; addenda per ``addendum``; a report without
    headers gives its last paragraph as impression). A study whose report is missing, empty, not UTF-8,
    or has neither section follows ``empty_report`` (``skip``: studies counted per reason — ``missing_file``,
    ``empty_file``, ``decode``, ``no_sections`` — and logged once per reason; ``fail``: error naming the
    file).

    Args:
        label_source: ``chexpert`` | ``negbio``. uncertainty: see :func:`apply_uncertainty`.
        views: ViewPosition values kept. text_sections: sections joined into ``text``.
        empty_report: ``skip`` | ``fail``. addendum: ``impression`` | ``separate`` | ``drop``.
        region_source: ``None`` or ``chest_imagenome``: ASG region–sentence pairs from the Chest ImaGenome
            scene graphs in ``scene_graph_dir`` (:mod:`medvlp.datamodules.xray.chest_imagenome`); samples then
            carry ``regions``, ``region_present`` and ``region_spans``, and images without a scene graph
            are skipped (counted as ``no_scene_graph``).
        scene_graph_dir: folder of ``<dicom_id>_SceneGraph.json`` files. max_region_pairs: ASG's 23.
    """

    name = "mimic_cxr"
    SPLIT_CONVENTIONS = ("hash",)  # the official split.csv is always used

    def __init__(self, root: str, reports_root: str | None = None, label_source: str = "chexpert",
                 uncertainty: str = "zeros", views: Sequence[str] = ("PA", "AP"),
                 text_sections: Sequence[str] = ("impression", "findings"), empty_report: str = "skip",
                 addendum: str = "impression", region_source: str | None = None, scene_graph_dir: str | None = None,
                 max_region_pairs: int = 23, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.region_pairs = self._region_source(region_source, scene_graph_dir, max_region_pairs)
        self.reports_root = Path(reports_root) if reports_root else self.root
        self.label_source = check_choice("label_source", label_source, ("chexpert", "negbio"), type(self).__name__)
        self.uncertainty = check_choice("uncertainty", uncertainty, UNCERTAINTY_POLICIES, type(self).__name__)
        self.empty_report = check_choice("empty_report", empty_report, ("skip", "fail"), type(self).__name__)
        self.addendum = check_choice("addendum", addendum, ADDENDUM_POLICIES, type(self).__name__)
        self.views, self.text_sections = tuple(views), tuple(text_sections)
        for section in self.text_sections:
            check_choice("text_sections", section, ("impression", "findings"), type(self).__name__)
        self._logged_reports: set[str] = set()

    @property
    def label_names(self) -> list[str]:
        return list(CHEXPERT_14)

    def index(self) -> list[dict[str, Any]]:
        meta = read_csv(_first(self.root, "mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"),
                        ["dicom_id", "subject_id", "study_id", "ViewPosition"])
        split = read_csv(_first(self.root, "mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"),
                         ["dicom_id", "split"])
        lab_file = _first(self.root, f"mimic-cxr-2.0.0-{self.label_source}.csv.gz", f"mimic-cxr-2.0.0-{self.label_source}.csv")
        labels = read_csv(lab_file, ["subject_id", "study_id", *CHEXPERT_14])
        df = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="inner")
        df = df[df["ViewPosition"].isin(self.views)]
        df = df.merge(labels, on=["subject_id", "study_id"], how="left")
        lab = apply_uncertainty(df[CHEXPERT_14].to_numpy(dtype=float), CHEXPERT_14, self.uncertainty, where=str(lab_file))
        out = []
        root, reports_root = str(self.root), str(self.reports_root)
        bad_reports: set[str] = set()
        reports: dict[str, tuple[str, dict[str, str], str | None]] = {}
        for i, row in enumerate(df.itertuples(index=False)):
            sid, study = str(row.subject_id), str(row.study_id)
            rel = f"files/p{sid[:2]}/p{sid}/s{study}"  # plain strings: pathlib costs more than the parse
            report = f"{reports_root}/{rel}.txt"
            if report not in reports:  # several images share one study report
                reports[report] = self._report(report)
            text, sections, problem = reports[report]
            if problem:
                if self.empty_report == "fail":
                    raise DataError(f"{report}: {REPORT_PROBLEMS[problem]} (study {study})")
                if report not in bad_reports:  # counted and logged once per study, not per image
                    bad_reports.add(report)
                    self.index_skips[problem] += 1
                    if problem not in self._logged_reports:
                        log.warning("%s: %s (study %s); skipped under empty_report=skip (further studies "
                                    "with this problem are counted, not logged)", report, REPORT_PROBLEMS[problem], study)
                        self._logged_reports.add(problem)
                continue
            out.append({"id": str(row.dicom_id), "split": {"validate": "val"}.get(row.split, row.split),
                        "path": Path(f"{root}/{rel}/{row.dicom_id}.jpg"), "labels": lab[i], "text": text,
                        "sections": sections})
        return self._with_regions(out)

    # ------------------------------------------------------------------ Chest ImaGenome regions (ASG)
    def _region_source(self, source: str | None, scene_graph_dir: str | None, max_pairs: int) -> Any:
        if source is None:
            return None
        check_choice("region_source", source, ("chest_imagenome",), type(self).__name__)
        if not scene_graph_dir:
            raise ValueError(f"{type(self).__name__}: region_source=chest_imagenome needs scene_graph_dir")

        return ChestImaGenomeRegions(scene_graph_dir, max_pairs)

    def _with_regions(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drop (and count) images without a scene graph when a region source is set."""
        if self.region_pairs is None:
            return records
        kept = [r for r in records if self.region_pairs.has(r["id"])]
        if len(kept) < len(records):
            self.index_skips["no_scene_graph"] += len(records) - len(kept)
            log.warning("%s: %d images have no Chest ImaGenome scene graph under %s; skipped",
                        type(self).__name__, len(records) - len(kept), self.region_pairs.root)
        return kept

    def load(self, record: Mapping[str, Any], augment: bool) -> dict[str, Any]:
        offset = self.crop_offset(augment)  # one crop for the image and its region boxes
        sample = self.base_sample(record, augment, offset)
        if self.region_pairs is not None:

            with Image.open(record["path"]) as im:  # header only: the original size the boxes refer to
                width, height = im.size
            sample.update(self.region_pairs.sample_fields(record["id"], record["text"], height, width, self.image_size,
                                                          crop=None if offset is None else (*offset, self.crop_size)))
        return sample

    def _report(self, path: str) -> tuple[str, dict[str, str], str | None]:
        """``(text, sections, problem)``; ``problem`` is a key of :data:`REPORT_PROBLEMS` or ``None``."""
        if not os.path.isfile(path):
            return "", {}, "missing_file"
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError:
            return "", {}, "decode"
        if not raw.strip():
            return "", {}, "empty_file"
        sections = parse_sections(raw, addendum=self.addendum)
        text = " ".join(sections[s] for s in self.text_sections if sections.get(s)).strip()
        kept = {k: v for k, v in sections.items() if k in ("findings", "impression")}
        return text, kept, None if text else "no_sections"


@register_datamodule("chexpert")
class CheXpertDataModule(XrayDataModule):
    """CheXpert (``train.csv``/``valid.csv`` with ``Path`` relative to ``root``'s parent).

    Official ``valid.csv`` is the test split; ``val_size`` (5,000) training images are held out for
    validation. ``split_convention``: ``hash`` (sha1 rank, deterministic) or ``mgca`` (MGCA/ASG
    ``preprocess/chexpert.py``: the 5x200 zero-shot images are removed from training, then
    ``np.random.seed(0); np.random.choice(len, 5000, replace=False)`` positions become validation; MGCA
    then drops those rows by index *label*, which leaves part of them in training — we keep the intended
    disjoint split). Labels: the 5 competition classes by default. ``test_set: 5x200`` makes the test
    split CheXpert 5x200 (:func:`chexpert_5x200`, removed from train/val) with one-hot labels, the
    GLoRIA/MGCA zero-shot classification set.

    Args:
        classes: label columns. uncertainty: ``ones`` | ``zeros`` | ``ignore`` | ``mgca``.
        frontal_only: keep ``Frontal/Lateral == Frontal``. val_size: held-out training images.
        exclude_test_ids: keep the 5x200 zero-shot test images out of train/val also under the ``hash``
            convention with ``test_set: valid`` (default True; :meth:`known_test_ids`).
    """

    name = "chexpert"

    def __init__(self, root: str, classes: Sequence[str] = tuple(CHEXPERT_5), uncertainty: str = "mgca",
                 frontal_only: bool = True, val_size: int = 5000, image_root: str | None = None,
                 test_set: str = "valid", exclude_test_ids: bool = True, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        check_choice("test_set", test_set, ("valid", "5x200"), type(self).__name__)
        self.test_set = test_set
        self.classes = list(classes)
        self.uncertainty = check_choice("uncertainty", uncertainty, UNCERTAINTY_POLICIES, type(self).__name__)
        self.exclude_test_ids = exclude_test_ids
        self.frontal_only, self.val_size = frontal_only, val_size
        self.image_root = Path(image_root) if image_root else self.root.parent

    @property
    def label_names(self) -> list[str]:
        return list(self.classes)

    def _table(self, name: str) -> pd.DataFrame:
        path = _first(self.root, name, name + ".gz")
        df = read_csv(path, ["Path", "Frontal/Lateral", *self.classes])
        if self.frontal_only:
            df = df[df["Frontal/Lateral"] == "Frontal"]
        df = df.copy()
        df.attrs["file"] = str(path)
        return df

    def index(self) -> list[dict[str, Any]]:
        out = []
        train, test = self._table("train.csv"), self._table("valid.csv")
        five = None
        if self.test_set == "5x200":
            full = read_csv(_first(self.root, "train.csv", "train.csv.gz"), ["Path", "Frontal/Lateral", *CHEXPERT_14])
            five = chexpert_5x200(full)
            train = train[~train["Path"].isin(set(five["Path"]))]
        if self.split_convention == "mgca":
            full = read_csv(_first(self.root, "train.csv", "train.csv.gz"), ["Path", "Frontal/Lateral"])
            drop = set(chexpert_5x200(full)["Path"])
            pool = full[~full["Path"].isin(drop)]
            pos = np.random.RandomState(0).choice(len(pool), size=min(self.val_size, len(pool)), replace=False)
            val_ids = set(pool["Path"].iloc[pos])
            train = train[~train["Path"].isin(drop)]
        else:
            train = train[~train["Path"].isin(self.known_test_ids())]
            val_ids = set(sorted(train["Path"], key=lambda p: hashlib.sha1(p.encode()).hexdigest())[: self.val_size])
        tables = [(train, "train")] if five is not None else [(train, "train"), (test, "test")]
        for df, default in tables:
            lab = apply_uncertainty(df[self.classes].to_numpy(dtype=float), self.classes, self.uncertainty,
                                    where=df.attrs.get("file", str(self.root)))
            for i, p in enumerate(df["Path"]):
                split = "val" if default == "train" and p in val_ids else default
                out.append({"id": p, "split": split, "path": self.image_root / p, "labels": lab[i]})
        if five is not None:
            for p, cls in zip(five["Path"], five["5x200_class"]):
                onehot = np.array([float(c == cls) for c in self.classes], np.float32)
                out.append({"id": p, "split": "test", "path": self.image_root / p, "labels": onehot})
        return out

    def known_test_ids(self) -> set[str]:
        """Training-file ids reserved for evaluation, excluded from train/val when ``exclude_test_ids``
        (default): the CheXpert 5x200 zero-shot images (:func:`chexpert_5x200_exclusion`). With
        ``test_set: 5x200`` or ``split_convention: mgca`` they are removed anyway."""
        if not self.exclude_test_ids:
            return set()
        full = read_csv(_first(self.root, "train.csv", "train.csv.gz"), ["Path", "Frontal/Lateral", *CHEXPERT_14])
        ids = chexpert_5x200_exclusion(full)
        if ids:
            log.info("CheXpert: %d 5x200 zero-shot test images excluded from train/val (exclude_test_ids)", len(ids))
        return ids


def _chexpert_5x200_pools(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per competition class, the 5x200 candidate rows (see :func:`chexpert_5x200`)."""
    others = ["Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax",
              "Pleural Other", "Fracture", "Support Devices"]
    d = df[df["Frontal/Lateral"] == "Frontal"].copy()
    d[CHEXPERT_5 + others] = d[CHEXPERT_5 + others].fillna(0)
    pools = {}
    for c in CHEXPERT_5:
        rest = [x for x in CHEXPERT_5 + others if x != c]
        pools[c] = d[(d[c] == 1) & (d[rest] == 0).all(axis=1)]
    return pools


def chexpert_5x200(df: pd.DataFrame, per_class: int = 200, seed: int = 0) -> pd.DataFrame:
    """Build CheXpert 5x200 (MGCA/GLoRIA): frontal, ``fillna(0)``; per competition class keep rows where
    it is 1 and the other 4 competition labels plus 8 others are 0 ("No Finding" ignored), then
    sample ``per_class`` with ``random_state=seed``. Returns rows with a ``5x200_class`` column.

    Raises:
        DataError: when a class has fewer than ``per_class`` candidates.
    """
    parts = []
    for c, pool in _chexpert_5x200_pools(df).items():
        if len(pool) < per_class:
            raise DataError(f"CheXpert 5x200: class {c!r} has only {len(pool)} candidates (< {per_class})")
        parts.append(pool.sample(n=per_class, random_state=seed).assign(**{"5x200_class": c}))
    return pd.concat(parts, ignore_index=True)


def chexpert_5x200_exclusion(df: pd.DataFrame, per_class: int = 200, seed: int = 0) -> set[str]:
    """``Path`` values that must stay out of pretraining because CheXpert 5x200 (a zero-shot test set
    drawn from ``train.csv``) may contain them: the drawn 200 per class, or, for a class with fewer
    than ``per_class`` candidates (a partial copy of ``train.csv``), its whole candidate pool."""
    out: set[str] = set()
    for pool in _chexpert_5x200_pools(df).values():
        chosen = pool.sample(n=per_class, random_state=seed) if len(pool) >= per_class else pool
        out |= set(chosen["Path"])
    return out


@register_datamodule("rsna_pneumonia")
class RSNAPneumoniaDataModule(XrayDataModule):
    """RSNA Pneumonia: ``stage_2_train_labels.csv`` (one row per box) + ``stage_2_train_images/<id>.dcm``.

    Boxes ``[x, y, x+w, y+h]`` are grouped per patient (Target = any box) and rasterised into masks
    (``mask[y1:y2, x1:x2] = 1``, MGCA). DICOM MONOCHROME1 is inverted. Splits over patients (sorted by
    id, as MGCA's ``groupby("patientId")``): ``mgca`` = MGCA's classification split
    (``preprocess_rsna_data(test_fac=0.15)``: ``train_test_split(test_size=0.3, random_state=0)``, the
    held-out part split 50/50 into test (first) and val; 70/15/15, as ASG's README states);
    ``mgca_detection`` = MGCA's detection/segmentation split (``prepare_detection_data``: test_size
    5337·2, then test/val 50/50); ``hash`` = deterministic 70/15/15 by id.
    """

    name = "rsna_pneumonia"
    SPLIT_CONVENTIONS = ("hash", "mgca", "mgca_detection")

    @property
    def label_names(self) -> list[str]:
        return ["Pneumonia"]

    def index(self) -> list[dict[str, Any]]:
        path = _first(self.root, "stage_2_train_labels.csv", "stage_2_train_labels.csv.zip")
        df = read_csv(path, ["patientId", "x", "y", "width", "height", "Target"])
        bad = df[~df["Target"].isin([0, 1])]
        if len(bad):
            raise DataError(f"{path}: row {bad.index[0] + 2}: Target must be 0 or 1, got {bad['Target'].iloc[0]!r}")
        groups = []
        for pid, g in df.groupby("patientId", sort=True):
            boxes = [[r.x, r.y, r.x + r.width, r.y + r.height] for r in g.itertuples() if r.Target == 1]
            groups.append((str(pid), int(g["Target"].max()), boxes))
        splits = self._splits([g[0] for g in groups])
        if self.split_convention != "hash":  # MGCA's CSVs keep train_test_split's shuffled order; its df.sample draws over it
            rank = {pid: i for i, pid in enumerate(splits)}
            groups.sort(key=lambda g: rank[g[0]])
        return [{"id": pid, "split": splits[pid], "path": self.root / "stage_2_train_images" / f"{pid}.dcm",
                 "labels": np.array([t], np.float32), "boxes": boxes} for pid, t, boxes in groups]

    def _splits(self, ids: list[str]) -> dict[str, str]:
        if self.split_convention == "hash":
            return {i: hash_split(i, 0, 0.15, 0.15) for i in ids}
        from sklearn.model_selection import train_test_split  # lazy: heavy import (scikit-learn), only this path needs it

        hold_size = 0.15 * 2 if self.split_convention == "mgca" else min(5337 * 2, len(ids) // 2)
        train, hold = train_test_split(ids, test_size=hold_size, random_state=0)
        test, val = train_test_split(hold, test_size=0.5, random_state=0)  # MGCA: test_df, valid_df = ...
        return {**{i: "train" for i in train}, **{i: "val" for i in val}, **{i: "test" for i in test}}

    def load(self, record: Mapping[str, Any], augment: bool) -> dict[str, Any]:
        mask = np.zeros(self.source_shape(record), np.float32)
        for x1, y1, x2, y2 in record["boxes"]:
            mask[int(y1):int(y2), int(x1):int(x2)] = 1
        offset = self.crop_offset(augment)
        sample = self.base_sample(record, augment, offset)
        sample["mask"] = self.crop((resize_2d(mask, self.image_size, "nearest") > 0.5).long(), offset)
        return sample


@register_datamodule("siim_pneumothorax")
class SIIMDataModule(XrayDataModule):
    """SIIM-ACR Pneumothorax: ``train-rle.csv`` (``ImageId``, `` EncodedPixels``; one row per instance,
    ``-1`` = none) + ``dicom-images-train/**/<ImageId>.dcm``. Instances are summed and thresholded;
    the relative column-major RLE is decoded by :func:`rle_decode_siim`. Split: hash 70/15/15 by image,
    or ``split_convention: mgca`` (MGCA ``preprocess/siim.py``: ``train_test_split(test_size=0.3,
    random_state=0)`` over CSV *rows*, then the held-out rows 50/50 into test/val; an image takes the
    split of its first row and the number of images whose rows MGCA spreads over several splits is logged)."""

    name = "siim_pneumothorax"

    @property
    def label_names(self) -> list[str]:
        return ["Pneumothorax"]

    def index(self) -> list[dict[str, Any]]:
        path = _first(self.root, "train-rle.csv", "train-rle.csv.gz")
        df = read_csv(path, ["ImageId", "EncodedPixels"], dtype=str)
        files = {p.stem: p for p in (self.root / "dicom-images-train").rglob("*.dcm")}
        row_split: dict[str, str] = {}
        if self.split_convention == "mgca":
            from sklearn.model_selection import train_test_split  # lazy: heavy import (scikit-learn), only this path needs it

            idx = list(range(len(df)))
            train_rows, hold = train_test_split(idx, test_size=0.3, random_state=0)
            test_rows, val_rows = train_test_split(hold, test_size=0.5, random_state=0)
            split_of = {**{i: "train" for i in train_rows}, **{i: "test" for i in test_rows}, **{i: "val" for i in val_rows}}
            spread = df.assign(_s=[split_of[i] for i in idx]).groupby("ImageId")["_s"].nunique()
            if (spread > 1).any():
                log.warning("%s: MGCA row-level split puts %d images in several splits; using each image's first row",
                            path, int((spread > 1).sum()))
            for i, image_id in enumerate(df["ImageId"]):
                row_split.setdefault(image_id, split_of[i])
        out = []
        for image_id, g in df.groupby("ImageId", sort=True):
            if image_id not in files:
                self.index_skips["missing_dicom"] += 1
                continue
            rles = [r.strip() for r in g["EncodedPixels"].fillna("-1")]
            split = row_split.get(image_id) or hash_split(image_id, 0, 0.15, 0.15)
            out.append({"id": image_id, "split": split, "path": files[image_id],
                        "rles": rles, "labels": np.array([float(any(r != "-1" for r in rles))], np.float32)})
        return out

    def load(self, record: Mapping[str, Any], augment: bool) -> dict[str, Any]:
        h, w = self.source_shape(record)
        mask = np.zeros((h, w), np.uint8)
        for rle in record["rles"]:
            try:
                mask |= rle_decode_siim(rle, h, w)
            except DataError as exc:
                raise DataError(f"{record['path']} (ImageId {record['id']}): {exc}") from exc
        offset = self.crop_offset(augment)
        sample = self.base_sample(record, augment, offset)
        mask_t = (resize_2d(mask.astype(np.float32), self.image_size, "nearest") > 0.5).long()
        sample["mask"] = self.crop(mask_t, offset)
        return sample


@register_datamodule("covidx")
class COVIDxDataModule(XrayDataModule):
    """COVIDx: headerless space-separated ``train_*.txt``/``test_*.txt`` (``patient_id filename class
    source``) with images in ``train/`` and ``test/``. Classes normal / pneumonia / COVID-19 (MGCA
    mapping normal→0, pneumonia→1, else→2) as one-hot labels; val = 20 % of train by hash, or with
    ``split_convention: mgca`` MGCA's ``train_test_split(train_size=0.8, random_state=0)`` over the rows,
    or with ``asg`` 10 % of the training rows (ASG's README: "split 10% of original training set for
    validation"; ASG publishes no code for the draw, so it is ``train_test_split(test_size=0.1,
    random_state=0)`` over the rows)."""

    name = "covidx"
    SPLIT_CONVENTIONS = ("hash", "mgca", "asg")
    CLASSES = ["normal", "pneumonia", "COVID-19"]

    def __init__(self, root: str, train_list: str = "train_COVIDx9A.txt", test_list: str = "test_COVIDx9A.txt",
                 **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.train_list, self.test_list = train_list, test_list

    @property
    def label_names(self) -> list[str]:
        return list(self.CLASSES)

    def index(self) -> list[dict[str, Any]]:
        out = []
        for list_name, folder, default in ((self.train_list, "train", "train"), (self.test_list, "test", "test")):
            path = self.root / list_name
            if not path.is_file():
                raise DataError(f"{path}: file not found")
            for line_no, line in enumerate(path.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 3:
                    raise DataError(f"{path}: line {line_no}: expected 'patient_id filename class [source]', got {line!r}")
                cls = {"normal": 0, "pneumonia": 1, "negative": 0, "positive": 2}.get(parts[2].lower(), 2)
                lab = np.zeros(3, np.float32)
                lab[cls] = 1
                split = hash_split(parts[1], 0, 0.2, 0.0) if default == "train" else "test"
                out.append({"id": f"{folder}/{parts[1]}", "split": split, "path": self.root / folder / parts[1],
                            "labels": lab})
        if self.split_convention in ("mgca", "asg"):
            from sklearn.model_selection import train_test_split  # lazy: heavy import (scikit-learn), only this path needs it

            rows = [r for r in out if r["split"] != "test"]
            size = {"train_size": 0.8} if self.split_convention == "mgca" else {"test_size": 0.1}
            _, val = train_test_split(list(range(len(rows))), random_state=0, **size)
            val_rows = set(val)
            for i, r in enumerate(rows):
                r["split"] = "val" if i in val_rows else "train"
        return out


def read_openi_reports(source: str | Path) -> pd.DataFrame:
    """Open-i / IU X-ray reports (``ecgen-radiology/*.xml``, a folder or the ``.tgz``) as a table with
    columns ``id, findings, impression, images`` (empty sections are empty strings)."""
    source = Path(source)
    rows = []

    def parse(name: str, data: bytes) -> None:
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            raise DataError(f"{source}:{name}: malformed XML ({exc})") from exc
        sec = {(a.get("Label") or "").lower(): (a.text or "").strip() for a in root.iter("AbstractText")}
        images = [im.get("id") for im in root.iter("parentImage")]
        rows.append({"id": Path(name).stem, "findings": sec.get("findings", ""), "impression": sec.get("impression", ""),
                     "images": " ".join(i for i in images if i)})

    if source.is_dir():
        for p in sorted(source.rglob("*.xml")):
            parse(p.name, p.read_bytes())
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".xml"):
                    parse(m.name, tar.extractfile(m).read())
    else:
        raise DataError(f"{source}: expected a folder of XML reports or a .tgz")
    return pd.DataFrame(rows).sort_values("id", key=lambda s: s.map(lambda x: int(re.sub(r"\D", "", x) or 0)))
