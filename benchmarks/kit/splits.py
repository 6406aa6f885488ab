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
from typing import Any, Sequence
from medvlp.io import atomic_write_text
import pandas as pd


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


FRACTION_SOURCES = ("hash", "mgca", "file")


def mgca_fraction_ids(ids: Sequence[str], fraction: float, random_state: int = 42) -> list[str]:
    """MGCA's label fraction: ``df.sample(frac=fraction, random_state=42)`` over its train table
    (``mgca/datasets/classification_dataset.py`` L52-53, L165-166 @ 680fe4a).

    pandas draws ``round(fraction · N)`` positions with ``np.random.RandomState(random_state)``
    (numpy's frozen legacy generator, so the draw is the same on every version); ``fraction == 1``
    keeps every id, as MGCA. The positions index ``ids`` in the order given, so the subset is MGCA's
    only when ``ids`` is MGCA's train CSV in MGCA's row order:

    * RSNA (``split_convention: mgca``): the datamodule emits its records in the order
      ``train_test_split`` leaves MGCA's ``train.csv`` (``mgca/preprocess/rsna.py`` L50-64), so the
      subset is MGCA's exactly (tested against a transcription of MGCA's preprocessing).
    * CheXpert (``split_convention: mgca``): not identical. MGCA builds ``train.csv`` with
      ``df.drop(valid_ids)`` where ``valid_ids`` are *positions* but ``drop`` removes index *labels*
      (``mgca/preprocess/chexpert.py`` L50-53, after 1,000 5x200 rows left gaps in the index), so its
      train and validation sets overlap and some non-validation rows are missing; medvlp keeps train and
      validation disjoint (train = every frontal row not drawn for validation). The table ``df.sample``
      runs over therefore has other rows and another length, and the drawn subset differs.
    """

    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(ids)
    return pd.Series(list(ids)).sample(frac=fraction, random_state=random_state).tolist()


def read_subset_file(path: str | Path) -> list[str]:
    """Ids listed in a label-fraction file: the first whitespace-separated token of each non-empty line.

    Accepts medvlp's id files (one id per line) and BenchX's shipped subset files (``train_1.txt``,
    ``train_10.txt``: ``<image> <label> <label> …`` per line).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"label-fraction file {p} does not exist")
    return [line.split()[0] for line in p.read_text().splitlines() if line.strip()]


def match_subset(ids: Sequence[str], listed: Sequence[str], where: str) -> list[int]:
    """Positions in ``ids`` of the ``listed`` ids, matching exactly or by a unique trailing path.

    BenchX lists file names (``00000001_000.png``) where medvlp ids may be relative paths; a listed
    name matches an id equal to it or ending in ``/<name>`` (only when exactly one id does).

    Raises:
        ValueError: naming ``where`` when listed ids are not in the train split or are ambiguous.
    """
    position = {sid: i for i, sid in enumerate(ids)}
    tails: dict[str, list[int]] = {}
    for i, sid in enumerate(ids):
        parts = str(sid).split("/")
        for k in range(1, len(parts)):
            tails.setdefault("/".join(parts[k:]), []).append(i)
    rows, missing, ambiguous = [], [], []
    for name in listed:
        if name in position:
            rows.append(position[name])
        elif len(tails.get(name, [])) == 1:
            rows.append(tails[name][0])
        elif name in tails:
            ambiguous.append(name)
        else:
            missing.append(name)
    if missing or ambiguous:
        raise ValueError(f"{where}: {len(missing)} listed ids not in the train split (e.g. {missing[:3]}), "
                         f"{len(ambiguous)} ambiguous (e.g. {ambiguous[:3]})")
    if len(set(rows)) != len(rows):
        raise ValueError(f"{where}: lists some training samples twice")
    return rows


def select_fraction(ids: Sequence[str], fraction: float, seed: int, source: str = "hash",
                    files: dict[Any, str] | None = None, materialise: Path | None = None) -> tuple[list[int], str, str]:
    """Training rows of one label fraction under a named source; returns ``(rows, split_hash, description)``.

    Sources: ``hash`` (:func:`fraction_ids`, per seed), ``mgca`` (:func:`mgca_fraction_ids`, the same
    subset for every seed, as MGCA), ``file`` (``files[percent]``, keyed by label *percentage*
    (``{1: train_1.txt, 10: train_10.txt}``, BenchX's naming; 100 % without a file = the whole train
    split): an id file or a BenchX subset file, read by :func:`read_subset_file`). With ``materialise`` (a folder) the chosen ids are written
    as ``<source>_<fraction>_s<seed>.txt`` (one id per line) so the subset can be inspected and reused.

    Raises:
        ValueError: unknown source, or ``file`` without a file for this fraction.
    """
    if source not in FRACTION_SOURCES:
        raise ValueError(f"fraction_source must be one of {FRACTION_SOURCES}, got {source!r}")
    if source == "hash":
        rows, _ = fraction_rows(ids, fraction, seed)
        desc = f"sha1-rank fraction {fraction:g}, seed {seed}"
    elif source == "mgca":
        position = {sid: i for i, sid in enumerate(ids)}
        rows = [position[s] for s in mgca_fraction_ids(ids, fraction)]
        desc = f"MGCA df.sample(frac={fraction:g}, random_state=42)"
    else:
        pct = round(100 * float(fraction), 6)
        files = {round(float(k), 6): v for k, v in (files or {}).items()}
        if pct == 100 and 100 not in files:
            rows, desc = list(range(len(ids))), "full train split"
        elif pct not in files:
            raise ValueError(f"fraction_source 'file' has no file for {pct:g} % labels (fraction_files keys are "
                             f"label percentages: {sorted(files)})")
        else:
            path = files[pct]
            rows = match_subset(ids, read_subset_file(path), str(path))
            desc = f"subset file {Path(path).name}"
    chosen = [ids[r] for r in rows]
    h = split_hash(chosen)
    if materialise is not None:
        write_split_file(Path(materialise) / f"{source}_{fraction:g}_s{seed}.txt", chosen)
    return rows, h, f"{desc}: {len(rows)} of {len(ids)} train samples"
