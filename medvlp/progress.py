"""Progress reporting for long loops outside Lightning's trainer.

Bars (tqdm) show on an interactive terminal; ``MEDVLP_PROGRESS=1`` forces them (e.g. in a CI log),
``MEDVLP_PROGRESS=0`` hides them. The suite runner logs one line per unit instead
("unit k/N ... elapsed, ETA"), which reads well in files too.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("medvlp.progress")


def bars_enabled() -> bool:
    """Whether progress bars are drawn (``MEDVLP_PROGRESS`` or an interactive stderr)."""
    env = os.environ.get("MEDVLP_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


def track(iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """``iterable`` wrapped in a tqdm bar (``total`` items, described by ``desc``) when bars are enabled."""
    if not bars_enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm  # lazy: progress bars only when shown

    yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def format_seconds(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class UnitProgress:
    """Counts units of a known total and logs ``unit k/N (what): elapsed, ETA`` after each.

    The ETA extrapolates the mean time of the units run so far (units found done or not applicable are
    counted but not timed).
    """

    def __init__(self, total: int, what: str = "unit") -> None:
        self.total, self.what = int(total), what
        self.done = self.timed = 0
        self.start = time.time()
        self.busy = 0.0

    def step(self, label: str, seconds: float | None = None, n: int = 1, quiet: bool = False) -> str:
        """Mark ``n`` units finished (``seconds``: time spent running them, None if skipped) and log the line
        (unless ``quiet``); returns it."""
        self.done += n
        if seconds is not None:
            self.timed += n
            self.busy += seconds
        elapsed = time.time() - self.start
        left = self.total - self.done
        eta = "?" if not self.timed else format_seconds(self.busy / self.timed * left)
        line = f"{self.what} {self.done}/{self.total} ({label}): elapsed {format_seconds(elapsed)}, ETA {eta}"
        if not quiet:
            log.info(line)
        return line
