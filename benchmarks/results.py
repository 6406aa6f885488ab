"""Result rows: one per (method label, checkpoint, dataset, protocol, fraction, seed, metric).

The CSV is rewritten atomically (temp file + rename) after every finished (protocol, fraction, seed),
so a killed run loses at most the unit in progress and never leaves a half-written file; a rerun skips
units whose rows are present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from medvlp.io import atomic_write_text

COLUMNS = ["suite", "method", "label", "checkpoint", "weights", "dataset", "dataset_version", "split_hash",
           "protocol", "params", "fraction", "seed", "metric", "value", "definition", "config_hash", "timestamp", "comparability"]
#: columns added after the first release: filled with "" when an older file lacks them
OPTIONAL = ("comparability",)
UNIT = ["label", "dataset", "protocol", "params", "fraction", "seed"]


class ResultStore:
    """Append-only result table backed by a CSV written atomically.

    Args:
        path: CSV path (created on first write).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_file():
            df = pd.read_csv(self.path, dtype={"split_hash": str, "weights": str, "config_hash": str, "comparability": str})
            for col in OPTIONAL:
                if col not in df.columns:
                    df[col] = ""
            missing = set(COLUMNS) - set(df.columns)
            if missing:
                raise ValueError(f"{self.path}: not a medvlp result file (missing columns {sorted(missing)})")
            self.df = df[COLUMNS]
        else:
            self.df = pd.DataFrame(columns=COLUMNS)

    def _unit_key(self, row: Mapping[str, Any]) -> tuple:
        return tuple(str(row[k]) if k not in ("fraction",) else f"{float(row[k]):g}" for k in UNIT)

    def done(self, **unit: Any) -> bool:
        """True when rows for this unit (label, dataset, protocol, params, fraction, seed) exist."""
        if self.df.empty:
            return False
        key = self._unit_key(unit)
        keys = {self._unit_key(r) for r in self.df[UNIT].to_dict("records")}
        return key in keys

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows (one unit) and rewrite the CSV atomically."""
        new = pd.DataFrame([{c: r.get(c, "") for c in COLUMNS} for r in rows], columns=COLUMNS)
        if new.empty:
            return
        self.df = new if self.df.empty else pd.concat([self.df, new], ignore_index=True)
        atomic_write_text(self.path, self.df.to_csv(index=False))
