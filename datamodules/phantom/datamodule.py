"""Embedded, deterministic, procedurally generated multi-modal dataset (no download needed).

Modalities: chest X-ray (2D), chest CT, brain MRI (from the real MNI152 template nilearn ships) and EM
(3D). Findings change the image and the report (see :mod:`medvlp.datamodules.phantom.render` and
:mod:`medvlp.datamodules.phantom.reports`). Samples are generated once per (modality, split, size,
seed, generator version, canonical-report share) into ``cache_dir`` as one ``.npy`` per array
(``arrays/image.npy`` …) + ``records.json`` and memory-mapped afterwards (one mapping per split, shared by
its augmented and plain datasets and paged in on demand); they are never committed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Compose, RandScaleIntensityd, RandShiftIntensityd

from medvlp.datamodules.base import RecordDataset, VLPDataModule
from medvlp.datamodules.volume.captions import attach_captions
from medvlp.datamodules.phantom.render import (
    CT_LABELS, EM_LABELS, MRI_LABELS, XRAY_LABELS, XRAY_REGIONS, render_ct, render_em, render_mri, render_xray,
)
from medvlp.datamodules.phantom.reports import canonical_report, write_report
from medvlp.io import atomic_write_text
from medvlp.registry import register_datamodule
from medvlp.progress import track

log = logging.getLogger(__name__)
GENERATOR_VERSION = 2
MODALITIES = {
    "xray": (render_xray, XRAY_LABELS, 2),
    "ct": (render_ct, CT_LABELS, 3),
    "mri": (render_mri, MRI_LABELS, 3),
    "em": (render_em, EM_LABELS, 3),
}
SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}
#: third entropy word of the per-sample stream that draws "canonical report or not" (kept apart from the
#: rendering stream, so the images and the free-text reports do not change with the share)
CANONICAL_STREAM = 0xCA0
NORM_MEAN, NORM_STD = 0.5, 0.25


def default_cache_dir() -> Path:
    """``$MEDVLP_CACHE`` or ``~/.cache/medvlp``."""
    return Path(os.environ.get("MEDVLP_CACHE", Path.home() / ".cache" / "medvlp"))


def uses_canonical_report(seed: int, index: int, share: float) -> bool:
    """Whether sample ``index`` of generator ``seed`` gets its label set's canonical report.

    One uniform draw per sample from its own stream ``(seed, index, CANONICAL_STREAM)`` compared with
    ``share``: deterministic, and the samples chosen at a share are a subset of those chosen at any larger
    share.
    """
    if share <= 0.0:
        return False
    return bool(np.random.default_rng([seed, index, CANONICAL_STREAM]).random() < share)


def _render_one(args: tuple[str, int, int, Sequence[int], float, float]) -> dict[str, Any]:
    modality, seed, index, size, prevalence, canonical_share = args
    render, label_names, sd = MODALITIES[modality]
    rng = np.random.default_rng([seed, index])
    if sd == 2:
        case = render(rng, size=int(size[0]), prevalence=prevalence)
    else:
        case = render(rng, shape=tuple(int(s) for s in size), prevalence=prevalence)
    text, sections, triplets = write_report(case.findings, label_names, modality, rng)
    if uses_canonical_report(seed, index, canonical_share):
        positives = [n for n, v in zip(label_names, case.labels) if v > 0.5]
        text, sections, triplets = canonical_report(positives, label_names, modality)
    return {
        "image": case.image.astype(np.float16),
        "mask": case.mask.astype(np.uint8),
        "labels": case.labels.astype(np.float32),
        "boxes": case.boxes,
        "instances": case.instances,
        "record": {
            "id": f"{modality}_{seed}_{index}",
            "text": text,
            "sections": sections,
            "triplets": triplets,
            "findings": [{"label": f.label, "side": f.side, "zone": f.zone, "size": f.size,
                          "slices": list(f.slices) if f.slices else None} for f in case.findings],
        },
    }


def generate_split(modality: str, split: str, n: int, size: Sequence[int], seed: int, prevalence: float,
                   cache_dir: Path, workers: int = 0, canonical_reports: float = 0.0) -> Path:
    """Generate (or reuse) one split; returns the folder holding ``arrays/*.npy`` and ``records.json``.

    ``canonical_reports`` (share of samples given their label set's canonical report) enters the cache key
    when it is non-zero; at 0 the key, and the data, are those of earlier versions.
    """
    parts: list[Any] = [GENERATOR_VERSION, modality, split, n, list(size), seed, prevalence]
    if canonical_reports:
        parts.append(["canonical_reports", float(canonical_reports)])
    key = json.dumps(parts)
    folder = Path(cache_dir) / "phantom" / f"{modality}_{split}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (folder / "records.json").is_file():
        _convert_npz(folder)  # folders written before the per-array layout
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(modality, seed, SPLIT_OFFSET[split] + i, list(size), prevalence, float(canonical_reports))
            for i in range(n)]
    if workers > 1 and n > 32:
        with ProcessPoolExecutor(workers) as pool:
            cases = list(track(pool.map(_render_one, jobs, chunksize=16), n, f"phantom {modality} {split}"))
    else:
        cases = [_render_one(j) for j in track(jobs, n, f"phantom {modality} {split}")]
    arrays = {"image": np.stack([c["image"] for c in cases]), "mask": np.stack([c["mask"] for c in cases]),
              "labels": np.stack([c["labels"] for c in cases])}
    if cases[0]["boxes"] is not None:
        arrays["boxes"] = np.stack([c["boxes"] for c in cases])
    if cases[0]["instances"] is not None:
        arrays["instances"] = np.stack([c["instances"] for c in cases]).astype(np.int32)
    write_arrays(folder, arrays)
    atomic_write_text(folder / "records.json", json.dumps([c["record"] for c in cases]))  # written last
    log.info("generated %d phantom %s/%s samples in %s", n, modality, split, folder)
    return folder


ARRAYS = "arrays"  # folder of one ``<name>.npy`` per array of a split


def write_arrays(folder: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as ``folder/arrays/<name>.npy`` (into a temporary folder renamed at the end)."""
    tmp = folder / f".{ARRAYS}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
    shutil.rmtree(folder / ARRAYS, ignore_errors=True)
    os.replace(tmp, folder / ARRAYS)


def _convert_npz(folder: Path) -> None:
    """One-time copy of a legacy ``arrays.npz`` into the per-array ``.npy`` layout (same arrays; the ``.npz``
    is left in place, so a checkout of an earlier version can still read the folder)."""
    legacy = folder / "arrays.npz"
    if (folder / ARRAYS).is_dir() or not legacy.is_file():
        return
    with np.load(legacy) as z:
        write_arrays(folder, {k: z[k] for k in z.files})


class SplitArrays(Mapping[str, np.ndarray]):
    """The arrays of one generated split, memory-mapped read-only on first access.

    Pickles as its folder (DataLoader workers map the files themselves instead of receiving copies).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._maps: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            _convert_npz(self.folder)
            self._maps = {p.stem: np.load(p, mmap_mode="r", allow_pickle=False)
                          for p in sorted((self.folder / ARRAYS).glob("*.npy"))}
        return self._maps

    def __getitem__(self, name: str) -> np.ndarray:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_maps": None}


@register_datamodule("phantom")
class PhantomDataModule(VLPDataModule):
    """Procedural phantom data of one modality.

    Args:
        modality: ``xray`` | ``ct`` | ``mri`` | ``em``.
        num_train: training samples.
        num_val: validation samples.
        num_test: test samples.
        image_size: 2D side length (X-ray).
        volume_size: ``(D, H, W)`` for CT/MRI/EM.
        prevalence: probability of each finding.
        seed: generator seed (same seed → identical data).
        cache_dir: where generated arrays live (default ``$MEDVLP_CACHE`` or ``~/.cache/medvlp``).
        augment: random intensity scale/shift on training images (MONAI dict transforms).
        generate_workers: processes used to generate.
        captions: optional caption source spec (see :func:`medvlp.datamodules.volume.captions.attach_captions`).
        text_sections: report sections joined into ``text``, in order (MGCA's convention, as in
            :class:`~medvlp.datamodules.xray.chest.MIMICCXRDataModule`: impression then findings, so the summary
            survives truncation); ``None`` keeps the full report with its ``EXAMINATION``/``FINDINGS``/
            ``IMPRESSION`` headers.
        canonical_reports: share in ``[0, 1]`` of studies (drawn per sample from the seed and the sample
            index, see :func:`uses_canonical_report`) whose report is replaced by the canonical report of its
            label set (:func:`~medvlp.datamodules.phantom.reports.canonical_report`): at 1.0 every two
            studies with the same labels have the identical report, the false negatives of in-batch
            contrast; images and labels never change. It enters the cache key and ``dataset_version``
            when non-zero; 0 gives the free-text reports, bit-identical to earlier versions.
        **loader_kwargs: ``batch_size``, ``num_workers`` … of :class:`VLPDataModule`.
    """

    name = "phantom"
    #: ``(mean, std)`` applied to [0, 1] intensities (reference protocols renormalise from it)
    intensity_norm = (NORM_MEAN, NORM_STD)

    def __init__(self, modality: str = "xray", num_train: int = 512, num_val: int = 128, num_test: int = 256,
                 image_size: int = 64, volume_size: Sequence[int] = (32, 64, 64), prevalence: float | None = None,
                 seed: int = 0, cache_dir: str | None = None, augment: bool = True, generate_workers: int = 0,
                 captions: Mapping[str, Any] | None = None,
                 text_sections: Sequence[str] | None = ("impression", "findings"), canonical_reports: float = 0.0,
                 **loader_kwargs: Any) -> None:
        super().__init__(**loader_kwargs)
        if modality not in MODALITIES:
            raise ValueError(f"phantom modality must be one of {sorted(MODALITIES)}, got {modality!r}")
        self.modality = modality
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        _, self._label_names, self._spatial_dims = MODALITIES[modality]
        self.size = [image_size] if self._spatial_dims == 2 else [int(v) for v in volume_size]
        default_prev = {"xray": 0.3, "ct": 0.3, "mri": 0.35, "em": 0.5}[modality]
        self.prevalence = default_prev if prevalence is None else prevalence
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.augment = augment
        self.generate_workers = generate_workers
        self.captions = dict(captions) if captions else None
        unknown = set(text_sections or ()) - {"findings", "impression"}
        if unknown:
            raise ValueError(f"phantom text_sections may name 'findings' and 'impression', got {sorted(unknown)}")
        self.text_sections = list(text_sections) if text_sections is not None else None
        if not 0.0 <= float(canonical_reports) <= 1.0:
            raise ValueError(f"phantom canonical_reports is a share in [0, 1], got {canonical_reports!r}")
        self.canonical_reports = float(canonical_reports)
        self._arrays: dict[Path, SplitArrays] = {}  # one mapping per split folder

    def split_arrays(self, split: str) -> SplitArrays:
        """The memory-mapped arrays of ``split`` (generated on first use), shared by every dataset of it."""
        folder = self._folder(split)
        if folder not in self._arrays:
            self._arrays[folder] = SplitArrays(folder)
        return self._arrays[folder]

    @property
    def label_names(self) -> list[str]:
        return list(self._label_names)

    def class_prompts(self) -> dict[str, list[str]]:
        return {n: [f"There is {n.lower()}.", f"{n} is present.", f"Findings consistent with {n.lower()}."]
                for n in self.label_names}

    def encoder_hints(self) -> dict[str, Any]:
        if self.spatial_dims == 2:
            return {"spatial_dims": [2], "img_size_2d": self.size[0]}
        return {"spatial_dims": [3], "img_size_3d": list(self.size)}

    def prepare_data(self) -> None:
        for split in ("train", "val", "test"):
            self._folder(split)

    def _folder(self, split: str) -> Path:
        return generate_split(self.modality, split, self.sizes[split], self.size, self.seed, self.prevalence,
                              self.cache_dir, self.generate_workers, self.canonical_reports)

    @property
    def spatial_dims(self) -> int:
        return self._spatial_dims

    @property
    def dataset_version(self) -> str:
        sizes = "-".join(str(self.sizes[k]) for k in ("train", "val", "test"))
        canon = f"-canon{self.canonical_reports:g}" if self.canonical_reports else ""
        return (f"phantom-v{GENERATOR_VERSION}-{self.modality}-seed{self.seed}-{'x'.join(map(str, self.size))}"
                f"-n{sizes}-p{self.prevalence:g}{canon}")

    def build_dataset(self, split: str, augment: bool) -> RecordDataset:
        folder = self._folder(split)
        arrays = self.split_arrays(split)
        records = json.loads((folder / "records.json").read_text())
        transform = None
        if self.augment and augment:
            transform = Compose([RandScaleIntensityd("image", factors=0.1, prob=0.8),
                                 RandShiftIntensityd("image", offsets=0.1, prob=0.8)])
        label_names = self.label_names
        modality = self.modality
        text_sections = self.text_sections

        def load(rec: Mapping[str, Any]) -> dict[str, Any]:
            i = rec["_row"]
            img = (torch.from_numpy(arrays["image"][i].astype(np.float32)) - NORM_MEAN) / NORM_STD
            sample: dict[str, Any] = {
                "image": img.unsqueeze(0),
                "modality": modality,
                "text": (rec["text"] if text_sections is None
                         else " ".join(rec["sections"][k] for k in text_sections if rec["sections"][k])),
                "sections": rec["sections"],
                "labels": torch.from_numpy(np.array(arrays["labels"][i])),
                "label_names": label_names,
                "mask": torch.from_numpy(arrays["mask"][i].astype(np.int64)).unsqueeze(0),
                "meta": {"id": rec["id"], "findings": rec["findings"]},
            }
            if "boxes" in arrays:
                sample["regions"] = torch.from_numpy(np.array(arrays["boxes"][i]))
                sample["region_present"] = torch.ones(len(XRAY_REGIONS), dtype=torch.bool)
            if "instances" in arrays:
                sample["instances"] = torch.from_numpy(arrays["instances"][i].astype(np.int64)).unsqueeze(0)
            if transform is not None:
                sample = transform(sample)
                image = sample["image"]
                sample["image"] = image.as_tensor() if hasattr(image, "as_tensor") else image
            return sample

        recs = [{**r, "_row": i} for i, r in enumerate(records)]
        ds = RecordDataset(recs, load, on_error="fail", name=f"phantom/{modality}/{split}")
        return attach_captions(ds, self.captions) if self.captions else ds

    def region_names(self) -> list[str]:
        """Anatomical region vocabulary of ``regions`` (X-ray)."""
        return list(XRAY_REGIONS) if self.modality == "xray" else []
