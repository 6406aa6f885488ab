"""Argument checks shared by constructors: enum-like values fail at construction, naming the choices."""
from __future__ import annotations

import difflib
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def suggest(value: Any, choices: Sequence[Any]) -> str:
    """``" (did you mean 'x'?)"`` for the closest choice by edit similarity, else ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(arg: str, value: T, choices: Sequence[Any], owner: str = "") -> T:
    """Return ``value`` if it is one of ``choices``.

    Raises:
        ValueError: ``"<owner>: <arg> must be one of [...], got 'x' (did you mean 'y'?)"``.
    """
    if value not in choices:
        where = f"{owner}: " if owner else ""
        raise ValueError(f"{where}{arg} must be one of {list(choices)}, got {value!r}{suggest(value, choices)}")
    return value
