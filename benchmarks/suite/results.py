"""Result rows: one file per finished unit, shared safely by many writers; ``results.csv`` is derived from them.

A unit is identified by label, dataset, protocol key, params, fraction, the pretraining / label-subset /
training seeds **and** the weights fingerprint, config hash and dataset version (:data:`UNIT`): a rerun
skips a unit only when all of them match. Each finished unit is written as its own file,
``units/<unit name>.json`` (:func:`unit_name`: a hash of the key), through a temp file and a rename, so a
reader never sees a half-written unit and a killed writer leaves only a temp file that is ignored. Many
processes (local or SLURM jobs on a network file system, where SQLite and ``fcntl`` locking are unreliable)
can write one output folder at once: a unit computed twice is replaced by an identical file, never
duplicated. ``results.csv`` (what users, the report and the paper view read) is rewritten atomically from
the unit files after every unit; each writer re-lists the folder after its rename and rewrites until the
list is stable, so the last rename always includes every unit written before it.

When a label's weights (or config, or dataset version) changed, :meth:`ResultStore.drop_stale` removes its
old units (logged with their row count) so they are recomputed rather than mixed with the new ones.

Per-sample outputs of every unit (scores, labels, ids, retrieval ranks, per-image scores) are stored as
compressed ``samples/<unit name>.npz`` (``samples`` column), with the recipes that recompute each metric
from them (:mod:`medvlp.benchmarks.metrics.stats`). Those files are named by the store only and every path
is resolved and checked to lie inside the output folder before it is read or deleted.

A folder written before unit files existed (only ``results.csv``) is migrated on first open: its rows are
split into unit files; its ``samples`` cells are replaced by the store's own names.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
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
#: folder (beside results.csv) of the per-unit files
UNITS_DIR = "units"
SAMPLES_DIR = "samples"


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


def unit_name(row: Mapping[str, Any]) -> str:
    """The file stem of a unit (its unit file and its per-sample file): a hash of :func:`unit_key`."""
    return hashlib.sha1("\x1f".join(unit_key(row)).encode()).hexdigest()[:20]


def read_table(text: str) -> pd.DataFrame:
    """A results table from CSV text, with the key columns as text and older files' columns filled in."""
    df = pd.read_csv(io.StringIO(text), dtype=STR_COLUMNS, keep_default_na=False, na_values={"value": ["", "nan"]})
    legacy = "subset_seed" not in df.columns
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = ""
    if legacy and len(df):  # before subset and training seeds were separated, one seed drove both
        df["subset_seed"] = df["seed"].astype(str)
    df["protocol_name"] = [p or k for p, k in zip(df["protocol_name"], df["protocol"])]
    return df[COLUMNS]


class ResultStore:
    """Result table of one output folder: a unit file per finished unit, ``results.csv`` derived from them.

    Args:
        path: the CSV path (``<output>/results.csv``); unit files live in ``<output>/units/``, per-sample
            files in ``<output>/samples/``. A folder with only an older ``results.csv`` is migrated.

    Raises:
        ValueError: ``path`` exists but is not a medvlp result file (missing columns).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.root = self.path.parent
        self.units_dir = self.root / UNITS_DIR
        self._units: dict[str, dict[str, Any]] = {}
        if not self.units_dir.is_dir() and self.path.is_file():
            self._migrate()
        self.refresh()

    # ------------------------------------------------------------------ reading
    def _unit_files(self) -> set[str]:
        if not self.units_dir.is_dir():
            return set()
        return {f[:-5] for f in os.listdir(self.units_dir) if f.endswith(".json") and not f.startswith(".")}

    def refresh(self) -> pd.DataFrame:
        """Re-read the unit files (new ones only; removed ones are forgotten); returns :attr:`df`."""
        names = self._unit_files()
        for gone in set(self._units) - names:
            del self._units[gone]
        for name in sorted(names - set(self._units)):
            try:
                self._units[name] = json.loads((self.units_dir / f"{name}.json").read_text())
            except FileNotFoundError:  # removed by another writer's drop_stale since the listing
                continue
            except ValueError as exc:
                raise ValueError(f"{self.units_dir / name}.json: not a medvlp unit file ({exc})") from None
        self.df = self._frame()
        return self.df

    def _ordered(self) -> list[tuple[str, dict[str, Any]]]:
        return sorted(self._units.items(), key=lambda kv: (kv[1].get("written", 0), kv[0]))

    def _frame(self) -> pd.DataFrame:
        rows = [{c: r.get(c, "") for c in COLUMNS} for _, u in self._ordered() for r in u["rows"]]
        if not rows:
            return pd.DataFrame(columns=COLUMNS)
        return read_table(pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))

    def done(self, **unit: Any) -> bool:
        """True when this unit's file exists (same seeds, weights, config hash and dataset version), written
        by this process or any other."""
        return (self.units_dir / f"{unit_name(unit)}.json").is_file()

    # ------------------------------------------------------------------ writing
    def write_table(self) -> Path:
        """Rewrite ``results.csv`` from the unit files until the listing is stable (see module docstring)."""
        for _ in range(100):
            self.refresh()
            before = set(self._units)
            atomic_write_text(self.path, self.df.to_csv(index=False))
            if self._unit_files() == before:
                break
        return self.path

    def add(self, rows: Iterable[Mapping[str, Any]], samples: Mapping[str, np.ndarray] | None = None,
            recipes: Mapping[str, Any] | None = None) -> None:
        """Store one unit: its per-sample arrays (if any), then its rows as one unit file (atomically), then
        rewrite ``results.csv``. Rows of different units in one call are stored as separate units."""
        rows = [dict(r) for r in rows]
        if not rows:
            return
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(unit_name(r), []).append(r)
        for name, unit_rows in groups.items():
            if samples:
                rel = self.save_samples(unit_rows[0], samples, recipes or {},
                                        [f for f in str(unit_rows[0].get("flags", "")).split(" | ") if f])
                for r in unit_rows:
                    r["samples"] = rel
            self._write_unit(name, unit_rows)
        self.write_table()

    def _write_unit(self, name: str, rows: list[dict[str, Any]]) -> None:
        clean = [{c: _jsonable(r.get(c, "")) for c in COLUMNS} for r in rows]
        doc = {"key": dict(zip(UNIT, unit_key(rows[0]))), "written": time.time_ns(), "rows": clean}
        atomic_write_text(self.units_dir / f"{name}.json", json.dumps(doc, sort_keys=True))

    def drop_stale(self, keep: Mapping[str, Any], **scope: Any) -> int:
        """Remove units matching ``scope`` (e.g. label, dataset, pretrain seed) whose ``keep`` fields
        (weights, config hash, dataset version) differ, with their per-sample files; returns how many rows
        were removed (logged)."""
        self.refresh()
        stale = []
        for name, u in self._units.items():
            key = u.get("key") or dict(zip(UNIT, unit_key(u["rows"][0])))
            if all(key.get(k, "") == _norm(v) for k, v in scope.items()) and \
                    any(key.get(k, "") != _norm(v) for k, v in keep.items()):
                stale.append(name)
        if not stale:
            return 0
        n_rows = sum(len(self._units[n]["rows"]) for n in stale)
        old = [self._units[n]["key"] for n in stale]
        log.warning("%s: %d rows of %s were computed with other weights/config/data (%s); recomputing them",
                    self.path, n_rows, dict(scope),
                    ", ".join(f"{k} {sorted({o.get(k, '') for o in old})} -> {_norm(v)}" for k, v in keep.items()))
        for name in stale:
            self._inside(self.units_dir / f"{name}.json").unlink(missing_ok=True)
            self._samples_path(name).unlink(missing_ok=True)
        self.write_table()
        return n_rows

    def _migrate(self) -> None:
        """Split an older ``results.csv`` (no unit files yet) into unit files."""
        df = pd.read_csv(self.path, dtype=STR_COLUMNS, keep_default_na=False, na_values={"value": ["", "nan"]})
        missing = set(LEGACY_COLUMNS) - set(df.columns)
        if missing:
            raise ValueError(f"{self.path}: not a medvlp result file (missing columns {sorted(missing)})")
        df = read_table(self.path.read_text())
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in df.to_dict("records"):
            groups.setdefault(unit_name(r), []).append(r)
        for i, (name, rows) in enumerate(groups.items()):
            own = f"{SAMPLES_DIR}/{name}.npz"
            for r in rows:  # only the store's own name, and only when that file exists
                r["samples"] = own if self._samples_path(name).is_file() else ""
            clean = [{c: _jsonable(r.get(c, "")) for c in COLUMNS} for r in rows]
            doc = {"key": dict(zip(UNIT, unit_key(rows[0]))), "written": i, "rows": clean}
            atomic_write_text(self.units_dir / f"{name}.json", json.dumps(doc, sort_keys=True))
        log.info("%s: migrated %d rows into %d unit files under %s", self.path, len(df), len(groups), self.units_dir)

    # ------------------------------------------------------------------ per-sample files
    def _inside(self, path: Path) -> Path:
        """``path`` resolved; raises ``ValueError`` unless it lies inside the output folder."""
        resolved = path.resolve()
        root = self.root.resolve()
        if resolved != root and root not in resolved.parents:
            raise ValueError(f"{self.path}: per-sample path {path} lies outside the output folder {root}")
        return resolved

    def _samples_path(self, name: str) -> Path:
        return self._inside(self.root / SAMPLES_DIR / f"{name}.npz")

    def save_samples(self, unit: Mapping[str, Any], samples: Mapping[str, np.ndarray],
                     recipes: Mapping[str, Any], flags: list[str]) -> str:
        """Write ``samples/<unit name>.npz`` (compressed, no pickled objects); returns its relative path."""
        name = unit_name(unit)
        buf = io.BytesIO()
        arrays = {k: np.asarray(v) for k, v in samples.items()}
        for k, v in arrays.items():
            if v.dtype == object:
                raise TypeError(f"per-sample array {k!r} has dtype object; store numbers or strings")
        np.savez_compressed(buf, **arrays, __recipes__=np.asarray(json.dumps(recipes)),
                            __flags__=np.asarray(json.dumps(flags)))
        atomic_write_bytes(self._samples_path(name), buf.getvalue())
        return f"{SAMPLES_DIR}/{name}.npz"

    def load_samples(self, rel: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, recipes)`` of a unit's ``samples`` file (relative to the CSV's folder).

        Raises:
            ValueError: the path lies outside the output folder.
            FileNotFoundError: naming the file when it is missing.
        """
        path = self._inside(self.root / rel)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: per-sample file listed in {self.path} is missing")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if not k.startswith("__")}
            recipes = json.loads(str(z["__recipes__"])) if "__recipes__" in z.files else {}
        return arrays, recipes


def _jsonable(v: Any) -> Any:
    """A row value as plain JSON (numpy scalars to Python numbers)."""
    if isinstance(v, np.generic):
        return v.item()
    return v
