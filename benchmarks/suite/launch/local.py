"""``launcher=local``: every unit of the suite runs in this process, one arm after another."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from medvlp.benchmarks.suite.runner import run_suite


class LocalLauncher:
    """Run the suite here (today's behaviour). Takes no options besides ``name``.

    Args:
        options: the ``launcher:`` block (only ``name: local``).

    Raises:
        ValueError: for any other key.
    """

    KEYS = ("name",)

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        extra = sorted(set(options or {}) - set(self.KEYS))
        if extra:
            raise ValueError(f"launcher=local takes no options (got {extra}); they belong to launcher=slurm")

    def launch(self, suite: Mapping[str, Any], device: str | None = None, only: Sequence[str] | None = None,
               wait: bool = True, dry_run: bool = False) -> Path:
        """Run every unit (or the arms ``only`` names); returns the results CSV."""
        if dry_run:
            raise ValueError("dry_run=true prints the jobs a launcher would submit; use it with launcher=slurm")
        return run_suite(suite, device, only=only)
