"""Feature extraction once per (checkpoint, dataset, split), cached on disk and reused by every probe.

The in-memory side of the cache holds a model's entries only while the runner evaluates it:
:meth:`FeatureCache.release` drops them (features and frozen segmentation maps) and the lazy report
encoders hold the model through a weak reference, so a finished model is freed before the next one
pretrains; :func:`trim_heap` then hands glibc's freed heap back to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import io
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from medvlp.io import atomic_write_bytes
from medvlp.progress import track
from medvlp.method import VLPMethod
import os
from medvlp.io import atomic_target

log = logging.getLogger(__name__)


class Features:
    """Cached per-sample outputs of one encoder on one split.

    Attributes:
        representation: ``(N, D)`` backbone features (linear probe).
        image_embedding: ``(N, E)`` normalised joint-space image embeddings.
        text_embedding: ``(N, E)`` normalised embeddings of the paired reports (NaN rows without text);
            when built with ``text_fn`` instead, computed on first access, so splits whose reports nothing
            reads (the probes' train split) never run the text encoder.
        labels: ``(N, K)`` (NaN = unknown). ids, texts: per sample.
    """

    def __init__(self, representation: np.ndarray, image_embedding: np.ndarray, text_embedding: np.ndarray | None,
                 labels: np.ndarray, ids: list[str], texts: list[str],
                 text_fn: Callable[["Features"], np.ndarray] | None = None) -> None:
        self.representation, self.image_embedding, self.labels = representation, image_embedding, labels
        self.ids, self.texts = ids, texts
        self._text, self.text_fn = text_embedding, text_fn

    @property
    def text_embedding(self) -> np.ndarray:
        """``(N, E)`` normalised report embeddings (NaN rows for samples without text)."""
        if self._text is None:
            if self.text_fn is None:
                raise ValueError("these features were built without report embeddings")
            self._text = self.text_fn(self)
        return self._text

    @text_embedding.setter
    def text_embedding(self, value: np.ndarray) -> None:
        self._text = value


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha1 over parameter and buffer bytes: identifies the weights, wherever they were loaded from."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _sample_ids(batch: dict[str, Any], start: int) -> list[str]:
    metas = batch.get("meta")
    if metas:
        return [str(m.get("id", start + i)) for i, m in enumerate(metas)]
    return [str(start + i) for i in range(batch["image"].shape[0])]


def image_outputs(model: Any, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_representation, encode_image)`` from one backbone forward.

    Both come from the backbone's pooled feature when the model keeps :class:`~medvlp.method.VLPMethod`'s
    definitions (representation = pooled, embedding = normalised projection of pooled); a model that
    overrides either gets the two calls.
    """

    cls = type(model)
    if (isinstance(model, VLPMethod) and cls.image_representation is VLPMethod.image_representation
            and cls.encode_image is VLPMethod.encode_image):
        pooled = model.image_features(image)["pooled"]
        return pooled, F.normalize(model.image_proj(pooled), dim=-1)
    return model.image_representation(image), model.encode_image(image)


@torch.no_grad()
def extract(model: Any, datamodule: Any, split: str, device: str | torch.device = "cpu",
            batch_size: int = 64, counter: dict[str, int] | None = None) -> Features:
    """Run the image side of the encoder API over a non-augmented split (one backbone forward per image).

    Reports are kept as strings; their embeddings are computed when ``text_embedding`` is first read.
    ``counter`` (optional) accumulates ``image_forwards`` (images through the backbone).
    """
    model.eval().to(device)
    reps, embs, labels, ids, texts = [], [], [], [], []
    n_classes = len(datamodule.label_names)
    loader = datamodule.eval_dataloader(split, batch_size)
    for batch in track(loader, len(loader), f"features {split}"):
        if batch is None:  # all samples skipped under the datamodule's policy
            continue
        image = batch["image"].to(device, non_blocking=True)
        rep, emb = image_outputs(model, image)
        reps.append(rep.float().cpu())
        embs.append(emb.float().cpu())
        texts.extend(batch["text"] if "text" in batch else [""] * image.shape[0])
        lab = batch.get("labels")
        labels.append(lab.float() if lab is not None else torch.full((image.shape[0], n_classes), float("nan")))
        ids.extend(_sample_ids(batch, len(ids)))
        if counter is not None:
            counter["image_forwards"] = counter.get("image_forwards", 0) + image.shape[0]
    return Features(torch.cat(reps).numpy(), torch.cat(embs).numpy(), None, torch.cat(labels).numpy(), ids, texts)


@torch.no_grad()
def encode_texts(model: Any, texts: list[str], dim: int, device: str | torch.device = "cpu", batch_size: int = 64,
                 counter: dict[str, int] | None = None) -> np.ndarray:
    """``(N, dim)`` normalised embeddings of ``texts`` (NaN rows for empty strings), in batches."""
    out = np.full((len(texts), dim), np.nan, np.float32)
    rows = [i for i, t in enumerate(texts) if t]
    model.eval().to(device)
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        out[chunk] = model.encode_text([texts[i] for i in chunk]).float().cpu().numpy()
        if counter is not None:
            counter["text_forwards"] = counter.get("text_forwards", 0) + len(chunk)
    return out


class FeatureCache:
    """Disk cache of :class:`Features` keyed by (model fingerprint, dataset version, split).

    Image outputs are stored in ``<key>.npz``; report embeddings, computed only when read, in
    ``<key>.text.npy``. ``counts`` tallies the images and reports actually encoded.

    Args:
        root: cache folder (``None`` = in-memory only).
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None
        self._memory: dict[str, Features] = {}
        self._pinned: dict[int, str] = {}  # id(model) -> fingerprint, while the runner evaluates it
        self._keys_of: dict[int, set[str]] = {}  # id(model) -> in-memory keys it read, until release()
        self.hits = 0
        self.misses = 0
        self.counts: dict[str, int] = {"image_forwards": 0, "text_forwards": 0, "map_forwards": 0}
        self._maps: MapCache | None = None

    def maps(self, model: Any, datamodule: Any, split: str, device: str | torch.device = "cpu") -> "SplitMaps":
        """Frozen segmentation maps of (weights, dataset, split), computed once (see :class:`MapCache`)."""
        if self._maps is None:
            self._maps = MapCache(self.root, self.counts)
        key = self.key(model, datamodule, split)
        self._keys_of.setdefault(id(model), set()).add(key)
        return self._maps.get(model, datamodule, split, key, device)

    def release(self, model: Any) -> int:
        """Drop the in-memory features and segmentation maps that ``model`` read (the disk cache stays).

        The runner calls this when it is done with a model, so neither the model (held by lazy report
        encoders only weakly) nor its arrays outlive its evaluation. Returns the number of entries dropped.
        """
        keys = self._keys_of.pop(id(model), set())
        dropped = sum(self._memory.pop(k, None) is not None for k in keys)
        if self._maps is not None:
            dropped += sum(self._maps.release(k) for k in keys)
        return dropped

    def pin(self, model: Any, fingerprint: str) -> None:
        """Reuse ``fingerprint`` for ``model`` (weights unchanged until :meth:`unpin`): hashed once per model."""
        self._pinned[id(model)] = fingerprint

    def unpin(self, model: Any) -> None:
        """Forget a pinned fingerprint."""
        self._pinned.pop(id(model), None)

    def key(self, model: Any, datamodule: Any, split: str) -> str:
        """Cache key for this (weights, dataset, split)."""
        parts = [self._pinned.get(id(model)) or model_fingerprint(model), type(datamodule).__name__, datamodule.dataset_version, split,
                 len(datamodule.dataset(split, augment=False))]
        return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:20]

    def _text_fn(self, model: Any, key: str, device: str | torch.device) -> Callable[[Features], np.ndarray]:
        path = self.root / f"{key}.text.npy" if self.root else None
        ref = weakref.ref(model)  # the cache must not keep an evaluated model alive

        def compute(feats: Features) -> np.ndarray:
            if path is not None and path.is_file():
                return np.load(path, allow_pickle=False)
            model = ref()
            if model is None:
                raise RuntimeError(f"feature cache entry {key}: its model was freed before the report "
                                   "embeddings were read")
            emb = encode_texts(model, feats.texts, feats.image_embedding.shape[1], device, counter=self.counts)
            if path is not None:
                buf = io.BytesIO()
                np.save(buf, emb, allow_pickle=False)
                atomic_write_bytes(path, buf.getvalue())
            return emb

        return compute

    def get(self, model: Any, datamodule: Any, split: str, device: str | torch.device = "cpu") -> Features:
        """Cached features, extracting them on a miss."""
        key = self.key(model, datamodule, split)
        self._keys_of.setdefault(id(model), set()).add(key)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.root / f"{key}.npz" if self.root else None
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                feats = Features(z["representation"], z["image_embedding"], None, z["labels"],
                                 json.loads(str(z["ids"])), json.loads(str(z["texts"])))
            self.hits += 1
        else:
            self.misses += 1
            feats = extract(model, datamodule, split, device, counter=self.counts)
            if path is not None:
                buf = io.BytesIO()
                np.savez(buf, representation=feats.representation, image_embedding=feats.image_embedding,
                         labels=feats.labels, ids=json.dumps(feats.ids), texts=json.dumps(feats.texts))
                atomic_write_bytes(path, buf.getvalue())
        feats.text_fn = self._text_fn(model, key, device)
        self._memory[key] = feats
        return feats


@dataclass
class SplitMaps:
    """Frozen multi-level feature maps of one split, one array per level ``(N, C, *grid)`` (memory-mapped
    from the cache folder when it has one), with masks, ids and (EM) instance labels."""

    levels: list[np.ndarray]
    masks: torch.Tensor
    ids: list[str]
    #: ``(N, 1, *size)`` instance ids: a read-only memmap with a cache folder (rows read on access)
    instances: torch.Tensor | np.ndarray | None

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, idx: list[int], device: str | torch.device = "cpu") -> list[torch.Tensor]:
        """The maps of rows ``idx`` (only those rows are read from disk)."""
        return [torch.from_numpy(np.ascontiguousarray(level[idx])).to(device) for level in self.levels]


class MapCache:
    """Frozen segmentation feature maps computed once per (weights, dataset, split) and reused by every
    fraction × seed: stored as ``.npy`` per level under ``root`` and read back memory-mapped (SIIM with ViT-B
    would need ~20 GB in RAM), or kept in memory when ``root`` is ``None``.

    Args:
        root: cache folder (``None`` = in memory).
        counter: optional dict that accumulates ``map_forwards`` (images through the backbone).
    """

    def __init__(self, root: str | Path | None, counter: dict[str, int] | None = None) -> None:
        self.root = Path(root) if root else None
        self._memory: dict[str, SplitMaps] = {}
        self.counts = counter if counter is not None else {}

    def get(self, model: Any, datamodule: Any, split: str, key: str, device: str | torch.device = "cpu",
            batch_size: int = 16) -> SplitMaps:
        """Maps of ``split`` under cache ``key`` (see :meth:`FeatureCache.key`), computing them on a miss."""
        if key in self._memory:
            return self._memory[key]
        folder = self.root / f"{key}.maps" if self.root else None
        done = folder / "meta.json" if folder else None
        if done is not None and done.is_file():
            meta = json.loads(done.read_text())
            levels = [np.load(folder / f"level{i}.npy", mmap_mode="r") for i in range(meta["levels"])]
            masks = torch.from_numpy(np.load(folder / "masks.npy"))
            inst = np.load(folder / "instances.npy", mmap_mode="r") if meta["instances"] else None
            maps = SplitMaps(levels, masks, meta["ids"], inst)
        else:
            maps = self._compute(model, datamodule, split, device, batch_size, folder)
        self._memory[key] = maps
        return maps

    def release(self, key: str) -> bool:
        """Forget the in-memory maps of ``key`` (memmaps closed once unreferenced); True if there were any."""
        return self._memory.pop(key, None) is not None

    @torch.no_grad()
    def _compute(self, model: Any, datamodule: Any, split: str, device: str | torch.device, batch_size: int,
                 folder: Path | None) -> SplitMaps:
        """One backbone pass over the split; with a folder, maps stream into ``.npy`` memmaps (never all in RAM)."""
        model.eval().to(device)
        n_max = len(datamodule.dataset(split, augment=False))
        levels: list[np.ndarray] = []
        masks, ids, instances = [], [], []
        inst_map: np.ndarray | None = None  # with a folder, EM instance ids stream into a memmap too
        pos = 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        for batch in datamodule.eval_dataloader(split, batch_size):
            if batch is None:
                continue
            img = batch["image"].to(device, non_blocking=True)
            out = [m.float().cpu().numpy() for m in model.image_feature_maps(img)]
            if not levels:
                levels = [np.lib.format.open_memmap(folder / f".level{i}.npy.tmp", "w+", np.float32, (n_max, *m.shape[1:]))
                          if folder is not None else np.empty((n_max, *m.shape[1:]), np.float32)
                          for i, m in enumerate(out)]
            for level, m in zip(levels, out):
                level[pos:pos + len(m)] = m
            masks.append(batch["mask"].long())
            if "instances" in batch and folder is not None:
                if inst_map is None:
                    inst_map = np.lib.format.open_memmap(folder / ".instances.npy.tmp", "w+", np.int64,
                                                         (n_max, *batch["instances"].shape[1:]))
                inst_map[pos:pos + img.shape[0]] = batch["instances"].numpy()
            elif "instances" in batch:
                instances.append(batch["instances"].long())
            pos += img.shape[0]
            ids.extend(_sample_ids(batch, len(ids)))
            self.counts["map_forwards"] = self.counts.get("map_forwards", 0) + img.shape[0]
        if not levels:
            raise ValueError(f"{type(datamodule).__name__}: no readable sample in split {split!r}")
        mask_t = torch.cat(masks)
        if folder is None:
            return SplitMaps([level[:pos] for level in levels], mask_t, ids, torch.cat(instances) if instances else None)
        arrays = [(f"level{i}", level) for i, level in enumerate(levels)]
        if inst_map is not None:
            arrays.append(("instances", inst_map))
        for name, arr in arrays:
            _finish_memmap(folder, name, arr, pos)
        n_levels, has_inst = len(levels), inst_map is not None
        del levels, arrays, inst_map
        _save_npy(folder / "masks.npy", mask_t.numpy())
        atomic_write_bytes(folder / "meta.json", json.dumps({"levels": n_levels, "ids": ids,
                                                             "instances": has_inst}).encode())
        return SplitMaps([np.load(folder / f"level{i}.npy", mmap_mode="r") for i in range(n_levels)], mask_t, ids,
                         np.load(folder / "instances.npy", mmap_mode="r") if has_inst else None)


def _finish_memmap(folder: Path, name: str, arr: np.ndarray, rows: int) -> None:
    """Rename the streamed ``.<name>.npy.tmp`` memmap to ``<name>.npy``, keeping its first ``rows`` rows."""

    tmp = folder / f".{name}.npy.tmp"
    if rows < len(arr):  # skipped samples: keep the first `rows` rows
        small = np.lib.format.open_memmap(folder / f".{name}.small.tmp", "w+", arr.dtype, (rows, *arr.shape[1:]))
        small[:] = arr[:rows]
        small.flush()
        del small
        os.replace(folder / f".{name}.small.tmp", tmp)
    else:
        arr.flush()
    os.replace(tmp, folder / f"{name}.npy")


def _save_npy(path: Path, arr: np.ndarray) -> None:

    with atomic_target(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def trim_heap() -> bool:
    """Collect garbage and return freed heap pages to the system (glibc ``malloc_trim(0)``).

    glibc keeps freed arenas mapped, so without this the process's RSS only ratchets up from one model to
    the next. A no-op returning False where the C library has no ``malloc_trim`` (musl, macOS, Windows).
    """
    gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None
