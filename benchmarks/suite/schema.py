"""A benchmark suite as data: loading it (packaged name or YAML path, with overrides) and checking its keys.

A suite's method entries are full run configs; they are composed and validated by
:func:`medvlp.compose.compose` (once per entry, by the runner's plan). This module checks what only a suite
has: its top-level keys, each method entry's keys, the datasets and every protocol entry's parameters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from medvlp.benchmarks.kit.protocol import RUNNER_KEYS, split_protocol_entry
from medvlp.config import load_yaml, merge, packaged_yaml, to_container
from medvlp.paths import name_problem
from medvlp.validate import _keys, _resolve, check_data, raise_if, unknown_key
from medvlp.describe import packaged_names
from medvlp.checks import did_you_mean
from medvlp.registry import BENCHMARKS

SUITE_KEYS = ("name", "preset", "pretrain", "methods", "datasets", "protocols", "output", "seed", "pretrain_seeds",
              "experiment", "launcher")
SUITE_METHOD_KEYS = ("method", "pretrain", "ckpt", "allow_class_path", "preset", "data", "overrides", "init_args",
                     "trainer", "pretrain_data", "pretrain_seeds", "auto_label", "protocols")
#: the packaged suites' package (``benchmarks/suites/<name>.yaml``)
SUITES_PACKAGE = "medvlp.benchmarks.suites"


def load_suite(name_or_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a packaged suite by name or a YAML path, applying dot-list overrides.

    Raises:
        FileNotFoundError: no packaged suite or file of that name (with the nearest packaged name).
        ValueError: the suite lacks ``methods``, ``datasets`` or ``protocols``.
    """
    p = Path(name_or_path)
    cfg = load_yaml(p) if p.suffix in (".yaml", ".yml") or p.is_file() else packaged_yaml(SUITES_PACKAGE, name_or_path)
    if not cfg:

        names = [n for n, _ in packaged_names(SUITES_PACKAGE)]
        raise FileNotFoundError(f"unknown suite {name_or_path!r}{did_you_mean(str(name_or_path), names)} "
                                f"(no packaged suite or file of that name; packaged: {', '.join(names)})")
    cfg = merge(cfg, overrides=overrides)
    suite = to_container(cfg)
    for key in ("methods", "datasets", "protocols"):
        if not suite.get(key):
            raise ValueError(f"suite {name_or_path!r} needs a non-empty {key!r} mapping")
    suite.setdefault("name", p.stem if p.suffix else name_or_path)
    suite.setdefault("output", f"results/{suite['name']}")
    return suite


def check_protocol(key: str, params: Any, errors: list[str], where: str = "protocols") -> None:
    """Check one suite protocol entry: the protocol exists and knows every parameter given
    (:meth:`~medvlp.benchmarks.kit.protocol.Protocol.unknown_parameters`, the check ``params()`` runs too)."""

    name, _, own = split_protocol_entry(key, params)
    cls = _resolve(BENCHMARKS, name, f"{where}.{key}" + (".protocol" if "protocol" in (params or {}) else ""), errors)
    if cls is None:
        return
    known = cls.known_parameters()
    for k in cls.unknown_parameters(own):
        errors.append(unknown_key(f"{where}.{key}", str(k), set(known or ()) | set(RUNNER_KEYS)))


#: suite mappings whose keys become folder or file names (runs/<label>, figures per dataset, protocol keys)
PATH_NAME_KEYS = {"methods": "method label", "datasets": "dataset name", "protocols": "protocol key"}


def check_path_names(suite: Mapping[str, Any], errors: list[str]) -> None:
    """Method labels, dataset names and protocol keys are path components: each must pass
    :func:`medvlp.paths.name_problem` (``[A-Za-z0-9._-]``, no leading dot, not over-long)."""
    for section, what in PATH_NAME_KEYS.items():
        for name in suite.get(section) or {}:
            problem = name_problem(name)
            if problem:
                errors.append(f"{section}: {what} {str(name)[:60]!r} {problem}")


def check_suite(suite: Mapping[str, Any]) -> None:
    """Validate a loaded suite's own keys: top level, method entries, datasets and protocol parameters.

    The method entries' run configs are validated when they are composed (:func:`medvlp.compose.compose`).

    Raises:
        ConfigError: one line listing every problem.
    """
    errors: list[str] = []
    _keys(suite, SUITE_KEYS, "suite", errors)
    check_path_names(suite, errors)
    for label, entry in (suite.get("methods") or {}).items():
        _keys(entry or {}, SUITE_METHOD_KEYS, f"methods.{label}", errors)
        unknown = set((entry or {}).get("protocols") or ()) - set(suite.get("protocols") or {})
        if unknown:
            errors.append(f"methods.{label}.protocols: {sorted(unknown)} are not protocol keys of the suite "
                          f"({sorted(suite.get('protocols') or {})})")
    for name, spec in (suite.get("datasets") or {}).items():
        check_data(spec, errors, f"datasets.{name}")
    for key, params in (suite.get("protocols") or {}).items():
        check_protocol(key, params, errors)
    raise_if(errors)
