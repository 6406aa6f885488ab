"""Compose a run configuration from defaults, packaged YAMLs, user files and dot-list overrides.

Precedence (later wins): built-in defaults < ``methods/<method>.yaml`` < ``datamodules/<data>.yaml`` <
the method's ``example_data`` (when no ``data`` or the example's datamodule is given) < ``presets/<preset>.yaml`` (its
``data_defaults.<datamodule>`` block applies only to that datamodule) < ``-c FILE`` files < ``key=value``
overrides. Shorthands: ``method=NAME``,
``data=NAME``, ``preset=NAME``, ``suite=NAME``.
"""
from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from medvlp.config import load_yaml, merge, packaged_yaml

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
        "seed": 42,
        "resume": True,
        "checkpoint_every_n_steps": 50,
        "weights_only_resume": True,
    },
}
SHORTHANDS = {"method": "method.name", "data": "data.name"}


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


def compose(args: Sequence[str], defaults: dict[str, Any] | None = None) -> DictConfig:
    """Build the full config for ``args`` (see module docstring for precedence)."""
    files, overrides = split_args(args)
    base = OmegaConf.create(defaults or DEFAULTS)
    user = merge(*[load_yaml(f) for f in files], overrides=overrides) if (files or overrides) else OmegaConf.create({})
    method = OmegaConf.select(user, "method.name", default=base.method.name)
    data = OmegaConf.select(user, "data.name", default=None)
    from medvlp.registry import METHODS

    example = dict(getattr(METHODS.get(str(method)), "example_data", None) or {"name": base.data.name})
    example_layer = OmegaConf.create({})
    if data is None or data == example["name"]:
        # the method's own example data (e.g. GTGM: CT+MRI+EM with captions, UniMedI: X-ray + CT) is the
        # default, also under user overrides of the same datamodule (data=mixed data.init_args.batch_size=8)
        data = example["name"]
        example_layer = OmegaConf.create({"data": {"name": data, "init_args": example.get("init_args", {})}})
    preset = OmegaConf.select(user, "preset", default=base.preset)
    layers = [base]
    if "." not in str(method):
        layers.append(OmegaConf.create({"method": {"init_args": packaged_yaml("medvlp.methods", method)}}))
    if "." not in str(data):
        layers.append(OmegaConf.create({"data": {"init_args": packaged_yaml("medvlp.datamodules", data)}}))
    layers.append(example_layer)
    if preset:
        p = packaged_yaml("medvlp.presets", preset)
        if not p:
            raise FileNotFoundError(f"unknown preset {preset!r} (packaged presets: demo, tiny, paper)")
        per_data = p.pop("data_defaults", None) or {}
        layers.append(p)
        if data in per_data:  # datamodule-specific preset keys (e.g. phantom sizes) only for that datamodule
            layers.append(OmegaConf.create({"data": {"init_args": per_data[data]}}))
    layers.append(user)
    return merge(*layers)
