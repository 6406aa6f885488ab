"""Registries for methods, datamodules and benchmark protocols.

Built-ins register with decorators (``@METHODS.register("clip")``). Third-party packages expose entry
points in the groups ``medvlp.methods``, ``medvlp.datamodules`` and ``medvlp.benchmarks``; these are
loaded lazily on the first lookup, never at ``import medvlp``. A full ``class_path``
(``my_pkg.module.MyClass``) also resolves without registration.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component and where it came from."""

    name: str
    obj: T
    source: str


class Registry(Generic[T]):
    """A name → component map fed by decorators and entry points.

    Args:
        kind: human-readable kind, e.g. ``"method"``.
        group: entry-point group scanned for third-party plugins.
        builtin_module: module imported on first lookup so that built-in decorators run.
    """

    def __init__(self, kind: str, group: str, builtin_module: str) -> None:
        self.kind = kind
        self.group = group
        self.builtin_module = builtin_module
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False
        self._failed_plugins: dict[str, str] = {}

    def register(self, name: str, source: str | None = None) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``.

        Raises:
            KeyError: if ``name`` is already registered by another object.
        """

        def decorator(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing.obj is not obj:
                raise KeyError(f"duplicate {self.kind} {name!r} (already from {existing.source})")
            origin = source or f"builtin ({getattr(obj, '__module__', '?')})"
            self._entries[name] = Entry(name, obj, origin)
            return obj

        return decorator

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self.builtin_module)
        for ep in importlib.metadata.entry_points(group=self.group):
            if ep.name in self._entries:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break unrelated commands
                self._failed_plugins[ep.name] = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"medvlp {self.kind} plugin {ep.name!r} failed to load: {exc}")
                continue
            dist = getattr(ep, "dist", None)
            src = f"plugin {dist.name if dist is not None else '?'} ({ep.value})"
            self.register(ep.name, source=src)(obj)

    def reload(self) -> None:
        """Re-scan entry points (after installing a plugin in the same process)."""
        self._loaded = False
        self._failed_plugins.clear()
        self._ensure_loaded()

    def get(self, name: str) -> T:
        """Return the component registered as ``name``, or import it if ``name`` is a class path.

        Raises:
            KeyError: naming the available components when nothing matches.
        """
        self._ensure_loaded()
        if name in self._entries:
            return self._entries[name].obj
        if name in self._failed_plugins:
            raise KeyError(f"{self.kind} plugin {name!r} failed to load: {self._failed_plugins[name]}")
        if "." in name:
            return import_class_path(name)
        raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Sorted registered names."""
        self._ensure_loaded()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        """All entries, sorted by name."""
        self._ensure_loaded()
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._entries


def import_class_path(path: str) -> Any:
    """Import ``package.module.Attr``; the only way a config can name code.

    Raises:
        ImportError: with the path in the message when the module or attribute is missing.
    """
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"class_path {path!r} must be 'module.Attribute'")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import class_path {path!r}: {exc}") from exc


METHODS: Registry[Any] = Registry("method", "medvlp.methods", "medvlp.methods")
DATAMODULES: Registry[Any] = Registry("datamodule", "medvlp.datamodules", "medvlp.datamodules")
BENCHMARKS: Registry[Any] = Registry("benchmark", "medvlp.benchmarks", "medvlp.benchmarks")

register_method = METHODS.register
register_datamodule = DATAMODULES.register
register_benchmark = BENCHMARKS.register
