"""Atomic file writes and safe checkpoint loading."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


@contextmanager
def atomic_target(path: Path) -> Iterator[str]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` (``os.replace``), on error it
    is removed, so readers only ever see the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced temp file + rename)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` through a temp file and rename, so a crash never leaves a truncated file."""
    with atomic_target(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no code.

    Raises:
        FileNotFoundError: naming the path.
        RuntimeError: naming the path when the file is not a safe tensor checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RuntimeError(
            f"refusing to load {p}: not a weights-only checkpoint ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
