"""``medvlp prepare``: convert a registered dataset into training-ready shards once.

Output folder layout::

    <out>/index.json                      manifest (dataset, version, split-id hashes, preprocessing spec)
    <out>/<split>/shard-000000.tar        WebDataset-layout shard (``<key>.npy`` / ``<key>.npz`` + ``<key>.json``)
    <out>/<split>/shard-000000.json       sidecar: sha256 of the tar, the ids it holds, member offsets, corrupt inputs

2D images (X-ray layouts and 2D CSV manifests) are decoded once by the optimised reader
(:func:`~medvlp.datamodules.io.readers.read_image_2d` with ``max_side``: JPEG DCT draft, area resize before
float conversion), min-max scaled, zero-padded to a square and stored as ``uint8`` ``(size, size)``, ``size``
being the training ``image_size`` by default: exactly what the datamodules' fast path feeds the model, so a
reader only stacks them and normalises each batch once (:class:`PreparedCollate`). 3D volumes (including 3D
CSV manifests, through the MONAI volume pipeline) are stored after the datamodule's deterministic steps (read, HU rescale, orientation,
spacing, window, resize: everything before the random augmentations) as compressed ``.npz`` (``image``
float16 ``(C, D, H, W)`` in [0, 1], plus ``mask``/``instances`` where the dataset has them).

Shards are planned from the dataset index alone (records of a split in index order, ``samples_per_shard`` per
shard), so a rerun plans the same shards. A shard whose sidecar matches the plan (same ids, same spec) and
whose tar has the recorded sha256 is *verified* and kept; any other shard is (re)written, tar first (atomic
rename) then its sidecar, so a killed run never leaves a shard that passes verification half-written. Every
shard holds ``samples_per_shard`` samples except the last of a split and shards that lost corrupt inputs; the
manifest records each shard's sample count so a streaming reader can give every rank the same number of
samples without opening the shards. Corrupt inputs (anything the reader rejects with a
:class:`~medvlp.datamodules.io.readers.DataError`) are counted and named (id, file, error) in the sidecars and
the manifest; a folder prepared with another spec is refused, never mixed.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medvlp.datamodules.io.readers import DataError, image_shape_2d, read_image_2d
from medvlp.datamodules.io.store import (  # noqa: F401  (the store's names are part of prepare's API)
    FORMAT, INDEX, PreparedCollate, PreparedDecode, PreparedStore, _center_crop, _sha1, _sha256_file,
    check_same_spec, manifest_of, normalise_batch, read_manifest, shard_counts,
)
from medvlp.datamodules.tabular import resize_2d
from medvlp.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def is_2d(dm: Any) -> bool:
    """Whether ``dm``'s records are 2D images (X-ray layouts, a 2D CSV manifest) rather than volumes."""
    return int(getattr(dm, "spatial_dims", 3)) == 2


def default_size(dm: Any) -> int:
    """The stored 2D side: the datamodule's training ``image_size`` (resized once, never again at load)."""
    return int(getattr(dm, "image_size", 224))


def prepare_spec(dm: Any, size: int | None = None) -> dict[str, Any]:
    """The preprocessing spec of ``dm`` (what the stored arrays depend on): its ``prepared_spec(size)``
    (:func:`~medvlp.datamodules.io.store.image2d_spec` or :func:`~medvlp.datamodules.io.store.volume_spec`).

    Raises:
        ValueError: for datamodules without a record index (phantom, mixed, shards).
    """
    method = getattr(dm, "prepared_spec", None)
    if method is None:
        raise ValueError(f"prepare needs a record datamodule over a published layout (X-ray, CT, MRI, EM); "
                         f"{type(dm).__name__} has no file index to convert")
    return method(size)


@dataclass
class ShardPlan:
    """One planned shard: its split, number and the records it will hold."""

    split: str
    number: int
    records: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return f"shard-{self.number:06d}"

    @property
    def ids_hash(self) -> str:
        return _sha1([str(r["id"]) for r in self.records])


def plan_shards(dm: Any, splits: Sequence[str], samples_per_shard: int) -> list[ShardPlan]:
    """Shards of every split, from the dataset index alone (deterministic across reruns)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    plans = []
    for split in splits:
        recs = dm.records(split)
        for k in range(0, len(recs), samples_per_shard):
            plans.append(ShardPlan(split, k // samples_per_shard, list(recs[k:k + samples_per_shard])))
    return plans


def sample_key(sample_id: str) -> str:
    """WebDataset key of a sample: dot-free and unique (sha1 of the id); the id itself is in the json."""
    return hashlib.sha1(str(sample_id).encode()).hexdigest()[:24]


def _labels_json(values: Any) -> list[float | None] | None:
    if values is None:
        return None
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64).ravel().tolist()]


def encode_record(dm: Any, record: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, bytes]:
    """Members (``ext → bytes``) of one sample.

    Raises:
        DataError: naming the file when the input cannot be read.
    """
    meta: dict[str, Any] = {"id": str(record["id"]), "modality": spec["modality"], "label_names": dm.label_names or None}
    if spec["kind"] == "image2d":
        path = Path(record["path"] if "path" in record else record["image"])  # X-ray layouts | CSV manifest
        size = int(spec["max_side"])
        max_side = size if spec.get("decode", "fast") == "fast" else None
        img = resize_2d(read_image_2d(path, nonfinite=getattr(dm, "nonfinite", "fail"), max_side=max_side), size)[0]
        arr = np.round(img.numpy() * 255).astype(np.uint8)
        meta["meta"] = {"id": str(record["id"]), "path": str(path), "orig_shape": list(image_shape_2d(path))}
        meta["labels"] = _labels_json(record.get("labels"))
        if record.get("text"):
            meta["text"] = record["text"]
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        members = {"npy": buf.getvalue()}
    else:
        sample = _deterministic_sample(dm, record)
        arrays = {"image": (sample["image"].float() * 0.25 + 0.5).numpy().astype(np.float16)}
        if "mask" in sample:
            arrays["mask"] = sample["mask"].numpy().astype(np.uint8 if int(sample["mask"].max()) < 256 else np.int32)
        if "instances" in sample:
            arrays["instances"] = sample["instances"].numpy().astype(np.int64)
        meta["meta"] = {k: v for k, v in sample.get("meta", {}).items() if isinstance(v, (str, int, float))}
        meta["labels"] = _labels_json(sample.get("labels"))
        for k in ("text", "caption"):
            if sample.get(k):
                meta[k] = sample[k]
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        members = {"npz": buf.getvalue()}
    if meta.get("text"):
        members["txt"] = meta.pop("text").encode("utf-8")
    members["json"] = json.dumps(meta).encode("utf-8")
    return members


def _deterministic_sample(dm: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """The sample after the deterministic steps only: for the MONAI pipeline that excludes the crop of
    ``resize: random_crop`` (stored padded, cropped at load: random in training, centre otherwise)."""
    from monai.transforms import Compose

    if not getattr(dm, "prepare_from_pipeline", False):  # datamodules that cut their own samples (EM)
        return dm.load(record, augment=False)
    item = Compose(dm.deterministic_steps())(dm._monai_input(record))
    sample = dm.to_sample(item, record)
    if dm.caption_source is not None:
        sample["caption"] = dm.caption_source(sample)
    return sample


def _error_of(exc: BaseException, record: Mapping[str, Any]) -> DataError | None:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__ or cause.__context__
    return cause if isinstance(cause, DataError) else None


def write_shard(dm: Any, plan: ShardPlan, out: Path, spec: Mapping[str, Any], spec_hash: str) -> dict[str, Any]:
    """Encode one planned shard; write the tar atomically, then its sidecar. Returns the sidecar."""
    buf = io.BytesIO()
    keys, corrupt = [], []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for rec in plan.records:
            try:
                members = encode_record(dm, rec, spec)
            except Exception as exc:  # noqa: BLE001 - only DataError causes are counted; others re-raised
                err = _error_of(exc, rec)
                if err is None:
                    raise
                corrupt.append({"split": plan.split, "id": str(rec["id"]),
                                "path": str(rec.get("path", rec.get("image", ""))), "error": str(err)})
                log.warning("prepare: corrupt input %s: %s", rec["id"], err)
                continue
            key = sample_key(rec["id"])
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
            keys.append((str(rec["id"]), key))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # member offsets for random access
        where = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    by_key: dict[str, dict[str, list[Any]]] = {}
    for name, (off, size) in where.items():  # every member's [offset, size, sha256]: readers verify them
        key, _, ext = name.rpartition(".")
        by_key.setdefault(key, {})[ext] = [off, size, hashlib.sha256(data[off:off + size]).hexdigest()]
    samples = []
    for sid, key in keys:
        ext = "npy" if f"{key}.npy" in where else "npz"
        members = by_key[key]
        samples.append({"id": sid, "key": key, "ext": ext, "offset": where[f"{key}.{ext}"][0],
                        "size": where[f"{key}.{ext}"][1], "json": list(where[f"{key}.json"]), "members": members})
    folder = out / plan.split
    atomic_write_bytes(folder / f"{plan.name}.tar", data)
    sidecar = {"shard": f"{plan.name}.tar", "split": plan.split, "sha256": hashlib.sha256(data).hexdigest(),
               "n": len(samples), "ids_hash": plan.ids_hash, "spec_hash": spec_hash, "samples": samples,
               "corrupt": corrupt}
    atomic_write_text(folder / f"{plan.name}.json", json.dumps(sidecar))
    return sidecar


def verified_sidecar(out: Path, plan: ShardPlan, spec_hash: str) -> dict[str, Any] | None:
    """The shard's sidecar when it matches the plan and spec and the tar's sha256 checks; else ``None``.

    Raises:
        DataError: when the sidecar names another spec (the folder holds shards of a different preprocessing).
    """
    side, tar = out / plan.split / f"{plan.name}.json", out / plan.split / f"{plan.name}.tar"
    if not side.is_file() or not tar.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("spec_hash") != spec_hash:
        raise DataError(f"{side}: shard was prepared with spec {meta.get('spec_hash')}, not {spec_hash}; "
                        "refusing to mix specs (prepare into a new folder)")
    if meta.get("ids_hash") != plan.ids_hash or _sha256_file(tar) != meta.get("sha256"):
        return None
    return meta


_WORKER_DM: Any = None


def _init_worker(dm: Any) -> None:
    global _WORKER_DM
    _WORKER_DM = dm
    torch.set_num_threads(1)


def _worker_write(plan: ShardPlan, out: Path, spec: Mapping[str, Any], spec_hash: str) -> dict[str, Any]:
    return write_shard(_WORKER_DM, plan, out, spec, spec_hash)


def _check_existing(out: Path, dataset: str, spec_hash: str, samples_per_shard: int) -> None:
    path = out / INDEX
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from exc
    if old.get("spec_hash") != spec_hash or old.get("dataset") != dataset:
        raise DataError(f"{path}: folder holds {old.get('dataset')} prepared with spec {old.get('spec_hash')}, not "
                        f"{dataset} with spec {spec_hash}; refusing to mix specs (prepare into a new folder)")
    if old.get("samples_per_shard") != samples_per_shard:
        raise DataError(f"{path}: folder was prepared with samples_per_shard={old.get('samples_per_shard')}, "
                        f"not {samples_per_shard}")


def check_outcome(dm: Any, manifest: Mapping[str, Any], out: Path) -> None:
    """Refuse a prepare that produced nothing usable, after its manifest was written (it names the inputs).

    Raises:
        DataError: no sample in any split, a split with records but no sample, or more corrupt inputs than
            the datamodule's skip policy allows (``max_skip_fraction``, or any under ``on_error: fail``).
    """
    records = sum(v["n_records"] for v in manifest["splits"].values())
    samples = sum(v["n_samples"] for v in manifest["splits"].values())
    first = "; ".join(f"{c['path'] or c['id']}: {c['error']}" for c in manifest["corrupt"][:3])
    where = f"prepare {manifest['dataset']} into {out}"
    if records and not samples:
        raise DataError(f"{where}: none of the {records} inputs could be read (first errors: {first})")
    empty = [k for k, v in manifest["splits"].items() if v["n_records"] and not v["n_samples"]]
    if empty:
        raise DataError(f"{where}: split(s) {empty} hold no readable sample (first errors: {first})")
    bad, limit = manifest["corrupt_count"], float(getattr(dm, "max_skip_fraction", 0.5))
    if getattr(dm, "on_error", "skip") == "fail" and bad:
        raise DataError(f"{where}: {bad} corrupt inputs under on_error=fail (first errors: {first})")
    if bad > limit * records:
        raise DataError(f"{where}: {bad} of {records} inputs are corrupt, more than max_skip_fraction={limit} "
                        f"(named in {out / INDEX}; first errors: {first})")


def prepare(dm: Any, out: str | Path, size: int | None = None, samples_per_shard: int = 1000, workers: int = 1,
            splits: Sequence[str] = SPLITS, progress: bool = True, source: Mapping[str, Any] | None = None
            ) -> dict[str, Any]:
    """Convert ``dm``'s splits into shards under ``out`` (resumable); returns the manifest.

    Args:
        dm: a record datamodule (X-ray, CT, MRI, EM).
        out: output folder (created; a rerun resumes into it).
        size: side of the stored (square, padded) 2D images; default the datamodule's ``image_size``, the
            size it trains at (with ``crop_size``, ``image_size`` is the resize before cropping: MGCA/ASG 256).
        samples_per_shard: records per shard.
        workers: encoding processes (1 = in this process).
        splits: splits to convert (empty splits are recorded with no shards).
        progress: show a tqdm bar over shards.
        source: the datamodule config (``name``/``init_args``) recorded in the manifest.

    Raises:
        DataError: when ``out`` holds shards of another spec or dataset, a listed split index fails, or the
            result holds no sample or more corrupt inputs than the skip policy allows (:func:`check_outcome`).
    """
    out = Path(out)
    spec = prepare_spec(dm, size)
    spec_hash = _sha1(spec)
    _check_existing(out, dm.name, spec_hash, samples_per_shard)
    plans = plan_shards(dm, splits, samples_per_shard)
    stale = [p for p in out.glob("*/.shard-*.tmp")]
    for p in stale:  # temp files of a killed run (never renamed, so never verified)
        p.unlink()
    done: dict[tuple[str, int], dict[str, Any]] = {}
    pending = []
    for plan in plans:
        meta = verified_sidecar(out, plan, spec_hash)
        if meta is None:
            pending.append(plan)
        else:
            done[(plan.split, plan.number)] = meta
    verified = len(done)
    planned = {(p.split, f"{p.name}.tar") for p in plans}
    foreign = sorted(str(p) for p in out.glob("*/*.tar") if (p.parent.name, p.name) not in planned)
    if foreign:
        raise DataError(f"{out}: shards not in this dataset's plan: {foreign[:5]} (another spec or shard size); "
                        "refusing to mix (prepare into a new folder)")
    log.info("prepare %s → %s: %d shards planned, %d verified and kept, %d to write", dm.name, out, len(plans),
             verified, len(pending))
    started = time.perf_counter()
    bar = None
    if progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc=f"prepare {dm.name}", unit="shard")
    if workers <= 1 or len(pending) <= 1:
        for plan in pending:
            done[(plan.split, plan.number)] = write_shard(dm, plan, out, spec, spec_hash)
            if bar is not None:
                bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                 initargs=(dm,)) as pool:
            futures = {pool.submit(_worker_write, plan, out, spec, spec_hash): plan for plan in pending}
            for fut in as_completed(futures):
                plan = futures[fut]
                done[(plan.split, plan.number)] = fut.result()
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    manifest = build_manifest(dm, splits, plans, done, spec, spec_hash, samples_per_shard, source)
    manifest["last_run"] = {"verified_kept": verified, "written": len(pending),
                            "seconds": round(time.perf_counter() - started, 3)}
    atomic_write_text(out / INDEX, json.dumps(manifest, indent=1))
    if manifest["corrupt"]:
        log.warning("prepare: %d corrupt inputs skipped (named in %s)", len(manifest["corrupt"]), out / INDEX)
    check_outcome(dm, manifest, out)
    return manifest


def build_manifest(dm: Any, requested: Sequence[str], plans: Sequence[ShardPlan], done: Mapping[tuple[str, int], Mapping[str, Any]],
                   spec: Mapping[str, Any], spec_hash: str, samples_per_shard: int,
                   source: Mapping[str, Any] | None) -> dict[str, Any]:
    """``index.json`` content: dataset, version, spec (+hash), per split the id hash and shard list."""
    splits: dict[str, Any] = {}
    corrupt: list[dict[str, Any]] = []
    for split in requested:
        mine = [p for p in plans if p.split == split]
        shards = []
        for p in mine:
            meta = done[(p.split, p.number)]
            shards.append({"name": meta["shard"], "sha256": meta["sha256"], "n": meta["n"], "ids_hash": meta["ids_hash"]})
            corrupt.extend(meta.get("corrupt", []))
        ids = [str(r["id"]) for p in mine for r in p.records]
        splits[split] = {"ids_hash": _sha1(ids), "n_records": len(ids), "n_samples": sum(s["n"] for s in shards),
                         "shards": shards}
    return {"format": FORMAT, "dataset": dm.name, "datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}",
            "dataset_version": dm.dataset_version, "source": dict(source or {}), "spec": dict(spec),
            "spec_hash": spec_hash, "samples_per_shard": samples_per_shard, "label_names": list(dm.label_names),
            "spatial_dims": dm.spatial_dims, "splits": splits, "corrupt": corrupt,
            "corrupt_count": len(corrupt)}
