"""OmegaConf configuration: loading, merging with dot-list overrides, and safe instantiation.

Configs are data. The only way a config names code is an explicit ``class_path`` (optionally with
``init_args``), resolved by :func:`medvlp.registry.import_class_path`. OmegaConf resolvers that could
execute code are never registered.
"""
from __future__ import annotations

import inspect
import difflib
import re
import secrets
import threading
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml  # type: ignore[import-untyped]
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medvlp.registry import import_class_path
from omegaconf import grammar_parser
from medvlp.registry import METHODS
from omegaconf.basecontainer import BaseContainer


def load_yaml(path: str | Path) -> DictConfig:
    """Load one YAML file as a DictConfig.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: if the file does not hold a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        cfg = OmegaConf.load(p)
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not a plain YAML config: {_yaml_problem(exc)} (YAML is loaded as data only; "
                         f"tags such as !!python/... are refused)") from None
    except OmegaConfBaseException as exc:
        raise ValueError(f"{p}: {_one_line(exc)}") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"config {p} must hold a mapping at the top level")
    check_interpolations(cfg, str(p))
    return cfg


def _yaml_problem(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("full_key:")[0].split()) or type(exc).__name__


#: ``${name:...}`` resolver calls in a string (the name is checked against the registered resolvers)
_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:")


def check_interpolations(cfg: Any, source: str) -> None:
    """Check every string of ``cfg`` that holds an interpolation, before anything resolves it: the
    interpolation must parse, and every resolver it calls must be registered (medvlp registers none that
    runs code, so ``${python:...}`` is refused here).

    Raises:
        ValueError: one line naming ``source``, the key, the value and the problem.
    """

    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    for key, value in _string_leaves(raw):
        if "${" not in value:
            continue
        shown = value if len(value) <= 80 else value[:77] + "..."
        try:
            grammar_parser.parse(value)
        except OmegaConfBaseException as exc:
            raise ValueError(f"{source}: {key}={shown!r} is not a valid interpolation ({_one_line(exc)})") from None
        unknown = [n for n in _RESOLVER_CALL.findall(value) if not OmegaConf.has_resolver(n)]
        if unknown:
            raise ValueError(f"{source}: {key}={shown!r} calls the unknown resolver {unknown[0]!r} (registered: "
                             f"oc.env, oc.decode, oc.create, oc.select, ...; none runs code)")


def _string_leaves(x: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _string_leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _string_leaves(v, f"{prefix}[{i}]")
    elif isinstance(x, str):
        yield prefix, x


def packaged_yaml(package: str, name: str) -> DictConfig:
    """Load ``<name>.yaml`` shipped inside ``package`` (e.g. a method's defaults)."""
    ref = resources.files(package).joinpath(f"{name}.yaml")
    cfg = OmegaConf.create(ref.read_text()) if ref.is_file() else OmegaConf.create({})
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{package}/{name}.yaml must hold a mapping at the top level")
    return cfg


def packaged_preset_names() -> list[str]:
    """Names of the packaged presets (``medvlp/presets/*.yaml``), sorted."""
    return sorted(r.name[: -len(".yaml")] for r in resources.files("medvlp.presets").iterdir()
                  if r.name.endswith(".yaml"))


def check_preset(name: str) -> None:
    """Raise when ``name`` is not a packaged preset.

    Raises:
        FileNotFoundError: naming the nearest preset and every packaged one.
    """
    names = packaged_preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise FileNotFoundError(f"unknown preset {name!r}{hint} (packaged presets: {', '.join(names)})")


def method_defaults(name: str) -> DictConfig:
    """Default ``init_args`` of a method: the packaged ``methods/<name>.yaml`` of a built-in, else the YAML
    file a plugin class names in its ``defaults_file`` class attribute (a path relative to the class's
    module, shipped as package data), else empty."""
    cfg = packaged_yaml("medvlp.methods", name) if "." not in name else OmegaConf.create({})
    if cfg:
        return cfg

    try:
        cls = METHODS.get(name)
    except (KeyError, ImportError, ValueError):
        return OmegaConf.create({})  # reported by validation with a suggestion
    rel = getattr(cls, "defaults_file", None)
    if not rel:
        return OmegaConf.create({})
    return load_yaml(Path(inspect.getfile(cls)).parent / rel)


def merge(*cfgs: Mapping[str, Any] | DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge configs left to right, then apply ``key.sub=value`` dot-list overrides."""
    parts = [c if isinstance(c, DictConfig) else OmegaConf.create(dict(c)) for c in cfgs]
    merged = OmegaConf.merge(*parts) if parts else OmegaConf.create({})
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        for o in overrides:
            try:
                layer = OmegaConf.from_dotlist([o])
            except yaml.YAMLError as exc:
                raise ValueError(f"override {o!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
            except OmegaConfBaseException as exc:
                raise ValueError(f"override {o!r}: {_one_line(exc)}") from None
            check_interpolations(layer, "command-line override")
            merged = OmegaConf.merge(merged, layer)
    assert isinstance(merged, DictConfig)
    return merged


def to_container(cfg: Any) -> Any:
    """Plain Python containers (dict/list/scalars) from an OmegaConf node, resolving interpolations."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def instantiate(spec: Mapping[str, Any] | DictConfig, *, expected: type | tuple[type, ...], **extra: Any) -> Any:
    """Build an object from ``{class_path: ..., init_args: {...}}``.

    Args:
        spec: mapping with ``class_path`` and optional ``init_args``.
        expected: base class (or classes) that ``class_path`` must subclass; checked before the call.
        **extra: keyword arguments that override ``init_args``.

    Raises:
        medvlp.registry.ClassPathError: when ``class_path`` is not a subclass of ``expected``.
    """
    spec = to_container(spec)
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise KeyError(f"instantiate needs a mapping with a 'class_path' key, got {spec!r}")
    cls = import_class_path(spec["class_path"], expected)
    kwargs = dict(spec.get("init_args") or {})
    kwargs.update(extra)
    return cls(**kwargs)


#: resolvers that read the process environment (``env`` is OmegaConf's legacy name)
ENV_RESOLVERS = ("oc.env", "env")
_ENV_INTERPOLATION = re.compile(r"\$\{\s*(?:oc\.env|env)\s*:")
_SWAP_LOCK = threading.Lock()


def persistable(cfg: Any) -> Any:
    """Plain containers for writing to disk: interpolations resolved, except environment reads.

    The config is resolved with the environment resolvers (:data:`ENV_RESOLVERS`) replaced by a stand-in
    that returns a placeholder and never reads the environment. A value that reads the environment keeps its
    raw text (``${oc.env:NAME}``, ``${oc.decode:${oc.env:NAME}}``, ...); where a placeholder reached another
    key through an interpolation it becomes the literal text ``${oc.env:NAME}`` (``${oc.env:NAME,DEFAULT}``). So an environment value cannot reach
    ``config.yaml``, a run folder name, saved hyperparameters or a results row by any route: directly, where
    another key interpolates it, or through ``oc.decode`` / ``oc.create`` / ``oc.select``.
    """
    if not isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.create(dict(cfg) if isinstance(cfg, Mapping) else cfg) if isinstance(cfg, (Mapping, list)) else cfg
        if not isinstance(cfg, (DictConfig, ListConfig)):
            return cfg
    copy: Any = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    nonce = secrets.token_hex(6)
    texts: list[str] = []

    def stand_in(key: Any, default: Any = _NO_DEFAULT) -> str:
        texts.append(f"${{oc.env:{key}}}" if default is _NO_DEFAULT else f"${{oc.env:{key},{_literal(default)}}}")
        return f"medvlpenv{nonce}x{len(texts) - 1}x"

    with _env_resolvers_replaced(stand_in):
        plain = OmegaConf.to_container(copy, resolve=True)
    pattern = re.compile(rf"medvlpenv{nonce}x(\d+)x")
    return _restore(plain, OmegaConf.to_container(copy, resolve=False), pattern, texts)


def _restore(value: Any, raw: Any, pattern: re.Pattern, texts: list[str]) -> Any:
    """Undo the stand-in: a value that reads the environment itself keeps its raw text (``${oc.decode:
    ${oc.env:N}}`` stays that); one that got an environment value through another key gets ``${oc.env:NAME}``
    in place of it."""
    if isinstance(raw, str) and _ENV_INTERPOLATION.search(raw) and _mentions(value, pattern):
        return raw
    if isinstance(value, dict) and isinstance(raw, dict):
        return {(pattern.sub(lambda m: texts[int(m.group(1))], k) if isinstance(k, str) else k):
                _restore(v, raw.get(k), pattern, texts) for k, v in value.items()}
    if isinstance(value, list) and isinstance(raw, list) and len(raw) == len(value):
        return [_restore(v, r, pattern, texts) for v, r in zip(value, raw)]
    return _map_strings(value, lambda t: pattern.sub(lambda m: texts[int(m.group(1))], t))


def _mentions(value: Any, pattern: re.Pattern) -> bool:
    if isinstance(value, dict):
        return any(_mentions(k, pattern) or _mentions(v, pattern) for k, v in value.items())
    if isinstance(value, list):
        return any(_mentions(v, pattern) for v in value)
    return isinstance(value, str) and bool(pattern.search(value))


_NO_DEFAULT = object()


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_./-]*", text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@contextmanager
def _env_resolvers_replaced(fn: Any) -> Iterator[None]:
    """Within the block, every :data:`ENV_RESOLVERS` resolver is ``fn`` (restored afterwards)."""

    with _SWAP_LOCK:
        saved = {name: BaseContainer._resolvers[name] for name in ENV_RESOLVERS if name in BaseContainer._resolvers}
        try:
            register = getattr(OmegaConf, "register_resolver", None)
            modern = register is not None and "replace" in inspect.signature(register).parameters
            for name in ENV_RESOLVERS:
                if modern:
                    register(name, fn, replace=True, annotation_validation="off")  # type: ignore[misc]
                else:  # OmegaConf releases whose register_resolver is the legacy one (or absent)
                    OmegaConf.register_new_resolver(name, fn, replace=True)
            yield
        finally:
            for name in ENV_RESOLVERS:
                if name in saved:
                    BaseContainer._resolvers[name] = saved[name]
                else:
                    BaseContainer._resolvers.pop(name, None)


def _map_strings(x: Any, fn: Any) -> Any:
    if isinstance(x, dict):
        return {(fn(k) if isinstance(k, str) else k): _map_strings(v, fn) for k, v in x.items()}
    if isinstance(x, list):
        return [_map_strings(v, fn) for v in x]
    return fn(x) if isinstance(x, str) else x


def reads_environment(value: Any) -> bool:
    """Whether a raw (unresolved) config value or container contains an environment read."""
    if isinstance(value, Mapping):
        return any(reads_environment(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(reads_environment(v) for v in value)
    return isinstance(value, str) and bool(_ENV_INTERPOLATION.search(value))


def resolve_environment(value: Any) -> Any:
    """``value`` with each string holding an environment read resolved on its own (no other key can be
    referenced); everything else as is. Used for hyperparameters stored as ``${oc.env:NAME}``."""
    if isinstance(value, Mapping):
        return {k: resolve_environment(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_environment(v) for v in value]
    if isinstance(value, str) and _ENV_INTERPOLATION.search(value):
        resolved: Any = OmegaConf.to_container(OmegaConf.create({"v": value}), resolve=True)
        return resolved["v"]
    return value


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write a config as YAML atomically, with environment reads kept unresolved (:func:`persistable`)."""
    from medvlp.io import atomic_write_text  # lazy: medvlp.io imports torch; config stays light for the CLI's early checks

    return atomic_write_text(Path(path), OmegaConf.to_yaml(OmegaConf.create(persistable(cfg))))
