"""Deterministic label-fraction splits, independent of library versions.

``fraction_ids(ids, fraction, seed)`` ranks ids by ``sha1(f"{seed}:{id}")`` and keeps the first
``ceil(fraction · N)`` (at least ``min_count``). The same ids, fraction and seed give the same subset
on every machine and pandas/numpy version (unlike MGCA's runtime ``df.sample``). ``split_hash`` is the
sha1 of the sorted chosen ids and is recorded with every result row.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence


def _rank(seed: int, sid: str) -> str:
    return hashlib.sha1(f"{seed}:{sid}".encode()).hexdigest()


def fraction_ids(ids: Sequence[str], fraction: float, seed: int, min_count: int = 2) -> list[str]:
    """The ``fraction`` subset of ``ids`` for ``seed`` (order: by hash rank)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique to build a split")
    n = min(len(ids), max(min_count, math.ceil(fraction * len(ids))))
    return sorted(ids, key=lambda s: _rank(seed, str(s)))[:n]


def fraction_rows(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[int], str]:
    """Positions in ``ids`` of the :func:`fraction_ids` subset (in hash-rank order) and its split hash."""
    chosen = fraction_ids(ids, fraction, seed)
    position = {sid: i for i, sid in enumerate(ids)}
    return [position[sid] for sid in chosen], split_hash(chosen)


def split_hash(ids: Sequence[str]) -> str:
    """Short sha1 over the sorted ids."""
    return hashlib.sha1("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:16]


def write_split_file(path: Path, ids: Sequence[str]) -> str:
    """Write one id per line (sorted); returns the split hash."""
    from medvlp.io import atomic_write_text

    atomic_write_text(Path(path), "\n".join(sorted(map(str, ids))) + "\n")
    return split_hash(ids)


def read_split_file(path: Path, expected_hash: str | None = None) -> list[str]:
    """Read a split file and check its hash.

    Raises:
        ValueError: naming the file when the hash differs from ``expected_hash``.
    """
    ids = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    h = split_hash(ids)
    if expected_hash is not None and h != expected_hash:
        raise ValueError(f"split file {path} has hash {h}, expected {expected_hash}: the split changed")
    return ids
