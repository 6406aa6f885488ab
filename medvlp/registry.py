"""Registries for methods, datamodules and benchmark protocols.

Built-ins register with decorators (``@METHODS.register("clip")``). Third-party packages expose entry
points in the groups ``medvlp.methods``, ``medvlp.datamodules`` and ``medvlp.benchmarks``; these are
loaded lazily on the first lookup, never at ``import medvlp``. A full ``class_path``
(``my_pkg.module.MyClass``) also resolves without registration, but only to a class of the kind the
registry holds (a :class:`~medvlp.method.VLPMethod`, a ``LightningDataModule``, a
:class:`~medvlp.benchmarks.kit.protocol.Protocol`): the check runs after the import and before anything is
called, so a config or checkpoint cannot make medvlp call a function such as ``os.system``.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, TypeVar

from medvlp.legacy import current_module

log = logging.getLogger(__name__)
T = TypeVar("T")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class ClassPathError(ValueError):
    """A ``class_path`` that is malformed, missing, or names something other than the expected kind."""


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
        base: dotted path of the base class every component must subclass (resolved lazily).
    """

    def __init__(self, kind: str, group: str, builtin_module: str, base: str = "builtins.object") -> None:
        self.kind = kind
        self.group = group
        self.builtin_module = builtin_module
        self.base_path = base
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

    @property
    def base(self) -> type:
        """The class every component of this registry must subclass."""
        module_name, _, attr = self.base_path.rpartition(".")
        return getattr(importlib.import_module(module_name), attr)

    def _checked(self, name: str, obj: Any) -> Any:
        if not (inspect.isclass(obj) and issubclass(obj, self.base)):
            raise ClassPathError(f"{self.kind} {name!r} is {_describe(obj)}, not a subclass of {self.base_path}")
        return obj

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

        Both must be classes subclassing :attr:`base`; this is checked before the caller can call them.

        Raises:
            KeyError: naming the available components when nothing matches.
            ClassPathError: when the component is not a subclass of :attr:`base`.
        """
        self._ensure_loaded()
        if name in self._entries:
            return self._checked(name, self._entries[name].obj)
        if name in self._failed_plugins:
            raise KeyError(f"{self.kind} plugin {name!r} failed to load: {self._failed_plugins[name]}")
        if "." in name:
            return import_class_path(name, self.base, kind=self.kind)
        close = difflib.get_close_matches(name.lower(), [n.lower() for n in self.names()], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise KeyError(f"unknown {self.kind} {name!r}{hint}; available: {', '.join(self.names())}")

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


def import_class_path(path: str, expected: type | tuple[type, ...], kind: str | None = None) -> type:
    """Import ``package.module.Class`` and check that it is a class subclassing ``expected``.

    This is the only way a config or checkpoint names code. Importing runs the module's top-level code
    (as any Python import does); nothing from the module is *called* unless it is a class of the
    expected kind, so ``os.system`` or ``subprocess.Popen`` in place of a method, datamodule or encoder
    is refused before any call.

    Args:
        path: dotted ``module.Attribute`` path.
        expected: the base class (or classes) the attribute must subclass.
        kind: what the place expects, for the error message (default: the base class names).

    Raises:
        ClassPathError: naming the path when it is malformed, cannot be imported, or is not a subclass of
            ``expected``.
    """
    bases = expected if isinstance(expected, tuple) else (expected,)
    want = kind or " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
    if not isinstance(path, str) or not _DOTTED.match(path):
        raise ClassPathError(f"class_path {path!r} must be a dotted 'module.Class' path (expected a {want})")
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(current_module(module_name)), attr)
    except (ImportError, AttributeError) as exc:
        raise ClassPathError(f"cannot import class_path {path!r}: {exc}") from exc
    if not (inspect.isclass(obj) and issubclass(obj, bases)):
        names = ", ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
        raise ClassPathError(f"class_path {path!r} is {_describe(obj)}, not a subclass of {names}; "
                             f"only a {want} class is accepted here")
    return obj


def _describe(obj: Any) -> str:
    if inspect.isclass(obj):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__name__}"


METHODS: Registry[Any] = Registry("method", "medvlp.methods", "medvlp.methods", "medvlp.method.VLPMethod")
DATAMODULES: Registry[Any] = Registry("datamodule", "medvlp.datamodules", "medvlp.datamodules",
                                      "lightning.pytorch.core.datamodule.LightningDataModule")
BENCHMARKS: Registry[Any] = Registry("benchmark", "medvlp.benchmarks", "medvlp.benchmarks",
                                     "medvlp.benchmarks.kit.protocol.Protocol")

register_method = METHODS.register
register_datamodule = DATAMODULES.register
register_benchmark = BENCHMARKS.register


def build_datamodule(spec: Mapping[str, Any]) -> Any:
    """``{name: <registered name or class_path>, init_args: {...}}`` → datamodule.

    Raises:
        KeyError: the spec has no ``name``, or names no registered datamodule.
    """
    spec = dict(spec)
    if "name" not in spec:
        raise KeyError(f"datamodule spec needs a 'name' key, got {sorted(spec)}")
    return DATAMODULES.get(spec["name"])(**dict(spec.get("init_args") or {}))
