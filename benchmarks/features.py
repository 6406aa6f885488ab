"""Feature extraction once per (checkpoint, dataset, split), cached on disk and reused by every probe."""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvlp.io import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Cached per-sample outputs of one encoder on one split."""

    representation: np.ndarray  # (N, D) backbone features (linear probe)
    image_embedding: np.ndarray  # (N, E) normalised joint-space image embeddings
    text_embedding: np.ndarray  # (N, E) normalised embeddings of the paired reports (NaN if no text)
    labels: np.ndarray  # (N, K) (NaN = unknown)
    ids: list[str]
    texts: list[str]


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


@torch.no_grad()
def extract(model: Any, datamodule: Any, split: str, device: str | torch.device = "cpu",
            batch_size: int = 64) -> Features:
    """Run the encoder API over a non-augmented split."""
    model.eval().to(device)
    reps, embs, tembs, labels, ids, texts = [], [], [], [], [], []
    n_classes = len(datamodule.label_names)
    for batch in datamodule.eval_dataloader(split, batch_size):
        if batch is None:  # all samples skipped under the datamodule's policy
            continue
        image = batch["image"].to(device)
        reps.append(model.image_representation(image).float().cpu())
        embs.append(model.encode_image(image).float().cpu())
        if "text" in batch:
            tembs.append(model.encode_text(batch["text"]).float().cpu())
            texts.extend(batch["text"])
        else:
            tembs.append(torch.full_like(embs[-1], float("nan")))
            texts.extend([""] * image.shape[0])
        lab = batch.get("labels")
        labels.append(lab.float() if lab is not None else torch.full((image.shape[0], n_classes), float("nan")))
        ids.extend(_sample_ids(batch, len(ids)))
    return Features(torch.cat(reps).numpy(), torch.cat(embs).numpy(), torch.cat(tembs).numpy(),
                    torch.cat(labels).numpy(), ids, texts)


class FeatureCache:
    """Disk cache of :class:`Features` keyed by (model fingerprint, dataset version, split).

    Args:
        root: cache folder (``None`` = in-memory only).
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None
        self._memory: dict[str, Features] = {}
        self._pinned: dict[int, str] = {}  # id(model) -> fingerprint, while the runner evaluates it
        self.hits = 0
        self.misses = 0

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

    def get(self, model: Any, datamodule: Any, split: str, device: str | torch.device = "cpu") -> Features:
        """Cached features, extracting them on a miss."""
        key = self.key(model, datamodule, split)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.root / f"{key}.npz" if self.root else None
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                feats = Features(z["representation"], z["image_embedding"], z["text_embedding"], z["labels"],
                                 json.loads(str(z["ids"])), json.loads(str(z["texts"])))
            self.hits += 1
        else:
            self.misses += 1
            feats = extract(model, datamodule, split, device)
            if path is not None:
                buf = io.BytesIO()
                np.savez(buf, representation=feats.representation, image_embedding=feats.image_embedding,
                         text_embedding=feats.text_embedding, labels=feats.labels, ids=json.dumps(feats.ids),
                         texts=json.dumps(feats.texts))
                atomic_write_bytes(path, buf.getvalue())
        self._memory[key] = feats
        return feats
