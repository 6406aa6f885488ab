"""Argument checks and suggestions: enum-like values fail at construction naming the choices; unknown keys get
the nearest valid key ("did you mean ...?").
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Sequence, TypeVar

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


def did_you_mean(key: str, choices: Iterable[str], prefix: str = "") -> str:
    """``" (did you mean <prefix><best>?)"`` for the closest of ``choices`` (difflib), else ``""``."""
    by_lower = {str(c).lower(): str(c) for c in choices}
    best = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{by_lower[best[0]]}?)" if best else ""


def unknown_key(where: str, key: str, choices: Iterable[str]) -> str:
    """One message for an unknown key ``<where>.<key>`` with a suggestion."""
    choices = sorted(set(choices))
    hint = did_you_mean(key, choices, f"{where}." if where else "")
    if not hint and len(choices) <= 12:
        hint = f" (valid: {', '.join(choices)})"
    return f"unknown key {where + '.' if where else ''}{key}{hint}"
