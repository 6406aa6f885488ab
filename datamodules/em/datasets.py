"""Electron microscopy volumes: CREMI (HDF5), SNEMI3D/AC3/AC4 (TIFF or HDF5), Lucchi (TIFF, 0/255 masks)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medvlp.datamodules.io.readers import DataError, read_volume
from medvlp.datamodules.tabular import RecordDataModule
from medvlp.datamodules.volume.base import VolumeDataModule
from medvlp.registry import register_datamodule


class EMDataModule(VolumeDataModule):
    """Shared EM handling: volumes are (z, y, x) stacks cut into ``volume_size`` sub-volumes on a regular
    grid (no reorientation); intensities by percentiles; instance labels kept in ``instances``."""

    modality = "em"
    prepare_from_pipeline = False  # load() cuts its own samples from each volume

    def __init__(self, root: str, volume_size: Sequence[int] = (16, 128, 128), val_fraction: float = 0.1,
                 test_fraction: float = 0.2, **kwargs: Any) -> None:
        kwargs.setdefault("orientation", False)
        kwargs.setdefault("resize", "pad_crop")
        super().__init__(root, volume_size=volume_size, **kwargs)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._arrays: dict[str, np.ndarray] = {}

    def volumes(self) -> list[tuple[str, str, str | None]]:
        """``(name, raw_path[:key], label_path[:key] or None)`` per source volume."""
        raise NotImplementedError

    def _array(self, ref: str) -> np.ndarray:
        if ref not in self._arrays:
            arr, _ = read_volume(ref)
            self._arrays[ref] = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
        return self._arrays[ref]

    def index(self) -> list[dict[str, Any]]:
        out = []
        d, h, w = self.volume_size
        for name, raw, lab in self.volumes():
            shape = self._array(raw).shape
            if lab is not None and self._array(lab).shape != shape:
                raise DataError(f"{lab}: label shape {self._array(lab).shape} != raw shape {shape} ({raw})")
            zs = list(range(0, max(shape[0] - d, 0) + 1, d))
            n = len(zs)
            for k, z in enumerate(zs):  # contiguous z-blocks: last blocks test, then val (no leakage)
                split = "test" if k >= n * (1 - self.test_fraction) else (
                    "val" if k >= n * (1 - self.test_fraction - self.val_fraction) else "train")
                for y in range(0, max(shape[1] - h, 0) + 1, h):
                    for x in range(0, max(shape[2] - w, 0) + 1, w):
                        out.append({"id": f"{name}_z{z}_y{y}_x{x}", "split": split, "raw": raw, "lab": lab,
                                    "box": (z, y, x), "image": raw})
        return out

    def build_dataset(self, split: str, augment: bool) -> Any:
        # EM blocks are cut from in-memory stacks by ``load``: the record path, not the MONAI pipeline
        return RecordDataModule.build_dataset(self, split, augment)

    def load(self, record: Mapping[str, Any], augment: bool) -> dict[str, Any]:
        d, h, w = self.volume_size
        z, y, x = record["box"]
        raw = self._array(record["raw"])[z:z + d, y:y + h, x:x + w].astype(np.float32)
        lo, hi = np.percentile(raw, [0.5, 99.5])
        img = np.clip((raw - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
        pad = [(0, t - s) for s, t in zip(img.shape, (d, h, w))]
        img = np.pad(img, pad)
        if augment:  # intensity jitter only: flips would have to be mirrored on the labels
            img = (img * np.random.uniform(0.9, 1.1) + np.random.uniform(-0.1, 0.1)).astype(np.float32)
        sample: dict[str, Any] = {"image": (torch.from_numpy(np.ascontiguousarray(img))[None] - 0.5) / 0.25,
                                  "modality": "em", "meta": {"id": record["id"], "path": record["raw"]}}
        if record["lab"] is not None:
            lab = np.pad(self._array(record["lab"])[z:z + d, y:y + h, x:x + w], pad)
            sample.update(self.label_targets(lab))
        if self.caption_source is not None:
            sample["caption"] = self.caption_source(sample)
        return sample

    def label_targets(self, lab: np.ndarray) -> dict[str, torch.Tensor]:
        """Targets from a label block: ``mask`` (semantic) and optionally ``instances``."""
        raise NotImplementedError


@register_datamodule("cremi")
class CREMIDataModule(EMDataModule):
    """CREMI ``sample_{A,B,C}_20160501.hdf``: raw ``volumes/raw``, neuron ids ``volumes/labels/neuron_ids``
    (uint64; 2^64−1 = unlabeled). Mask = cell boundaries (voxels whose 6-neighbourhood has another id);
    ``instances`` keep the neuron ids for VOI."""

    name = "cremi"
    UNLABELED = np.iinfo(np.uint64).max

    def __init__(self, root: str, samples: Sequence[str] = ("A", "B", "C"), **kwargs: Any) -> None:
        self.samples = list(samples)
        super().__init__(root, **kwargs)

    def volumes(self) -> list[tuple[str, str, str | None]]:
        out = []
        for s in self.samples:
            f = next(iter(sorted(Path(self.root).glob(f"sample_{s}_*.hdf"))), None)
            if f is None:
                raise DataError(f"{self.root}: no sample_{s}_*.hdf")
            out.append((f"cremi_{s}", f"{f}:volumes/raw", f"{f}:volumes/labels/neuron_ids"))
        return out

    def _array(self, ref: str) -> np.ndarray:
        if ref not in self._arrays and ref.endswith("neuron_ids"):
            import h5py  # lazy: optional format reader (HDF5)

            path, key = ref.rsplit(":", 1)
            with h5py.File(path, "r") as f:
                if key not in f:
                    raise DataError(f"{path}: HDF5 key {key!r} not found")
                ids = np.asarray(f[key]).astype(np.uint64)
            ids[ids == self.UNLABELED] = 0
            self._arrays[ref] = ids.astype(np.int64)
        return super()._array(ref)

    def label_targets(self, lab: np.ndarray) -> dict[str, torch.Tensor]:
        boundary = np.zeros(lab.shape, bool)
        for ax in range(3):
            diff = np.diff(lab, axis=ax) != 0
            sl = [slice(None)] * 3
            sl[ax] = slice(1, None)
            boundary[tuple(sl)] |= diff
        return {"mask": torch.from_numpy(boundary.astype(np.int64))[None],
                "instances": torch.from_numpy(lab.astype(np.int64))[None]}


@register_datamodule("snemi")
class SNEMIDataModule(CREMIDataModule):
    """SNEMI3D / AC4 / AC3: ``train-input.tif`` + ``train-labels.tif`` (or torch-em HDF5 with
    ``volumes/raw`` and ``volumes/labels/neuron_ids``). Targets as CREMI (boundaries + instances)."""

    name = "snemi"

    def __init__(self, root: str, raw: str = "train-input.tif", labels: str = "train-labels.tif", **kwargs: Any) -> None:
        self.raw_name, self.label_name = raw, labels
        super().__init__(root, samples=(), **kwargs)

    def volumes(self) -> list[tuple[str, str, str | None]]:
        raw, lab = Path(self.root) / self.raw_name, Path(self.root) / self.label_name
        if raw.suffix in (".h5", ".hdf", ".hdf5"):
            return [("snemi", f"{raw}:volumes/raw", f"{raw}:volumes/labels/neuron_ids")]
        return [("snemi", str(raw), str(lab) if lab.is_file() else None)]

    def _array(self, ref: str) -> np.ndarray:
        if ref.endswith(".tif") and ref == str(Path(self.root) / self.label_name) and ref not in self._arrays:
            arr, _ = read_volume(ref)
            self._arrays[ref] = arr.astype(np.int64)
        return super()._array(ref)


@register_datamodule("lucchi")
class LucchiDataModule(EMDataModule):
    """Lucchi / EPFL mitochondria: ``training.tif`` + ``training_groundtruth.tif`` and ``testing*.tif``
    (or Rhoana ``train_im.tif``/``train_label.tif``/``test_im.tif``/``test_label.tif``); masks are 0/255
    (binarised with ``== 255``; other values raise a clear error). Test blocks come from the test stack."""

    name = "lucchi"

    def volumes(self) -> list[tuple[str, str, str | None]]:
        r = Path(self.root)
        pairs = [("training.tif", "training_groundtruth.tif", "testing.tif", "testing_groundtruth.tif"),
                 ("train_im.tif", "train_label.tif", "test_im.tif", "test_label.tif")]
        for tr, trl, te, tel in pairs:
            if (r / tr).is_file():
                return [("lucchi_train", str(r / tr), str(r / trl)), ("lucchi_test", str(r / te), str(r / tel))]
        raise DataError(f"{r}: no training.tif or train_im.tif")

    def index(self) -> list[dict[str, Any]]:
        recs = super().index()
        for rec in recs:  # the official test stack is the test split; train stack → train/val
            if rec["id"].startswith("lucchi_test"):
                rec["split"] = "test"
            elif rec["split"] == "test":
                rec["split"] = "val"
        return recs

    def label_targets(self, lab: np.ndarray) -> dict[str, torch.Tensor]:
        values = np.unique(lab)
        if not set(values.tolist()) <= {0, 255}:
            raise DataError(f"Lucchi mask has values {values[:5].tolist()} (expected 0/255)")
        return {"mask": torch.from_numpy((lab == 255).astype(np.int64))[None]}
