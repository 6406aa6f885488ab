"""How faithfully a reference protocol follows its official evaluation code: one table of elements per
protocol (element, official value with its file:line at a named commit, medvlp's value, same or the
deviation and why), rendered into the protocol's docstring and summarised in every result row's
``comparability["fidelity"]``: ``official`` only when every element is the same and no suite parameter
moved an official setting, otherwise ``deviates: <elements>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Element:
    """One element of an official recipe.

    Attributes:
        name: what it is (``optimizer``, ``split`` …).
        official: the official value.
        source: file:line at the named commit where the official value is set.
        medvlp: what medvlp does.
        deviation: empty when medvlp does the same, else the deviation and its reason.
        param: the suite parameter that sets this element (overriding it away from ``value`` is a deviation).
        value: the official value of ``param``.
    """

    name: str
    official: str
    source: str
    medvlp: str
    deviation: str = ""
    param: str | None = None
    value: Any = None

    @property
    def same(self) -> bool:
        """Whether medvlp does what the official code does."""
        return not self.deviation


def table(elements: Sequence[Element]) -> str:
    """The elements as a Markdown table (element | official (source) | medvlp | same / deviation)."""
    lines = ["| element | official (file:line @ commit) | medvlp | same / deviation |", "|---|---|---|---|"]
    for e in elements:
        lines.append(f"| {e.name} | {e.official} ({e.source}) | {e.medvlp} | "
                     f"{'same' if e.same else 'deviation: ' + e.deviation} |")
    return "\n".join(lines)


def documented(elements: Callable[[], Sequence[Element]] | Sequence[Element]) -> Callable[[type[T]], type[T]]:
    """Class decorator: appends the fidelity :func:`table` to the class docstring and stores the elements
    as ``fidelity_elements``."""

    def wrap(cls: type[T]) -> type[T]:
        els = list(elements() if callable(elements) else elements)
        cls.fidelity_elements = tuple(els)  # type: ignore[attr-defined]
        doc = (cls.__doc__ or "").rstrip()
        cls.__doc__ = f"{doc}\n\n    Fidelity to the official code:\n\n" + "\n".join(
            "    " + ln for ln in table(els).splitlines()) + "\n"
        return cls

    return wrap


def fidelity(elements: Iterable[Element], params: Mapping[str, Any], extra: Iterable[str] = ()) -> str:
    """``official`` when every element is the same and no official parameter was changed by ``params``
    (and ``extra``, run-time deviations, is empty); else ``deviates: …`` naming them."""
    out = [e.name for e in elements if not e.same]
    for e in elements:
        if e.param is not None and e.same and e.param in params and differs(params[e.param], e.value):
            out.append(f"{e.param}={params[e.param]!r} (official {e.value!r})")
    out += list(extra)
    return "official" if not out else "deviates: " + "; ".join(dict.fromkeys(out))


def differs(a: Any, b: Any) -> bool:
    """Whether two settings differ (numbers compared as floats)."""
    try:
        return float(a) != float(b)
    except (TypeError, ValueError):
        return a != b
