"""Atomic file writes and safe checkpoint loading."""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from medvlp.errors import DISK_FULL_ERRNOS, WriteError  # noqa: F401  (public here too)


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows (else set and restored)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_target(path: Path) -> Iterator[str]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` (``os.replace``), on error it
    is removed, so readers only ever see the old or the complete new file.

    The new file gets the mode a plain ``open`` would give (``0o666`` less the umask), not the
    temp file's ``0o600``.

    Raises:
        WriteError: when the folder, the temp file, the write or the rename fails (no space, permission,
            read-only file system), naming ``path`` and the cause; the previous file is left untouched.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        if isinstance(exc, WriteError):
            raise
        cause = os.strerror(exc.errno) if exc.errno else str(exc)
        raise WriteError(exc.errno or errno.EIO, f"cannot write {path}: {cause.lower()} "
                         f"(the previous file, if any, is unchanged)") from exc
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp and os.path.exists(tmp):
        try:
            os.unlink(tmp)
        except OSError:
            pass


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


class _WriteRecorder:
    """A binary file wrapper that remembers the first ``OSError`` its writes raised.

    ``torch.save`` reports a failed write of its zip writer as ``RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos``; the recorded error says what really happened.
    """

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` through a temp file and rename, so a crash never leaves a truncated file.

    Raises:
        WriteError: naming ``path`` and the cause (e.g. no space left on device), also where torch reports
            the failed write as its own ``RuntimeError``; the previous file is kept.
    """
    with atomic_target(path) as tmp, open(tmp, "wb") as fh:
        rec = _WriteRecorder(fh)
        try:
            torch.save(obj, rec)  # type: ignore[arg-type]  # a file-like object: the OS error is seen here
        except RuntimeError as exc:
            if rec.error is not None:
                raise rec.error from exc
            raise
        fh.flush()
        os.fsync(fh.fileno())
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
