"""Human-readable help for registered components (``medvlp list method=asg``) and for what is packaged
(presets, suites): arguments with types and defaults, described from the Google-style docstrings."""
from __future__ import annotations

import inspect
import re
from importlib import resources
from typing import Any

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


def packaged_names(package: str) -> list[tuple[str, str]]:
    """``(name, first comment line)`` of every ``*.yaml`` shipped in ``package``."""
    out: list[tuple[str, str]] = []
    try:
        files = sorted(resources.files(package).iterdir(), key=lambda r: r.name)
    except (ModuleNotFoundError, FileNotFoundError):
        return out
    for ref in files:
        if ref.name.endswith(".yaml"):
            first = next((ln.lstrip("# ").strip() for ln in ref.read_text().splitlines() if ln.startswith("#")), "")
            out.append((ref.name[: -len(".yaml")], first))
    return out


def describe(kind: str, name: str) -> str:
    """Help text of one registered component: summary, source, and its arguments (type, default,
    packaged config default, description)."""
    from medvlp import registry

    if kind not in KINDS:
        raise KeyError(f"list: unknown kind {kind!r}; use method=NAME, data=NAME or protocol=NAME")
    reg = getattr(registry, KINDS[kind])
    cls = reg.get(name)
    source = next((e.source for e in reg.entries() if e.name == name), "class path")
    lines = [f"{reg.kind} {name}: {cls.__module__}.{cls.__qualname__}  [{source}]", f"  {summary(cls)}", ""]
    if KINDS[kind] == "BENCHMARKS":
        params = getattr(cls, "parameters", None)
        if not params:
            lines.append("  (this protocol declares no parameters)")
        for key, text in (params or {}).items():
            lines.append(f"  {key}: {text}")
        lines.append("  fractions, seeds: label fractions and seeds (protocols that use them)")
        return "\n".join(lines)
    from medvlp.config import method_defaults, packaged_yaml, to_container

    if KINDS[kind] == "METHODS":
        packaged = to_container(method_defaults(name))  # built-in YAML or a plugin's defaults_file
    else:
        packaged = to_container(packaged_yaml(_PACKAGED_DEFAULTS[KINDS[kind]], name)) if "." not in name else {}
    params, open_ = init_parameters(cls)
    hints = _hints(cls)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(docstring_args(klass))
    lines.append("  arguments (init_args):")
    for key, p in params.items():
        default = "required" if p.default is inspect.Parameter.empty else repr(p.default)
        tp = type_name(hints.get(key, p.annotation)) if (key in hints or p.annotation is not p.empty) else "any"
        cfg_default = f"; packaged default {packaged[key]!r}" if key in packaged else ""
        lines.append(f"    {key}: {tp} = {default}{cfg_default}")
        if docs.get(key):
            lines.append(f"        {docs[key]}")
    if open_:
        lines.append("    (further keyword arguments are passed on; see the class docstring)")
    return "\n".join(lines)


def list_all() -> str:
    """Every registered component with its source, plus packaged presets and suites."""
    from medvlp.registry import BENCHMARKS, DATAMODULES, METHODS

    out = []
    for title, reg in (("methods", METHODS), ("datamodules", DATAMODULES), ("benchmarks", BENCHMARKS)):
        out.append(f"{title}:")
        out += [f"  {e.name:<16} {e.source}" for e in reg.entries()]
    for title, package in (("presets", "medvlp.presets"), ("suites", "medvlp.benchmarks.suites")):
        out.append(f"{title}:")
        out += [f"  {n:<16} {first}" for n, first in packaged_names(package)]
    out.append("details: medvlp list method=NAME | data=NAME | protocol=NAME")
    return "\n".join(out)
