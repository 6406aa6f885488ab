"""3D datamodules: reading, MONAI dict-transform preprocessing and caching of deterministic steps.

Pipeline (MONAI ``Compose``; deterministic first so ``CacheDataset``/``PersistentDataset`` cache it):
``ReadVolumed`` → (CT) ``RescaleHUd`` → ``Orientationd(RAS)`` → ``Spacingd(pixdim)`` (optional) →
``ScaleIntensityRanged`` (window) or ``ScaleIntensityRangePercentilesd`` → ``ResizeWithPadOrCropd`` or
``Resized`` to ``volume_size`` → [train: ``RandFlipd``, ``RandScaleIntensityd``, ``RandShiftIntensityd``].
Arrays leave as ``(C, D, H, W)`` (axial slices first).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset as MonaiDataset, MetaTensor, PersistentDataset
from monai.transforms import (
    CenterSpatialCropd, Compose, MapTransform, Orientationd, RandFlipd, RandScaleIntensityd, RandShiftIntensityd,
    RandSpatialCropd, Resized, SpatialPadd,
    ResizeWithPadOrCropd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd, Spacingd,
)
from torch.utils.data import Dataset

from medvlp.checks import check_choice
from medvlp.datamodules.base import SkippingDataset
from medvlp.datamodules.io.readers import MAX_VOLUME_VOXELS, NONFINITE_POLICIES, DataError, read_volume
from medvlp.datamodules.io.store import _sha1, volume_spec
from medvlp.datamodules.tabular import RecordDataModule
from medvlp.progress import bars_enabled
import torch.distributed as dist
from medvlp.datamodules.volume.captions import build_caption_source
import os

log = logging.getLogger(__name__)


class ReadVolumed(MapTransform):
    """Read ``record[key]`` (a path, ``path:h5key`` or a list of paths = channels) into a channel-first
    MetaTensor with its affine.

    A 4D volume (e.g. NIfTI ``(x, y, z, c)``) needs an explicit ``channels`` selection (indices of the
    last axis, or ``"all"``); with ``channels=None`` it is a :class:`DataError` naming the file and its
    shape, never a silent first channel. A volume whose header shape exceeds ``max_voxels`` is a
    :class:`DataError` naming the file, the shape and the limit, raised before it is decompressed.
    """

    def __init__(self, keys: Sequence[str], channels: Sequence[int] | str | None = None,
                 allow_missing_keys: bool = True, nonfinite: str = "fail",
                 max_voxels: int | None = MAX_VOLUME_VOXELS) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_voxels = max_voxels
        if isinstance(channels, str):
            check_choice("channels", channels, ("all",), type(self).__name__)
        self.channels = channels
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES, type(self).__name__)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
            arrays, affine = [], np.eye(4)
            for p in paths:
                arr, affine = read_volume(p, nonfinite=self.nonfinite, max_voxels=self.max_voxels)
                if arr.ndim == 4:
                    if self.channels is None:
                        raise DataError(f"{p}: 4D volume of shape {tuple(arr.shape)} where a 3D volume is expected; "
                                        f"select channels (e.g. channels=[0], or channels=all)")
                    chans = list(range(arr.shape[-1])) if self.channels == "all" else [int(c) for c in self.channels]
                    bad = [c for c in chans if not -arr.shape[-1] <= c < arr.shape[-1]]
                    if bad:
                        raise DataError(f"{p}: channels {bad} out of range for a 4D volume with {arr.shape[-1]} channels")
                    arrays.extend(arr[..., c] for c in chans)
                else:
                    arrays.append(arr)
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise DataError(f"{paths}: channel volumes differ in shape {sorted(shapes)}")
            d[key] = MetaTensor(torch.from_numpy(np.stack(arrays)), affine=torch.as_tensor(affine, dtype=torch.float64))
        return d


class RescaleHUd(MapTransform):
    """Apply ``HU = slope · x + intercept`` unless the volume is already in HU.

    CT-RATE v2 volumes are stored in HU already; applying RescaleSlope/Intercept again (CT-CLIP issue #50)
    shifts them by −1024. The volume counts as HU when it has negative values.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            slope, intercept = float(d.get("slope", 1.0)), float(d.get("intercept", 0.0))
            if float(img.min()) >= 0 and (slope != 1.0 or intercept != 0.0):
                d[key] = img * slope + intercept
        return d


class VolumeDataModule(RecordDataModule):
    """Base of 3D datamodules; subclasses provide :meth:`index` records with ``image`` (path/paths),
    optional ``label`` (mask path), ``labels`` (array), ``text``.

    ``medvlp prepare`` stores each record's deterministic pipeline output (:attr:`prepare_from_pipeline`);
    a datamodule that cuts its own samples from a record (EM) sets it False and is stored as it loads.

    Args:
        volume_size: output ``(D, H, W)``.
        pixdim: target spacing (mm, in RAS x, y, z order) or None to keep the native grid.
        window: ``(a_min, a_max)`` intensity window mapped to [0, 1] (CT: HU), or None for the
            0.5–99.5 percentile range (MRI/EM).
        resize: ``pad_crop`` (centre pad/crop after spacing), ``resize`` (interpolate the whole volume) or
            ``random_crop`` (pad to at least ``volume_size``, then a random ``volume_size`` crop in training and
            the centre crop in evaluation; GTGM's 32×160×160 training crops).
        cache: ``none`` | ``memory`` (CacheDataset) | ``disk`` (PersistentDataset in ``cache_dir``, default
            ``$MEDVLP_CACHE/volumes/<datamodule>``; the paper preset's default for CT-RATE, MSD, BTCV, BraTS).
        channels: channels kept from 4D volumes (indices of the last axis, or ``all``); ``None``: a 4D
            volume is an error naming the file.
        nonfinite: ``fail`` (NaN/Inf is an error naming the file) or ``zero`` (replaced by 0).
        max_voxels: largest volume read (voxels, checked from the file header before decompressing; default
            :data:`~medvlp.datamodules.io.readers.MAX_VOLUME_VOXELS` = 512³; ``null``: no limit).
        orientation: RAS reorientation (off for EM stacks without a meaningful affine).
        captions: caption source spec for GTGM (see :mod:`medvlp.datamodules.volume.captions`).
        prepared: a folder written by ``medvlp prepare`` for this dataset and spec: the deterministic steps
            are read from its shards (by id) and only the random augmentations run.

    ``cache: disk`` keeps MONAI ``PersistentDataset`` files in ``cache_dir/<spec hash>/`` (a changed
    preprocessing never reads stale files). Under ``torch.distributed`` rank 0 builds the whole cache of a
    split before the other ranks start (they wait at a barrier), so ranks never decode the same volume.
    """

    modality = "ct"
    #: ``medvlp prepare`` stores the deterministic pipeline output of each record (False: as :meth:`load` cuts it)
    prepare_from_pipeline = True

    def __init__(self, root: str, volume_size: Sequence[int] = (32, 96, 96), pixdim: Sequence[float] | None = None,
                 window: Sequence[float] | None = None, resize: str = "resize", cache: str = "none",
                 cache_dir: str | None = None, channels: Sequence[int] | str | None = None, orientation: bool = True,
                 captions: Mapping[str, Any] | None = None, nonfinite: str = "fail", prepared: str | None = None,
                 max_voxels: int | None = MAX_VOLUME_VOXELS, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.prepared = prepared
        self.max_voxels = max_voxels
        self._store: Any = None
        self.cache_built: dict[str, int] = {}  # items this process wrote to the disk cache before training
        if prepared and type(self).load is not VolumeDataModule.load:
            raise ValueError(f"{type(self).__name__} cuts samples itself; read its prepared shards with data=shards "
                             f"(data.init_args.prepared={prepared})")

        self.caption_source = build_caption_source(captions) if captions else None
        self.volume_size = [int(v) for v in volume_size]
        self.pixdim, self.window, self.resize, self.cache = pixdim, window, resize, cache
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.channels, self.orientation = channels, orientation
        owner = type(self).__name__
        if isinstance(channels, str):
            check_choice("channels", channels, ("all",), owner)
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES, owner)
        check_choice("resize", resize, ("resize", "pad_crop", "random_crop"), owner)
        check_choice("cache", cache, ("none", "memory", "disk"), owner)
        if cache == "disk" and self.cache_dir is None:  # default: $MEDVLP_CACHE/volumes/<datamodule>

            self.cache_dir = Path(os.environ.get("MEDVLP_CACHE", Path.home() / ".cache" / "medvlp")) / "volumes" / self.name

    @property
    def spatial_dims(self) -> int:
        return 3

    def encoder_hints(self) -> dict[str, Any]:
        return {"spatial_dims": [3], "img_size_3d": list(self.volume_size)}

    def deterministic_steps(self) -> list[Any]:
        """Read → HU rescale (CT) → RAS → spacing → intensity window → size (cached / prepared part)."""
        keys = ["image", "label"]
        xyz = list(reversed(self.volume_size))  # MONAI works in (x, y, z)
        steps: list[Any] = [ReadVolumed(keys, self.channels, nonfinite=self.nonfinite, max_voxels=self.max_voxels)]
        if self.modality == "ct":
            steps.append(RescaleHUd(["image"]))
        if self.orientation:
            steps.append(Orientationd(keys, axcodes="RAS", allow_missing_keys=True))
        if self.pixdim:
            steps.append(Spacingd(keys, pixdim=tuple(self.pixdim), mode=("bilinear", "nearest"), allow_missing_keys=True))
        if self.window:
            steps.append(ScaleIntensityRanged("image", self.window[0], self.window[1], 0.0, 1.0, clip=True))
        else:
            steps.append(ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True))
        if self.resize == "pad_crop":
            steps.append(ResizeWithPadOrCropd(keys, xyz, allow_missing_keys=True))
        elif self.resize == "random_crop":  # pad here; the crop itself is in crop_steps (random in training)
            steps.append(SpatialPadd(keys, xyz, allow_missing_keys=True))
        else:
            steps.append(Resized(keys, xyz, mode=("trilinear", "nearest"), allow_missing_keys=True))
        return steps

    @staticmethod
    def random_steps() -> list[Any]:
        """Training augmentations (after the deterministic steps)."""
        keys = ["image", "label"]
        return [RandFlipd(keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
                RandScaleIntensityd("image", 0.1, prob=0.8), RandShiftIntensityd("image", 0.1, prob=0.8)]

    def crop_steps(self, augment: bool) -> list[Any]:
        """``resize: random_crop``: a random ``volume_size`` crop in training, the centre crop otherwise."""
        if self.resize != "random_crop":
            return []
        keys, xyz = ["image", "label"], list(reversed(self.volume_size))
        return [RandSpatialCropd(keys, xyz, random_size=False, allow_missing_keys=True) if augment
                else CenterSpatialCropd(keys, xyz, allow_missing_keys=True)]

    def transforms(self, augment: bool) -> Compose:
        return Compose(self.deterministic_steps() + self.crop_steps(augment) + (self.random_steps() if augment else []))

    def prepared_spec(self, size: int | None = None) -> dict[str, Any]:
        """What ``medvlp prepare`` stores for this datamodule: volumes after the deterministic steps
        (:func:`~medvlp.datamodules.io.store.volume_spec`; ``size`` is for 2D images only)."""
        return volume_spec(self)

    def spec_hash(self) -> str:
        """Hash of the deterministic preprocessing (names the disk cache folder)."""
        return _sha1(self.prepared_spec())

    @staticmethod
    def _monai_input(record: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in record.items()
                if k in ("image", "label", "slope", "intercept")}

    def load(self, record: Mapping[str, Any], augment: bool) -> dict[str, Any]:
        """One sample through the pipeline (or from ``prepared``).

        Raises:
            DataError: naming the file when it cannot be read or preprocessed.
        """
        if self.store is not None:
            arrays, _ = self.store.read(record["id"])
            item: dict[str, Any] = {"image": torch.from_numpy(arrays["image"].astype(np.float32)).permute(0, 3, 2, 1)}
            if "mask" in arrays:
                item["label"] = torch.from_numpy(arrays["mask"].astype(np.float32)).permute(0, 3, 2, 1)
            steps = self.crop_steps(augment) + (self.random_steps() if augment else [])
            if steps:
                item = Compose(steps)(item)
        else:
            try:
                item = self.transforms(augment)(self._monai_input(record))
            except Exception as exc:  # MONAI wraps transform errors; surface the DataError naming the file
                cause: BaseException | None = exc
                while cause is not None and not isinstance(cause, DataError):
                    cause = cause.__cause__ or cause.__context__
                raise (cause if isinstance(cause, DataError) else DataError(f"{record['image']}: {exc}")) from exc
        sample = self.to_sample(item, record)
        if self.caption_source is not None:
            sample["caption"] = self.caption_source(sample)
        return sample

    def build_dataset(self, split: str, augment: bool) -> Dataset:
        if self.store is not None:
            return RecordDataModule.build_dataset(self, split, augment)
        records = self.records(split)
        self.check_split(split, records)
        data = [self._monai_input(r) for r in records]
        transform = self.transforms(augment)
        if self.cache == "memory":
            monai_ds: Dataset = CacheDataset(data, transform, progress=bars_enabled())
        elif self.cache == "disk":
            monai_ds = PersistentDataset(data, transform, cache_dir=self.cache_dir / self.spec_hash())
            self.cache_built[split] = build_disk_cache(monai_ds, f"{type(self).__name__}/{split}")
        else:
            monai_ds = MonaiDataset(data, transform)
        return VolumeRecordDataset(monai_ds, records, self, f"{type(self).__name__}/{split}")

    def to_sample(self, item: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
        """MONAI output (x, y, z) → batch-schema sample (C, D, H, W)."""
        image = torch.as_tensor(item["image"]).float().permute(0, 3, 2, 1).contiguous()
        sample: dict[str, Any] = {"image": (image - 0.5) / 0.25, "modality": self.modality,
                                  "meta": {"id": record["id"], "path": str(record["image"])}}
        if "label" in item:
            sample["mask"] = torch.as_tensor(item["label"]).round().long().permute(0, 3, 2, 1).contiguous()
        return add_record_targets(sample, record, self.label_names)


def add_record_targets(sample: dict[str, Any], record: Mapping[str, Any], label_names: list[str]) -> dict[str, Any]:
    """Add a record's ``labels`` (float, with ``label_names``) and non-empty ``text`` to ``sample``; returns it."""
    if "labels" in record:
        sample["labels"] = torch.as_tensor(record["labels"], dtype=torch.float32)
        sample["label_names"] = label_names
    if record.get("text"):
        sample["text"] = record["text"]
    return sample


def build_disk_cache(ds: PersistentDataset, name: str) -> int:
    """Under ``torch.distributed``: rank 0 writes every item's cache file, the other ranks wait at a barrier
    (so N ranks never decode the same volume N times). Without a process group the cache fills lazily.
    Returns the number of items rank 0 preprocessed (0 elsewhere). Unreadable items are left uncached (the
    dataset's skip policy handles them when they are read)."""

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    built = 0
    if dist.get_rank() == 0:
        for i in range(len(ds.data)):
            try:
                ds._cachecheck(ds.data[i])  # writes the cache file when absent (MONAI: temp file + rename)
                built += 1
            except Exception as exc:  # noqa: BLE001 - reported when the item is read under on_error
                log.warning("%s: cache build failed for item %d: %s", name, i, exc)
        log.info("%s: rank 0 built the disk cache of %d items", name, built)
    dist.barrier()
    return built


class VolumeRecordDataset(SkippingDataset):
    """MONAI dataset + record metadata + the datamodule's skip policy (see :class:`SkippingDataset`)."""

    def __init__(self, monai_ds: Dataset, records: Sequence[Mapping[str, Any]], dm: VolumeDataModule, name: str) -> None:
        super().__init__(len(records), dm.on_error, name)
        self.monai_ds, self.records, self.dm = monai_ds, list(records), dm

    def read(self, i: int) -> dict[str, Any]:
        try:
            item = self.monai_ds[i]
        except Exception as exc:  # MONAI wraps transform errors; surface the DataError naming the file
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__ or cause.__context__
            raise (cause if isinstance(cause, DataError) else DataError(f"{self.records[i]['image']}: {exc}")) from exc
        sample = self.dm.to_sample(item, self.records[i])
        sample["index"] = i
        caption = getattr(self.dm, "caption_source", None)
        if caption is not None:
            sample["caption"] = caption(sample)
        return sample
