"""OmegaConf configuration: loading, merging with dot-list overrides, and safe instantiation.

Configs are data. The only way a config names code is an explicit ``class_path`` (optionally with
``init_args``), resolved by :func:`medvlp.registry.import_class_path`. OmegaConf resolvers that could
execute code are never registered.
"""
from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from medvlp.registry import import_class_path


def load_yaml(path: str | Path) -> DictConfig:
    """Load one YAML file as a DictConfig.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: if the file does not hold a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    cfg = OmegaConf.load(p)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"config {p} must hold a mapping at the top level")
    return cfg


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
    import inspect

    from medvlp.registry import METHODS

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
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
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


_ENV_INTERPOLATION = re.compile(r"(?<!\\)\$\{(oc\.env|env):")


def persistable(cfg: Any) -> Any:
    """Plain containers for writing to disk: interpolations resolved, except environment reads.

    Every ``${oc.env:NAME}`` stays the literal text ``${oc.env:NAME}``, also where another key
    interpolates it, so a secret passed through the environment never reaches ``config.yaml``, a run
    folder name or a results row.
    """
    if not isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.create(dict(cfg) if isinstance(cfg, Mapping) else cfg) if isinstance(cfg, (Mapping, list)) else cfg
        if not isinstance(cfg, (DictConfig, ListConfig)):
            return cfg
    raw = OmegaConf.to_container(cfg, resolve=False)
    return OmegaConf.to_container(OmegaConf.create(_escape_env(raw)), resolve=True)


def _escape_env(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _escape_env(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_escape_env(v) for v in x]
    if isinstance(x, str):
        return _ENV_INTERPOLATION.sub(lambda m: "\\${" + m.group(1) + ":", x)
    return x


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write a config as YAML atomically, with environment reads kept unresolved (:func:`persistable`)."""
    from medvlp.io import atomic_write_text

    return atomic_write_text(Path(path), OmegaConf.to_yaml(OmegaConf.create(persistable(cfg))))
