"""Error types of file writes, importable without torch (the CLI classifies errors before any heavy import)."""
from __future__ import annotations

import errno

#: ``errno`` values that mean "the disk cannot take this file" (no space, quota, read-only file system, too large)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
#: every ``errno`` of a failed write that is reported as "cannot write PATH: CAUSE" (exit code 2)
WRITE_ERRNOS = DISK_FULL_ERRNOS + (errno.EACCES,)


class WriteError(OSError):
    """A file could not be written; the message names the path and the cause (e.g. no space left)."""

    def __str__(self) -> str:
        return str(self.strerror)
