"""Compose a run configuration from defaults, packaged YAMLs, user files and dot-list overrides.

Precedence (later wins): built-in defaults < ``methods/<method>.yaml`` < ``datamodules/<data>.yaml`` <
the method's ``example_data`` (when no ``data`` or the example's datamodule is given) < ``presets/<preset>.yaml`` (its
``data_defaults.<datamodule>`` block applies only to that datamodule) < under ``preset=paper`` only, the method's
paper config ``methods/<method>.paper.yaml`` (same layout as a preset; every value cites its source, and it
wins over the generic paper preset) < ``-c FILE`` files < ``key=value`` overrides. Shorthands: ``method=NAME``,
``data=NAME``, ``preset=NAME``, ``suite=NAME``, ``logger=csv|tensorboard|wandb`` (``trainer.logger``).
The result is checked by :func:`medvlp.validate.check_config` (unknown keys, wrong types) before it is
returned: composing and checking is one pass, done once per run. Callers that add layers (a suite's
``pretrain`` block, a method entry's ``data``/``init_args``/``trainer``, its run folder) pass them as
``layers`` so they are checked in the same pass; :func:`is_checked` tells later steps (``pretrain``) that a
config came out of that pass unchanged, so they do not check it again.

Presets set defaults: a preset value that replaces a value of the method's own YAML or paper config is
not silent — every such override (and every user override of them) is logged as a warning naming the key,
both values and both sources (:func:`compose_with_overrides` returns them).
"""
from __future__ import annotations

import hashlib
import logging
import weakref
from typing import Any, Mapping, NamedTuple, Sequence

from omegaconf import DictConfig, OmegaConf

from medvlp import validate
from medvlp.config import check_preset, load_yaml, merge, method_defaults, packaged_yaml
from medvlp.registry import METHODS

DEFAULTS: dict[str, Any] = {
    "method": {"name": "clip", "init_args": {}},
    "data": {"name": "phantom", "init_args": {}},
    "preset": "demo",
    "trainer": {
        "max_steps": 100,
        "max_epochs": -1,
        "accelerator": "auto",
        "devices": 1,
        "strategy": "auto",
        "precision": "32-true",
        "log_every_n_steps": 10,
        "gradient_clip_val": None,
        "num_sanity_val_steps": 0,
        "val_check_interval": None,
        "check_val_every_n_epoch": 1,
        "enable_progress_bar": True,
        "deterministic": False,
    },
    "run": {
        "dir": None,
        "root": "runs",
        "name": None,
        "overwrite": False,
        "seed": 42,
        "resume": True,
        "checkpoint_every_n_steps": 50,
        "checkpoint_every_n_minutes": None,
        "checkpoint_every_n_epochs": None,
        "weights_only_resume": True,
        "lr_monitor": True,
    },
}
SHORTHANDS = {"method": "method.name", "data": "data.name", "logger": "trainer.logger"}
LOG = logging.getLogger(__name__)


class Override(NamedTuple):
    """A value of the method's own config replaced by a later layer."""

    key: str
    old: Any
    old_source: str
    new: Any
    new_source: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} ({self.old_source}) -> {self.new!r} ({self.new_source})"


def split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split CLI tokens into config files (``-c FILE``) and ``key=value`` overrides."""
    files, overrides = [], []
    it = iter(args)
    for tok in it:
        if tok in ("-c", "--config"):
            try:
                files.append(next(it))
            except StopIteration:
                raise ValueError(f"{tok} needs a file path") from None
        elif "=" in tok:
            key, value = tok.split("=", 1)
            overrides.append(f"{SHORTHANDS.get(key, key)}={value}")
        else:
            raise ValueError(f"unexpected argument {tok!r}: use key=value or -c FILE")
    return files, overrides


#: id(config) → (weak reference, digest of its content when it was checked)
_CHECKED: dict[int, tuple[weakref.ref, str]] = {}


def _digest(cfg: DictConfig) -> str:
    return hashlib.sha1(OmegaConf.to_yaml(cfg, resolve=False).encode()).hexdigest()


def mark_checked(cfg: DictConfig) -> DictConfig:
    """Record that ``cfg`` passed :func:`medvlp.validate.check_config` as it is now."""
    key = id(cfg)

    def forget(_: object) -> None:
        _CHECKED.pop(key, None)

    _CHECKED[key] = (weakref.ref(cfg, forget), _digest(cfg))
    return cfg


def is_checked(cfg: Any) -> bool:
    """Whether ``cfg`` came out of :func:`compose` (or :func:`derive`) and has not changed since."""
    entry = _CHECKED.get(id(cfg))
    return entry is not None and entry[0]() is cfg and isinstance(cfg, DictConfig) and entry[1] == _digest(cfg)


def derive(cfg: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """A copy of a checked ``cfg`` with run bookkeeping keys set (``run.dir``, ``run.seed``): values medvlp
    generates itself, of the type the defaults declare, so the copy stays checked without another pass.

    Raises:
        ValueError: for a key outside ``run.dir`` / ``run.seed`` / ``run.weights_only_resume``.
    """
    allowed = ("run.dir", "run.seed", "run.weights_only_resume")
    bad = [k for k in values if k not in allowed]
    if bad or not is_checked(cfg):
        raise ValueError(f"derive: only {allowed} of a composed config can be set without checking it again (got {bad})")
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    assert isinstance(out, DictConfig)
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return mark_checked(out)


def compose(args: Sequence[str], defaults: dict[str, Any] | None = None,
            layers: Sequence[tuple[str, Any]] = ()) -> DictConfig:
    """Build the full config for ``args`` (see module docstring for precedence), check it once, and log each
    override of a method-config value once.

    Args:
        args: ``-c FILE`` tokens and ``key=value`` overrides (with the ``method=``/``data=``/... shorthands).
        defaults: the built-in defaults (default :data:`DEFAULTS`).
        layers: ``(source, mapping)`` layers merged after ``args`` (a suite's blocks), in order.

    Raises:
        medvlp.validate.ConfigError: one line naming every bad key.
    """
    cfg, overrides = compose_with_overrides(args, defaults, layers)
    for o in overrides:
        LOG.warning("config override of the method's value: %s", o)
    return cfg


def compose_with_overrides(args: Sequence[str], defaults: dict[str, Any] | None = None,
                           layers: Sequence[tuple[str, Any]] = ()) -> tuple[DictConfig, list[Override]]:
    """:func:`compose` plus the list of method-config values that later layers replaced."""
    extra = list(layers)
    files, overrides = split_args(args)
    base = OmegaConf.create(defaults or DEFAULTS)
    loaded = [(f, load_yaml(f)) for f in files]
    later = [OmegaConf.create(layer or {}) for _, layer in extra]
    refuse_unsafe([(f"config file {f}", c) for f, c in loaded] + [(src, c) for (src, _), c in zip(extra, later)])
    user = merge(*[c for _, c in loaded], overrides=overrides) if (files or overrides) else OmegaConf.create({})
    method = OmegaConf.select(user, "method.name", default=base.method.name)
    data = next((OmegaConf.select(c, "data.name") for c in reversed(later) if OmegaConf.select(c, "data.name")),
                OmegaConf.select(user, "data.name", default=None))
    example = dict(getattr(METHODS.get(str(method)), "example_data", None) or {"name": base.data.name})
    example_layer = OmegaConf.create({})
    if data is None or data == example["name"]:
        # the method's own example data (e.g. GTGM: CT+MRI+EM with captions, UniMedI: X-ray + CT) is the
        # default, also under user overrides of the same datamodule (data=mixed data.init_args.batch_size=8)
        data = example["name"]
        example_layer = OmegaConf.create({"data": {"name": data, "init_args": example.get("init_args", {})}})
    preset = OmegaConf.select(user, "preset", default=base.preset)
    stack: list[tuple[str, DictConfig, bool]] = [("defaults", base, False)]  # (source, layer, method-owned)
    stack.append((f"methods/{method}.yaml",  # a plugin's own defaults_file too
                   OmegaConf.create({"method": {"init_args": method_defaults(str(method))}}), True))
    if "." not in str(data):
        stack.append((f"datamodules/{data}.yaml",
                       OmegaConf.create({"data": {"init_args": packaged_yaml("medvlp.datamodules", data)}}), False))
    stack.append((f"{method}.example_data", example_layer, False))
    if preset:
        p = packaged_yaml("medvlp.presets", preset)
        if not p:
            check_preset(str(preset))
        stack += _preset_layers(f"presets/{preset}.yaml", p, str(data), False)
        if preset == "paper" and "." not in str(method):
            paper = packaged_yaml("medvlp.methods", f"{method}.paper")
            if paper:
                stack += _preset_layers(f"methods/{method}.paper.yaml", paper, str(data), True)
    stack.append(("command line / -c files", user, False))
    stack += [(source, layer, False) for (source, _), layer in zip(extra, later)]
    cfg = _merge_layers([layer for _, layer, _ in stack])
    check_shared_children(cfg, user)
    validate.check_config(cfg, defaults or DEFAULTS)  # unknown keys / wrong types: one ConfigError before any work
    return mark_checked(cfg), _overrides(stack)


#: safety switches only a ``key=value`` on the command line may turn off (a ``-c`` file or a suite cannot)
COMMAND_LINE_ONLY = ("run.weights_only_resume",)


def refuse_unsafe(layers: Sequence[tuple[str, DictConfig]]) -> None:
    """Refuse a layer other than the command line's ``key=value`` overrides that sets a
    :data:`COMMAND_LINE_ONLY` key to anything but ``true``.

    Raises:
        ValueError: one line naming the layer (file or suite block) and the key.
    """
    for source, layer in layers:
        plain = OmegaConf.to_container(layer, resolve=False)
        for key in COMMAND_LINE_ONLY:
            raw: Any = plain
            for part in key.split("."):  # the raw value: an interpolation counts as not ``true``
                raw = raw.get(part) if isinstance(raw, dict) else None
            if raw is not None and raw is not True:
                raise ValueError(f"{source} sets {key}={raw!r}: refused; only the command line can turn weights-only "
                                 f"resume off ({key}=false)")


def check_shared_children(cfg: DictConfig, user: DictConfig) -> None:
    """Refuse a ``data.init_args.<key>`` the user gave for a datamodule with children (``mixed``: shared args
    go to every child) when a child sets its own, different ``<key>``: the child's value would win and the
    user's be ignored (``method=gtgm data.init_args.modality=mri`` trained on CT, MRI and EM). Shared values
    from presets and suites keep giving way to the children's.

    Raises:
        ValueError: naming the key, the children and the two ways to say what was meant.
    """
    children = OmegaConf.select(cfg, "data.init_args.datamodules")
    given = OmegaConf.select(user, "data.init_args")
    if not isinstance(children, DictConfig) or not isinstance(given, DictConfig):
        return
    for key in given:
        if key == "datamodules":
            continue
        value = given[key]
        own = {str(c): OmegaConf.select(spec, f"init_args.{key}") for c, spec in children.items()
               if OmegaConf.select(spec, f"init_args.{key}") is not None}
        clash = {c: v for c, v in own.items() if v != value}
        if clash:
            raise ValueError(
                f"data.init_args.{key}={value!r} goes to every child of data={cfg.data.name}, but children "
                f"{sorted(clash)} set their own {key} ({dict(sorted(clash.items()))}), which would win: set it per "
                f"child (data.init_args.datamodules.<child>.init_args.{key}=...) or train on one datamodule "
                f"(e.g. data=phantom data.init_args.{key}={value})")


def _merge_layers(layers: Sequence[DictConfig]) -> DictConfig:
    """Merge left to right; a mapping that names a different ``class_path`` than the one merged so far
    replaces that node instead of merging into it (ViT init args must not leak into a Swin encoder)."""
    out = OmegaConf.create({})
    for layer in layers:
        for key in _class_path_nodes(layer):
            old = OmegaConf.select(out, key)
            if isinstance(old, DictConfig) and old.get("class_path") != OmegaConf.select(layer, f"{key}.class_path"):
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(out, parent) if parent else out
                node.pop(leaf)
        out = merge(out, layer)
    return out


def _class_path_nodes(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the mappings in ``cfg`` that contain a ``class_path``."""
    if not isinstance(cfg, DictConfig):
        return []
    found = [prefix] if prefix and "class_path" in cfg else []
    for k in cfg.keys():
        found += _class_path_nodes(cfg._get_node(k), f"{prefix}.{k}" if prefix else str(k))
    return found


def _preset_layers(source: str, cfg: DictConfig, data: str, owned: bool) -> list[tuple[str, DictConfig, bool]]:
    """A preset-style config and its ``data_defaults.<data>`` block (applied only to that datamodule)."""
    per_data = cfg.pop("data_defaults", None) or {}
    out = [(source, cfg, owned)]
    if data in per_data:
        out.append((f"{source}:data_defaults.{data}", OmegaConf.create({"data": {"init_args": per_data[data]}}), owned))
    return out


def _leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key → value for every non-mapping leaf of ``cfg`` (lists are leaves)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _overrides(layers: Sequence[tuple[str, DictConfig, bool]]) -> list[Override]:
    """Values set by a method-owned layer and then changed by a later layer that is not method-owned."""
    owner: dict[str, tuple[str, Any]] = {}
    found: list[Override] = []
    for source, layer, owned in layers:
        for key, value in _leaves(layer).items():
            if owned:
                owner[key] = (source, value)
            elif key in owner and owner[key][1] != value:
                found.append(Override(key, owner[key][1], owner[key][0], value, source))
                owner.pop(key)
    return found
