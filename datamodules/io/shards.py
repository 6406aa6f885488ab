"""Streaming pretraining from WebDataset-style tar shards (for corpora that do not fit one disk/loader).

A shard is a tar file whose members are grouped by key: ``<key>.npy`` (image, float16/32 ``(C, …)``),
``<key>.txt`` (report, optional), ``<key>.json`` (``labels``, ``label_names``, ``modality``, ``meta``,
optional ``caption``). This is the WebDataset layout, so shards written here are readable by
``webdataset`` and vice versa for these extensions. Shards are split across distributed ranks and
DataLoader workers (each shard read by exactly one worker of one rank per epoch), shuffled per epoch
with a seeded RNG, and samples are shuffled within a bounded buffer.

Shards written by ``medvlp prepare`` have a sidecar (``shard-000000.json``) recording every member's offset,
size and sha256; with ``verify`` (on by default for them) each member is checked when its shard is opened,
and a mismatch is a :class:`~medvlp.datamodules.io.readers.DataError` naming the shard, sample and member.
"""
from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medvlp.batch import collate
from medvlp.datamodules.base import VLPDataModule
from medvlp.datamodules.io.readers import DataError
from medvlp.io import atomic_write_bytes
from medvlp.registry import register_datamodule
from medvlp.datamodules.io.store import PreparedCollate, PreparedDecode, check_same_spec, read_manifest

log = logging.getLogger(__name__)


def write_shards(samples: Sequence[dict[str, Any]] | Any, out_dir: str | Path, samples_per_shard: int = 1000,
                 prefix: str = "shard") -> list[Path]:
    """Write batch-schema samples (an iterable of dicts) to ``<out_dir>/<prefix>-000000.tar`` …"""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    buf: io.BytesIO | None = None
    tar: tarfile.TarFile | None = None
    count = 0

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    def flush() -> None:
        nonlocal tar, buf
        if tar is not None and buf is not None:
            tar.close()
            paths.append(atomic_write_bytes(out_dir / f"{prefix}-{len(paths):06d}.tar", buf.getvalue()))
        tar, buf = None, None

    for i, s in enumerate(samples):
        if count % samples_per_shard == 0:
            flush()
            buf = io.BytesIO()
            tar = tarfile.open(fileobj=buf, mode="w")
        key = str(s.get("meta", {}).get("id", i)).replace("/", "_").replace(".", "_")
        arr = io.BytesIO()
        np.save(arr, s["image"].numpy().astype(np.float16), allow_pickle=False)
        add(tar, f"{key}.npy", arr.getvalue())
        if s.get("text"):
            add(tar, f"{key}.txt", s["text"].encode("utf-8"))
        meta = {"modality": s.get("modality"), "meta": s.get("meta", {}), "label_names": s.get("label_names")}
        if "labels" in s:
            meta["labels"] = [None if np.isnan(v) else float(v) for v in s["labels"].tolist()]
        if s.get("caption"):
            meta["caption"] = s["caption"]
        add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        count += 1
    flush()
    return paths


class EpochLoader(DataLoader):
    """DataLoader that advances its :class:`ShardStream`'s epoch before each pass, so every epoch reads
    shards in a new seeded order (the epoch lives in shared memory: persistent workers see it too)."""

    def __iter__(self) -> Any:
        self.dataset.epoch += 1  # type: ignore[attr-defined]
        return super().__iter__()


def count_samples(path: str) -> int:
    """Samples (keys with an ``.npy``/``.npz`` member) in one tar shard, from its member headers only.

    Raises:
        DataError: naming the shard when it cannot be read.
    """
    try:
        with tarfile.open(path) as tar:
            return len({name.rpartition(".")[0] for name in tar.getnames() if name.endswith((".npy", ".npz"))})
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{path}: unreadable shard ({exc})") from exc


class ShardStream(IterableDataset):
    """Iterate samples from tar shards, split across ranks and workers.

    With ``equalize`` every rank yields the same number of samples per epoch, ``samples_per_epoch //
    world_size`` (default: all samples in the shards), split as evenly as possible over its DataLoader
    workers; a worker whose own shards run out continues with the next shards of the epoch order
    (wrapping around), so uneven shard counts or sizes never give one rank more batches than another
    (which would deadlock DDP). Without it (evaluation) each shard is read by exactly one worker of one
    rank. ``rank``/``world_size`` default to the initialised process group. ``verify`` checks each member
    of a shard against its sidecar's sha256 when the shard is opened (see :meth:`read_shard`).
    """

    def __init__(self, shards: Sequence[str], shuffle_buffer: int = 256, seed: int = 0, equalize: bool = False,
                 samples_per_epoch: int | None = None, verify: bool = False) -> None:
        self.shards = sorted(str(s) for s in shards)
        self.shuffle_buffer, self.seed, self.equalize, self.verify = shuffle_buffer, seed, equalize, verify
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self.rank: int | None = None
        self.world_size: int | None = None
        self.samples_per_epoch = samples_per_epoch
        if equalize and samples_per_epoch is None:
            self.samples_per_epoch = sum(count_samples(p) for p in self.shards)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(int(value))

    def _slot(self) -> tuple[int, int, int, int]:
        """``(rank, world_size, worker_id, num_workers)``."""
        distributed = dist.is_available() and dist.is_initialized()
        rank = self.rank if self.rank is not None else (dist.get_rank() if distributed else 0)
        world = self.world_size if self.world_size is not None else (dist.get_world_size() if distributed else 1)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return rank, world, wid, nw

    def quota(self) -> int | None:
        """Samples this worker yields per epoch under ``equalize`` (None: read its shards once)."""
        if not self.equalize:
            return None
        _, world, wid, nw = self._slot()
        per_rank = int(self.samples_per_epoch or 0) // world
        return per_rank // nw + (1 if wid < per_rank % nw else 0)

    def _my_shards(self) -> Iterator[str]:
        rank, world, wid, nw = self._slot()
        order = list(self.shards)
        random.Random(self.seed + self.epoch).shuffle(order)
        slot, slots = rank * nw + wid, world * nw
        if not self.equalize:
            yield from order[slot::slots]
            return
        for k in itertools.count():  # own shards first, then the others in epoch order (bounded by the quota)
            yield order[(slot + k * slots) % len(order)]

    @staticmethod
    def read_shard(path: str, verify: bool = False) -> Iterator[dict[str, Any]]:
        """Samples of one shard in the batch schema (``uint8`` images stay ``uint8``; others float32).

        Args:
            path: the ``.tar`` shard.
            verify: check every member against the sha256 its sidecar records (``medvlp prepare`` shards).

        Raises:
            DataError: naming the shard and key for corrupt members (or a sha256 mismatch under ``verify``),
                a sample without ``.npy``, or ``verify`` on a shard without recorded hashes.
        """
        for key, parts in _shard_members(path, verify).items():
            if "npy" not in parts and "npz" not in parts:
                raise DataError(f"{path}: sample {key!r} has no .npy/.npz image")
            meta = json.loads(bytes(parts.get("json", b"{}")))
            arrays = ({"image": load_npy(parts["npy"])} if "npy" in parts else
                      dict(np.load(io.BytesIO(parts["npz"]), allow_pickle=False)))  # npz: `medvlp prepare` volumes
            image = arrays.pop("image")
            sample: dict[str, Any] = {"image": torch.from_numpy(image if image.dtype == np.uint8 else image.astype(np.float32)),
                                      "modality": meta.get("modality") or "xray", "meta": meta.get("meta") or {"id": key}}
            sample.update({k: torch.from_numpy(v.astype(np.int64)) for k, v in arrays.items()})  # mask, instances
            if "txt" in parts:
                sample["text"] = bytes(parts["txt"]).decode("utf-8")
            if meta.get("labels") is not None:
                sample["labels"] = torch.tensor([np.nan if v is None else v for v in meta["labels"]], dtype=torch.float32)
                sample["label_names"] = meta["label_names"]
            if meta.get("caption"):
                sample["caption"] = meta["caption"]
            yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _, wid, _ = self._slot()
        rng = random.Random(self.seed + self.epoch + 7919 * wid + 104729 * rank)
        quota = self.quota()
        if quota == 0:
            return
        buffer: list[dict[str, Any]] = []
        emitted = 0

        def samples() -> Iterator[dict[str, Any]]:
            for shard in self._my_shards():
                yield from self.read_shard(shard, self.verify)

        for s in samples():
            buffer.append(s)
            if quota is not None and emitted + len(buffer) >= quota:
                break  # enough read for this epoch: drain the buffer
            if len(buffer) >= max(self.shuffle_buffer, 1):
                yield buffer.pop(rng.randrange(len(buffer)))
                emitted += 1
        rng.shuffle(buffer)
        yield from buffer


def sidecar(path: str | Path) -> dict[str, Any] | None:
    """The ``medvlp prepare`` sidecar (``<shard>.json``) of a shard, ``None`` when there is none."""
    side = Path(path).with_suffix(".json")
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except ValueError as exc:
        raise DataError(f"{side}: unreadable shard sidecar ({exc})") from exc


_NPY_HEADER = re.compile(r"\{'descr': '([<>|]?[a-z]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")


def load_npy(data: bytes | memoryview) -> np.ndarray:
    """``np.load`` of one ``.npy`` member, without copying it: the C-order version-1 headers that ``np.save``
    writes are parsed directly (the array is then a view of ``data``, writable when ``data`` is), anything
    else goes through ``np.load``."""
    mv = memoryview(data)
    if bytes(mv[:8]) == b"\x93NUMPY\x01\x00":
        n = int.from_bytes(mv[8:10], "little")
        m = _NPY_HEADER.match(bytes(mv[10:10 + n]).decode("latin1"))
        if m is not None:
            shape = tuple(int(v) for v in m.group(2).replace(" ", "").split(",") if v)
            return np.frombuffer(mv, dtype=np.dtype(m.group(1)), offset=10 + n,
                                 count=math.prod(shape)).reshape(shape)
    return np.load(io.BytesIO(bytes(mv)), allow_pickle=False)


def _check(path: str | Path, what: str, data: bytes | memoryview, want: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise DataError(f"{path}: {what} has sha256 {got[:16]}…, its sidecar records {want[:16]}…; the shard is "
                        "corrupt (re-run `medvlp prepare`, which rewrites shards that fail verification)")


def _shard_members(path: str, verify: bool) -> dict[str, dict[str, bytes | memoryview]]:
    """``key → ext → bytes`` of one shard: by the sidecar's member offsets when it records them (each member
    checked against its sha256 under ``verify``), else by walking the tar headers."""
    side = sidecar(path) if verify or Path(path).with_suffix(".json").is_file() else None
    listed = side is not None and all("members" in s for s in side.get("samples", []))
    if verify and side is None:
        raise DataError(f"{path}: no sidecar with recorded sha256 (not written by `medvlp prepare`); "
                        "set verify_hashes=false to read it unverified")
    try:
        with open(path, "rb") as fh:  # one writable buffer: members are views of it (no copies)
            data = bytearray(os.fstat(fh.fileno()).st_size)
            fh.readinto(data)
    except OSError as exc:
        raise DataError(f"{path}: unreadable shard ({exc})") from exc
    groups: dict[str, dict[str, bytes | memoryview]] = {}
    if listed:
        view = memoryview(data)
        for s in side["samples"]:
            parts = groups.setdefault(s["key"], {})
            for ext, (off, size, digest) in s["members"].items():
                chunk = view[off:off + size]
                if len(chunk) != size:
                    raise DataError(f"{path}: member {s['key']}.{ext} is truncated ({len(chunk)} of {size} bytes)")
                if verify:
                    _check(path, f"member {s['key']}.{ext} (sample {s['id']!r})", chunk, digest)
                parts[ext] = chunk
        return groups
    if verify:  # an older sidecar: only the whole tar's sha256 is recorded
        _check(path, "the shard", data, side.get("sha256", ""))
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.rpartition(".")
                groups.setdefault(key, {})[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{path}: unreadable shard ({exc})") from exc
    return groups


@register_datamodule("shards")
class ShardDataModule(VLPDataModule):
    """Pretraining from tar shards: ``train``/``val``/``test`` are glob patterns or folders of ``*.tar``.

    Args:
        train: shard glob/folder for training (required). val, test: optional.
        shuffle_buffer: in-memory shuffle buffer (samples). seed: shard-order seed.
        spatial_dims: 2 or 3 (shards do not carry it). image_size / volume_size: encoder hints.
        label_names: class names (for benchmarks); defaults to those stored in the shards.
        prepared: a ``medvlp prepare`` output folder: fills unset ``train``/``val``/``test``, ``spatial_dims``,
            ``volume_size`` and ``label_names`` from its manifest; its uint8 images are resized to
            ``image_size`` at load. Sources of different prepare specs are refused.
        samples_per_epoch: samples per epoch over all ranks (default: every sample in the train shards);
            each rank yields ``samples_per_epoch // world_size`` (see :class:`ShardStream`).
        verify_hashes: check every member against the sha256 its ``medvlp prepare`` sidecar records when a
            shard is opened (a mismatch stops with an error naming shard, sample and member). Default: on for
            prepared shards, off for others (which record no hashes).
    """

    name = "shards"

    def __init__(self, train: str | None = None, val: str | None = None, test: str | None = None,
                 shuffle_buffer: int = 256, seed: int = 0, spatial_dims: int = 2, image_size: int = 224,
                 volume_size: Sequence[int] = (32, 128, 128), label_names: Sequence[str] | None = None,
                 prepared: str | None = None, samples_per_epoch: int | None = None,
                 verify_hashes: bool | None = None, **loader_kwargs: Any) -> None:
        super().__init__(**loader_kwargs)
        self.samples_per_epoch = samples_per_epoch

        if prepared:  # a `medvlp prepare` folder: splits, label names and dimensionality from its manifest
            manifest = read_manifest(prepared)
            given = {"train": train, "val": val, "test": test}
            for split, info in manifest["splits"].items():
                if info["n_samples"] and given.get(split) is None:
                    given[split] = str(Path(prepared) / split)
            train, val, test = given["train"], given["val"], given["test"]
            spatial_dims = int(manifest["spatial_dims"])
            if manifest["spec"]["kind"] == "volume":
                volume_size = manifest["spec"]["volume_size"]
            label_names = label_names or manifest["label_names"]
        if not train:
            raise ValueError("shards datamodule needs train shards (train=GLOB|FOLDER or prepared=FOLDER)")
        self.patterns = {"train": train, "val": val, "test": test}
        self.manifest = check_same_spec(v for v in self.patterns.values() if v)  # refuses mixed specs
        if self.manifest is not None:
            self.collate_fn = PreparedCollate(PreparedDecode(self.manifest["spec"], image_size), collate)
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.verify_hashes = self.manifest is not None if verify_hashes is None else bool(verify_hashes)
        self._spatial_dims, self.image_size, self.volume_size = spatial_dims, image_size, list(volume_size)
        self._label_names = list(label_names or [])

    @property
    def spatial_dims(self) -> int:
        return self._spatial_dims

    @property
    def label_names(self) -> list[str]:
        return self._label_names

    def encoder_hints(self) -> dict[str, Any]:
        if self._spatial_dims == 2:
            return {"spatial_dims": [2], "img_size_2d": self.image_size}
        return {"spatial_dims": [3], "img_size_3d": self.volume_size}

    def shards(self, split: str) -> list[str]:
        """Shard paths of a split."""
        pattern = self.patterns.get(split)
        if not pattern:
            raise DataError(f"shards datamodule has no {split!r} shards configured")
        found = sorted(glob.glob(str(Path(pattern) / "*.tar")) if Path(pattern).is_dir() else glob.glob(pattern))
        if not found:
            raise DataError(f"no shards match {pattern!r}")
        return found

    def build_dataset(self, split: str, augment: bool) -> ShardStream:
        # train/val: equal samples per rank (DDP); eval_dataloader: every sample once
        return ShardStream(self.shards(split), self.shuffle_buffer if split == "train" else 0, self.seed,
                           equalize=True, samples_per_epoch=self.samples_per_epoch if split == "train" else None,
                           verify=self.verify_hashes)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if self.patterns.get("val") else []

    def _loader(self, split: str, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return EpochLoader(self.dataset(split, augment=False), batch_size=self.batch_size, num_workers=self.num_workers,
                           collate_fn=self.collate_fn, drop_last=split == "train", pin_memory=self.pin_memory,
                           persistent_workers=self.persistent_workers)

    def eval_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        return DataLoader(ShardStream(self.shards(split), 0, self.seed, verify=self.verify_hashes), batch_size=batch_size or self.batch_size,
                          num_workers=self.num_workers, collate_fn=self.collate_fn, pin_memory=self.pin_memory)
