"""OmegaConf configuration: loading, merging with dot-list overrides, and safe instantiation.

Configs are data. The only way a config names code is an explicit ``class_path`` (optionally with
``init_args``), resolved by :func:`medvlp.registry.import_class_path`. OmegaConf resolvers that could
execute code are never registered.
"""
from __future__ import annotations

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
    if not ref.is_file():
        return OmegaConf.create({})
    return OmegaConf.create(ref.read_text())


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


def instantiate(spec: Mapping[str, Any] | DictConfig, **extra: Any) -> Any:
    """Build an object from ``{class_path: ..., init_args: {...}}``.

    Args:
        spec: mapping with ``class_path`` and optional ``init_args``.
        **extra: keyword arguments that override ``init_args``.
    """
    spec = to_container(spec)
    if "class_path" not in spec:
        raise KeyError(f"instantiate needs a 'class_path' key, got keys {sorted(spec)}")
    cls = import_class_path(spec["class_path"])
    kwargs = dict(spec.get("init_args") or {})
    kwargs.update(extra)
    return cls(**kwargs)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write a resolved config as YAML atomically."""
    from medvlp.io import atomic_write_text

    return atomic_write_text(Path(path), OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
