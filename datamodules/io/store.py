"""The on-disk format of prepared shards: the manifest (``index.json``), spec hashing, random access by id
(:class:`PreparedStore`) and the decode/collate that turns stored samples into batches.

Written by :func:`medvlp.datamodules.io.prepare.prepare`; read by the record datamodules (``prepared=``) and
:class:`~medvlp.datamodules.io.shards.ShardDataModule`. The spec of what a datamodule stores is built here
(:func:`image2d_spec`, :func:`volume_spec`), each datamodule choosing its kind (``prepared_spec``).
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from medvlp.datamodules.io.readers import DataError, resize_2d
import torch.nn.functional as F

FORMAT = "medvlp-prepared/1"
INDEX = "index.json"


def _sha1(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image2d_spec(dm: Any, size: int | None = None) -> dict[str, Any]:
    """The spec of 2D images stored as the datamodule makes them at ``image_size = size`` (default: its own
    ``image_size``), with its own decode kernel (``decode: fast``: JPEG draft + area resize on the 8-bit
    image; ``full`` and CSV manifests: full decode, then :func:`resize_2d`), min-max scaled, zero-padded to a
    ``size × size`` square and rounded to ``uint8``."""
    decode = getattr(dm, "decode", "full")  # a CSV manifest's 2D loader decodes in full
    resample = ("JPEG draft + area (PIL BOX) when shrinking, bilinear when enlarging" if decode == "fast" else
                "full decode, min-max, antialiased bilinear (resize_2d)")
    return {"kind": "image2d", "dtype": "uint8", "max_side": int(size or int(getattr(dm, "image_size", 224))),
            "decode": decode, "layout": "square: longer side max_side, zero-padded (resize_2d)",
            "intensity": "min-max to 0..255", "resample": resample, "modality": dm.modality}


def volume_spec(dm: Any) -> dict[str, Any]:
    """The spec of volumes stored after a volume datamodule's deterministic steps (float16, [0, 1])."""
    return {"kind": "volume", "dtype": "float16", "layout": "C,D,H,W in [0,1]", "modality": dm.modality,
            "volume_size": list(dm.volume_size), "pixdim": list(dm.pixdim) if dm.pixdim else None,
            "window": list(dm.window) if dm.window else None, "resize": dm.resize,
            "channels": dm.channels if dm.channels is None or isinstance(dm.channels, str) else list(dm.channels),
            "orientation": bool(dm.orientation), "nonfinite": dm.nonfinite,
            "datamodule": type(dm).__name__}


def _center_crop(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Centre crop (zero pad where smaller) of the last three axes to ``size``."""

    pads = []
    for have, want in zip(reversed(t.shape[-3:]), reversed(list(size))):
        extra = max(want - have, 0)
        pads += [extra // 2, extra - extra // 2]
    t = F.pad(t, pads) if any(pads) else t
    idx = [slice(None)] * (t.ndim - 3)
    for have, want in zip(t.shape[-3:], size):
        start = (have - want) // 2
        idx.append(slice(start, start + want))
    return t[tuple(idx)]


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a prepared folder.

    Raises:
        DataError: no ``index.json`` or not a medvlp prepared folder.
    """
    path = Path(folder) / INDEX
    if not path.is_file():
        raise DataError(f"{folder}: no {INDEX}; not a folder written by `medvlp prepare`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def manifest_of(shard_source: str | Path) -> dict[str, Any] | None:
    """Manifest of the prepared folder a shard folder/glob belongs to (``<out>/<split>``), or ``None``."""
    p = Path(str(shard_source))
    for folder in (p, p.parent, p.parent.parent):
        if (folder / INDEX).is_file():
            return read_manifest(folder)
    return None


def check_same_spec(sources: Iterable[str | Path]) -> dict[str, Any] | None:
    """The one manifest shared by shard sources (train/val/test), ``None`` when none is prepared.

    Raises:
        DataError: sources of different specs or datasets, or prepared and unprepared shards mixed.
    """
    found = [(str(s), manifest_of(s)) for s in sources if s]
    prepared = [(s, m) for s, m in found if m is not None]
    if not prepared:
        return None
    if len(prepared) != len(found):
        raw = [s for s, m in found if m is None]
        raise DataError(f"shard sources mix prepared and unprepared shards ({raw}); refusing to mix")
    hashes = {(m["dataset"], m["spec_hash"]) for _, m in prepared}
    if len(hashes) > 1:
        raise DataError(f"shard sources were prepared with different specs {sorted(hashes)}: "
                        f"{[s for s, _ in prepared]}; refusing to mix")
    return prepared[0][1]


def shard_counts(folder: str | Path, split: str) -> list[tuple[Path, int]]:
    """``(shard path, samples)`` of one prepared split, from the manifest (no shard is opened)."""
    manifest = read_manifest(folder)
    info = manifest["splits"].get(split)
    if info is None:
        raise DataError(f"{folder}: split {split!r} was not prepared (has {sorted(manifest['splits'])})")
    return [(Path(folder) / split / s["name"], int(s["n"])) for s in info["shards"]]


class PreparedDecode:
    """Turn a prepared sample (as read from a shard) into the datamodules' tensors, before normalisation.

    2D: the stored ``uint8`` square stays ``uint8`` ``(1, S, S)`` when ``S`` is the ``image_size`` (the
    default of :func:`prepare`); another stored size is resized to ``image_size`` (float in [0, 1]). Volumes
    ([0, 1]) get the centre crop of ``resize: random_crop``. :class:`PreparedCollate` normalises the batch
    (``(x − 0.5) / 0.25``) once. Picklable, so it runs in DataLoader workers (inside the collate function).
    """

    def __init__(self, spec: Mapping[str, Any], image_size: int) -> None:
        self.kind, self.image_size = spec["kind"], image_size
        # ``resize: random_crop`` volumes are stored padded; streamed shards take the centre crop
        self.crop = list(spec["volume_size"]) if spec.get("resize") == "random_crop" else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        img = sample["image"]
        if self.kind == "image2d":
            h, w = img.shape[-2:]
            if (h, w) == (self.image_size, self.image_size):
                img = img.unsqueeze(0) if img.ndim == 2 else img.reshape(1, h, w)
            else:  # prepared at another size: one resize, in float
                img = resize_2d(img.reshape(h, w).numpy().astype(np.float32) / 255.0, self.image_size)
        if self.crop is not None:
            img = _center_crop(img, self.crop)
            for k in ("mask", "instances"):
                if k in sample:
                    sample[k] = _center_crop(sample[k], self.crop)
        sample["image"] = img
        return sample


def normalise_batch(image: torch.Tensor) -> torch.Tensor:
    """``(x − 0.5) / 0.25`` of a batch in [0, 1] units: ``uint8`` (0..255) in one fused pass, or float."""
    if image.dtype == torch.uint8:
        return image.float().mul_(1.0 / (255.0 * 0.25)).sub_(0.5 / 0.25)
    return image.float().sub_(0.5).div_(0.25)


class PreparedCollate:
    """``collate(decode(sample) for sample in batch)``, then one normalisation of the batch's images;
    picklable for DataLoader workers."""

    def __init__(self, decode: PreparedDecode, collate: Any) -> None:
        self.decode, self.collate = decode, collate

    def __call__(self, samples: list[dict[str, Any]]) -> Any:
        batch = self.collate([self.decode(s) for s in samples if s is not None])
        if isinstance(batch, dict) and "image" in batch:
            batch["image"] = normalise_batch(batch["image"])
        return batch


class PreparedStore:
    """Random access to the samples of a prepared folder by id (member offsets from the sidecars).

    Used by record datamodules given ``prepared=<out>``: their own index still supplies labels, reports and
    masks; only the image/volume comes from the shards.

    Args:
        folder: output of :func:`prepare`.
        expect_spec: the spec the datamodule would prepare (``max_side`` is free for 2D); a mismatch is refused.
        dataset: the datamodule's registry name; a folder of another dataset is refused.

    Raises:
        DataError: missing/unreadable manifest, another dataset or spec.
    """

    def __init__(self, folder: str | Path, dataset: str, expect_spec: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        spec = dict(self.manifest["spec"])
        if self.manifest["dataset"] != dataset:
            raise DataError(f"{self.folder}: prepared from {self.manifest['dataset']!r}, not {dataset!r}")
        want = dict(expect_spec)
        if spec.get("kind") == "image2d":
            spec.pop("max_side", None)
            want.pop("max_side", None)
        if spec != want:
            diff = sorted(k for k in set(spec) | set(want) if spec.get(k) != want.get(k))
            raise DataError(f"{self.folder}: prepared with a different spec (differs in {diff}: "
                            f"{ {k: spec.get(k) for k in diff} } vs { {k: want.get(k) for k in diff} }); "
                            "re-run `medvlp prepare` into a new folder")
        self.kind = spec["kind"]
        self._where: dict[str, tuple[Path, str, int, int, list[int]]] | None = None
        self.corrupt = {c["id"]: c["error"] for c in self.manifest.get("corrupt", [])}

    def _index(self) -> dict[str, tuple[Path, str, int, int, list[int]]]:
        if self._where is None:
            where = {}
            for split, info in self.manifest["splits"].items():
                for shard in info["shards"]:
                    side = self.folder / split / shard["name"].replace(".tar", ".json")
                    meta = json.loads(side.read_text())
                    tar = self.folder / split / shard["name"]
                    for s in meta["samples"]:
                        where[s["id"]] = (tar, s["ext"], s["offset"], s["size"], s["json"])
            self._where = where
        return self._where

    def __contains__(self, sample_id: str) -> bool:
        return str(sample_id) in self._index()

    def read(self, sample_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, json meta)`` of one sample.

        Raises:
            DataError: the id is not in the prepared folder (named as corrupt when prepare rejected it).
        """
        sid = str(sample_id)
        entry = self._index().get(sid)
        if entry is None:
            if sid in self.corrupt:
                raise DataError(f"{sid}: rejected by `medvlp prepare` ({self.corrupt[sid]})")
            raise DataError(f"{sid}: not in prepared folder {self.folder} (prepared from another index?)")
        tar, ext, offset, size, (joff, jsize) = entry
        with open(tar, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
            fh.seek(joff)
            meta = json.loads(fh.read(jsize))
        if ext == "npy":
            return {"image": np.load(io.BytesIO(data), allow_pickle=False)}, meta
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}, meta
