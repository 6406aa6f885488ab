"""Names that become path components: validated (:func:`check_name`) or mapped to a safe slug (:func:`slug`).

Every name taken from a config, a suite or a results table that medvlp joins into a file or folder path
(suite method labels, dataset names, protocol keys, run names, report figure names) goes through this
module, so no name can climb out of the output folder (``../x``), replace it (``/abs/x``), hide a file
(leading dot), or break the file system (NUL, over-long names).
"""
from __future__ import annotations

import hashlib
import re

#: characters allowed in a name used as one path component
NAME_CHARS = "A-Za-z0-9._-"
#: longest accepted name (file systems allow 255 bytes per component; room is left for suffixes)
MAX_NAME_LENGTH = 100
_VALID = re.compile(rf"[A-Za-z0-9_-][{NAME_CHARS}]*")


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a path component, or ``None`` when it can."""
    text = str(name)
    if not text:
        return "is empty"
    if len(text) > MAX_NAME_LENGTH:
        return f"is {len(text)} characters long (at most {MAX_NAME_LENGTH})"
    if text.startswith("."):
        return "starts with a dot"
    if not _VALID.fullmatch(text):
        return f"may contain only [{NAME_CHARS}] (it becomes a folder or file name)"
    return None


def check_name(name: object, what: str) -> str:
    """``name`` as a string when it is a safe path component.

    Args:
        name: the name.
        what: where it comes from, for the message (e.g. ``"suite method label"``).

    Raises:
        ValueError: one line naming ``what``, the name and the rule it breaks.
    """
    problem = name_problem(name)
    if problem:
        raise ValueError(f"{what} {_shown(name)} {problem}")
    return str(name)


def sanitize(text: str, fallback: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._-]`` replaced by ``-`` and leading or
    trailing ``-``/``.`` dropped; ``fallback`` when nothing is left (no hash: for names that are unique
    already, such as derived run names and job names)."""
    return re.sub(rf"[^{NAME_CHARS}]+", "-", text).strip("-.") or fallback


def slug(name: object) -> str:
    """A safe path component for any ``name``: the name itself when valid, else its characters outside
    ``[A-Za-z0-9._-]`` replaced, leading dots dropped, cut to fit, plus a short hash of the original (so two
    different names never share a slug)."""
    text = str(name)
    if name_problem(text) is None:
        return text
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    base = sanitize(text, "")[: MAX_NAME_LENGTH - 9].rstrip(".-")
    return f"{base}-{digest}" if base else digest


def _shown(name: object) -> str:
    text = repr(str(name))
    return text if len(text) <= 60 else text[:57] + "...'"
