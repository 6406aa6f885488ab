"""Result rows: one per (method label, weights, dataset, protocol, params, fraction, seeds, metric).

The CSV is rewritten atomically (temp file + rename) after every finished unit, so a killed run loses
at most the unit in progress and never leaves a half-written file. A unit is identified by label,
dataset, protocol key, params, fraction, the pretraining / label-subset / training seeds **and** the
weights fingerprint, config hash and dataset version: a rerun skips a unit only when all of them match.
When a label's weights (or config, or dataset version) changed, :meth:`ResultStore.drop_stale` removes
its old rows (logged with their count) so they are recomputed rather than mixed with the new ones.

Per-sample outputs of every unit (scores, labels, ids, retrieval ranks, per-image scores) are stored
as compressed ``samples/<unit>.npz`` beside the CSV (``samples`` column), together with the recipes
that recompute each metric from them (:mod:`medvlp.benchmarks.metrics.stats`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from medvlp.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

LEGACY_COLUMNS = ["suite", "method", "label", "checkpoint", "weights", "dataset", "dataset_version", "split_hash",
                  "protocol", "params", "fraction", "seed", "metric", "value", "definition", "config_hash",
                  "timestamp"]
#: columns added after the first release: filled with "" when an older file lacks them
COLUMNS = LEGACY_COLUMNS + ["comparability", "backbone", "protocol_name", "pretrain_seed", "subset_seed", "flags",
                            "samples"]
UNIT = ["label", "dataset", "protocol", "params", "fraction", "pretrain_seed", "subset_seed", "seed",
        "weights", "config_hash", "dataset_version"]
STR_COLUMNS = {c: str for c in ("split_hash", "weights", "config_hash", "dataset_version", "flags", "samples",
                                "backbone", "protocol_name", "params", "label", "method", "checkpoint",
                                "comparability")}


def _norm(v: Any) -> str:
    """Canonical text of a key value: numbers as ``%g`` (0 == 0.0 == "0"), missing as ""."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    try:
        return f"{float(v):g}"
    except (TypeError, ValueError):
        return str(v)


def unit_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The identity of a unit (see module docstring); absent fields count as empty."""
    return tuple(_norm(row.get(k, "")) for k in UNIT)


class ResultStore:
    """Append-only result table backed by a CSV written atomically.

    Args:
        path: CSV path (created on first write). Files written before the seed/flag/sample columns
            existed are read with those columns empty.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_file():
            df = pd.read_csv(self.path, dtype=STR_COLUMNS, keep_default_na=False, na_values={"value": ["", "nan"]})
            missing = set(LEGACY_COLUMNS) - set(df.columns)
            if missing:
                raise ValueError(f"{self.path}: not a medvlp result file (missing columns {sorted(missing)})")
            legacy = "subset_seed" not in df.columns
            for c in COLUMNS:
                if c not in df.columns:
                    df[c] = ""
            if legacy:  # before subset and training seeds were separated, one seed drove both
                df["subset_seed"] = df["seed"].astype(str)
            df["protocol_name"] = [p or k for p, k in zip(df["protocol_name"], df["protocol"])]
            self.df = df[COLUMNS]
        else:
            self.df = pd.DataFrame(columns=COLUMNS)
        self._keys = {unit_key(r) for r in self.df.to_dict("records")}

    def done(self, **unit: Any) -> bool:
        """True when rows for this unit exist (same seeds, weights, config hash and dataset version)."""
        return unit_key(unit) in self._keys

    def drop_stale(self, keep: Mapping[str, Any], **scope: Any) -> int:
        """Remove rows matching ``scope`` (e.g. label, dataset, pretrain seed) whose ``keep`` fields
        (weights, config hash, dataset version) differ; returns how many rows were removed (logged)."""
        if self.df.empty:
            return 0
        in_scope = np.ones(len(self.df), bool)
        for k, v in scope.items():
            in_scope &= self.df[k].map(_norm).to_numpy() == _norm(v)
        differs = np.zeros(len(self.df), bool)
        for k, v in keep.items():
            differs |= self.df[k].map(_norm).to_numpy() != _norm(v)
        stale = in_scope & differs
        if not stale.any():
            return 0
        old = self.df[stale]
        log.warning("%s: %d rows of %s were computed with other weights/config/data (%s); recomputing them",
                    self.path, int(stale.sum()), dict(scope),
                    ", ".join(f"{k} {sorted(set(old[k].map(_norm)))} -> {_norm(v)}" for k, v in keep.items()))
        for rel in set(old["samples"]) - set(self.df.loc[~stale, "samples"]):
            if rel:
                (self.path.parent / rel).unlink(missing_ok=True)
        self.df = self.df[~stale].reset_index(drop=True)
        self._keys = {unit_key(r) for r in self.df.to_dict("records")}
        atomic_write_text(self.path, self.df.to_csv(index=False))
        return int(stale.sum())

    def add(self, rows: Iterable[Mapping[str, Any]], samples: Mapping[str, np.ndarray] | None = None,
            recipes: Mapping[str, Any] | None = None) -> None:
        """Append rows (one unit), store its per-sample arrays (if any), and rewrite the CSV atomically."""
        rows = [dict(r) for r in rows]
        if not rows:
            return
        if samples:
            rel = self.save_samples(rows[0], samples, recipes or {}, [f for f in str(rows[0].get("flags", "")).split(" | ") if f])
            for r in rows:
                r["samples"] = rel
        new = pd.DataFrame([{c: r.get(c, "") for c in COLUMNS} for r in rows], columns=COLUMNS)
        self.df = new if self.df.empty else pd.concat([self.df, new], ignore_index=True)
        self._keys |= {unit_key(r) for r in rows}
        atomic_write_text(self.path, self.df.to_csv(index=False))

    def save_samples(self, unit: Mapping[str, Any], samples: Mapping[str, np.ndarray],
                     recipes: Mapping[str, Any], flags: list[str]) -> str:
        """Write ``samples/<unit hash>.npz`` (compressed, no pickled objects); returns its relative path."""
        name = hashlib.sha1("\x1f".join(unit_key(unit)).encode()).hexdigest()[:20]
        rel = f"samples/{name}.npz"
        buf = io.BytesIO()
        arrays = {k: np.asarray(v) for k, v in samples.items()}
        for k, v in arrays.items():
            if v.dtype == object:
                raise TypeError(f"per-sample array {k!r} has dtype object; store numbers or strings")
        np.savez_compressed(buf, **arrays, __recipes__=np.asarray(json.dumps(recipes)),
                            __flags__=np.asarray(json.dumps(flags)))
        atomic_write_bytes(self.path.parent / rel, buf.getvalue())
        return rel

    def load_samples(self, rel: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, recipes)`` of a unit's ``samples`` file (relative to the CSV's folder).

        Raises:
            FileNotFoundError: naming the file when it is missing.
        """
        path = self.path.parent / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path}: per-sample file listed in {self.path} is missing")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if not k.startswith("__")}
            recipes = json.loads(str(z["__recipes__"])) if "__recipes__" in z.files else {}
        return arrays, recipes
