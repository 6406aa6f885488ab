"""Run a documentation page's shell and Python blocks as written, in order, in one folder."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of every ``bash`` and ``python`` block of ``page``, in page order (snippet
    includes, ``--8<--``, are files shown, not code to run)."""
    text = page.read_text(encoding="utf-8")
    return [(lang, code) for lang, code in FENCE.findall(text) if not code.lstrip().startswith("--8<--")]


def run(page: Path, cwd: Path, env: Mapping[str, str] | None = None, python: str = sys.executable,
        timeout: int = 900) -> list[str]:
    """Run every block of ``page`` in ``cwd``: bash blocks with ``bash -e``, Python blocks with ``python``.

    Returns:
        Each block's output.

    Raises:
        AssertionError: naming the block that failed, with its output.
    """
    full = {**os.environ, **(env or {})}
    outputs = []
    for i, (lang, code) in enumerate(blocks(page)):
        cmd = ["bash", "-e", "-c", code] if lang == "bash" else [python, "-c", code]
        done = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"{page.name} block {i + 1} ({lang}) failed:\n{code}\n--- output ---\n{out[-4000:]}"
        outputs.append(out)
    return outputs
