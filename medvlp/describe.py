"""Human-readable help for registered components (``medvlp list method=asg``) and for what is packaged
(presets, suites): arguments with types and defaults, described from the Google-style docstrings."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

from medvlp.validate import _hints, init_parameters, type_name

KINDS = {"method": "METHODS", "data": "DATAMODULES", "datamodule": "DATAMODULES", "protocol": "BENCHMARKS",
         "benchmark": "BENCHMARKS"}
_PACKAGED_DEFAULTS = {"METHODS": "medvlp.methods", "DATAMODULES": "medvlp.datamodules"}


def docstring_args(obj: Any) -> dict[str, str]:
    """``{name: description}`` from the ``Args:`` section of ``obj``'s docstring (continuation lines joined)."""
    doc = inspect.getdoc(obj) or ""
    out: dict[str, str] = {}
    in_args, current = False, None
    for line in doc.splitlines():
        if re.match(r"^(Args|Arguments|Parameters):\s*$", line):
            in_args, current = True, None
            continue
        if in_args and line and not line.startswith(" "):
            in_args = False  # next section
        if not in_args or not line.strip():
            continue
        m = re.match(r"^ {2,4}(\*{0,2}\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if m:
            current = m.group(1).lstrip("*")
            out[current] = m.group(2).strip()
        elif current:
            out[current] = f"{out[current]} {line.strip()}".strip()
    return out


def summary(obj: Any) -> str:
    """First paragraph of a docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def first_sentence(lines: list[str]) -> str:
    """The first sentence of a comment block (its lines joined), never cut mid-sentence."""
    text = " ".join(ln.strip() for ln in lines if ln.strip())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def packaged_names(package: str) -> list[tuple[str, str]]:
    """``(name, first sentence of the leading comment)`` of every ``*.yaml`` shipped in ``package``."""
    out: list[tuple[str, str]] = []
    try:
        files = sorted(resources.files(package).iterdir(), key=lambda r: r.name)
    except (ModuleNotFoundError, FileNotFoundError):
        return out
    for ref in files:
        if ref.name.endswith(".yaml"):
            comment: list[str] = []
            for ln in ref.read_text().splitlines():
                if ln.startswith("#"):
                    comment.append(ln.lstrip("#").strip())
                elif comment or ln.strip():
                    break  # the leading comment block ends at the first non-comment line
            out.append((ref.name[: -len(".yaml")], first_sentence(comment)))
    return out


@dataclass(frozen=True)
class Argument:
    """One constructor argument of a registered component, as ``medvlp list`` and the docs show it."""

    name: str
    type: str
    default: str
    packaged: str | None
    description: str


def component(kind: str, name: str) -> tuple[Any, str]:
    """``(class, source)`` of a registered component (or a class path).

    Raises:
        KeyError: for an unknown kind or name (with the registry's message).
    """
    from medvlp import registry  # lazy: medvlp list and the docs build import components only when asked

    if kind not in KINDS:
        raise KeyError(f"list: unknown kind {kind!r}; use method=NAME, data=NAME or protocol=NAME")
    reg = getattr(registry, KINDS[kind])
    cls = reg.get(name)
    source = next((e.source for e in reg.entries() if e.name == name), "class path")
    return cls, source


def arguments(kind: str, name: str) -> tuple[list[Argument], bool]:
    """The constructor arguments of a method or datamodule: type, default, packaged config default and
    description (from the Google-style docstrings of the class and its bases).

    Returns:
        ``(arguments, open)``: ``open`` is True when further keyword arguments are passed on.
    """
    cls, _ = component(kind, name)
    from medvlp.config import method_defaults, packaged_yaml, to_container  # lazy: medvlp list and the docs build import components only when asked

    if KINDS[kind] == "METHODS":
        packaged = to_container(method_defaults(name))  # built-in YAML or a plugin's defaults_file
    else:
        packaged = to_container(packaged_yaml(_PACKAGED_DEFAULTS[KINDS[kind]], name)) if "." not in name else {}
    return class_arguments(cls, packaged)


def class_arguments(cls: type, packaged: Mapping[str, Any] | None = None) -> tuple[list[Argument], bool]:
    """The constructor arguments of ``cls`` (its signature and the Google-style docstrings of it and its
    bases), each with its value in ``packaged`` (a packaged config) when there is one.

    Returns:
        ``(arguments, open)``: ``open`` is True when further keyword arguments are passed on.
    """
    packaged = packaged or {}
    params, open_ = init_parameters(cls)
    hints = _hints(cls)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(docstring_args(klass))
    out = []
    for key, p in params.items():
        default = "required" if p.default is inspect.Parameter.empty else repr(p.default)
        tp = type_name(hints.get(key, p.annotation)) if (key in hints or p.annotation is not p.empty) else "any"
        out.append(Argument(key, tp, default, repr(packaged[key]) if key in packaged else None, docs.get(key, "")))
    return out, open_


def protocol_parameters(name: str) -> dict[str, str]:
    """``{parameter: description}`` a registered protocol declares (its ``parameters`` attribute)."""
    cls, _ = component("protocol", name)
    return dict(getattr(cls, "parameters", None) or {})


def describe(kind: str, name: str) -> str:
    """Help text of one registered component: summary, source, and its arguments (type, default,
    packaged config default, description)."""
    cls, source = component(kind, name)
    from medvlp import registry  # lazy: medvlp list and the docs build import components only when asked

    reg = getattr(registry, KINDS[kind])
    lines = [f"{reg.kind} {name}: {cls.__module__}.{cls.__qualname__}  [{source}]", f"  {summary(cls)}", ""]
    if KINDS[kind] == "BENCHMARKS":
        params = protocol_parameters(name)
        if not params:
            lines.append("  (this protocol declares no parameters)")
        for key, text in params.items():
            lines.append(f"  {key}: {text}")
        lines.append("  fractions, seeds: label fractions and seeds (protocols that use them)")
        return "\n".join(lines)
    args, open_ = arguments(kind, name)
    lines.append("  arguments (init_args):")
    for a in args:
        cfg_default = f"; packaged default {a.packaged}" if a.packaged is not None else ""
        lines.append(f"    {a.name}: {a.type} = {a.default}{cfg_default}")
        if a.description:
            lines.append(f"        {a.description}")
    if open_:
        lines.append("    (further keyword arguments are passed on; see the class docstring)")
    return "\n".join(lines)


def list_all() -> str:
    """Every registered component with its source, plus packaged presets and suites (names aligned)."""
    from medvlp.registry import BENCHMARKS, DATAMODULES, METHODS  # lazy: medvlp list and the docs build import components only when asked

    groups: list[tuple[str, list[tuple[str, str]]]] = [
        (title, [(e.name, e.source) for e in reg.entries()])
        for title, reg in (("methods", METHODS), ("datamodules", DATAMODULES), ("benchmarks", BENCHMARKS))]
    groups += [(title, packaged_names(package))
               for title, package in (("presets", "medvlp.presets"), ("suites", "medvlp.benchmarks.suites"))]
    width = max((len(n) for _, rows in groups for n, _ in rows), default=0) + 2
    out = []
    for title, rows in groups:
        out.append(f"{title}:")
        out += [f"  {n:<{width}}{text}".rstrip() for n, text in rows]
    out.append("details: medvlp list method=NAME | data=NAME | protocol=NAME")
    return "\n".join(out)
