"""Provenance of a run: library versions, the medvlp git commit (when installed from a checkout), host and
device. Recorded in ``summary.json`` and with every benchmark results row."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any
import torch

LIBRARIES = ("medvlp", "torch", "lightning", "transformers", "monai", "numpy")


def library_versions() -> dict[str, str]:
    """Installed version of each of :data:`LIBRARIES` (``"not installed"`` when missing)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """``HEAD`` commit of the checkout medvlp is imported from (``+dirty`` with local changes), else None."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def device_name(device: Any = None) -> str:
    """``cuda:0 (NVIDIA H100 ...)`` for a CUDA device, else ``cpu (<processor>)``."""

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type} ({platform.processor() or platform.machine()})"


def provenance(device: Any = None) -> dict[str, Any]:
    """``{versions, git_commit, host, python, device}`` of the current process."""
    return {"versions": library_versions(), "git_commit": git_commit(), "host": socket.gethostname(),
            "python": platform.python_version(), "device": device_name(device)}
