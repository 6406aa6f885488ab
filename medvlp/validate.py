"""Check a composed run config before any work starts (suites: :mod:`medvlp.benchmarks.suite.schema`).

Every key is checked against what reads it: ``run.*`` and top-level keys against the built-in defaults,
``trainer.*`` against :class:`lightning.Trainer`'s signature, ``method.init_args`` / ``data.init_args``
against the class signatures (following ``**kwargs`` up the MRO), encoder and optimizer blocks against
their classes, ``trainer.logger|callbacks|plugins`` specs against their classes, and protocol parameters
against each protocol's declared ``parameters``. Unknown keys get the nearest valid key as a suggestion
("did you mean run.seed?"); values whose type contradicts the annotation name the key, the value and the
expected type. All problems are reported together in one line by :class:`ConfigError`.
"""
from __future__ import annotations

import collections.abc as cabc
import inspect
import typing
from typing import Any, Iterable, Mapping

from medvlp.checks import did_you_mean, unknown_key  # noqa: F401  (part of this module's API)
from medvlp.config import to_container
from medvlp.registry import DATAMODULES, METHODS, import_class_path

#: logger shorthands accepted by ``trainer.logger`` (see :func:`medvlp.train.build_loggers`)
LOGGER_SHORTHANDS = ("csv", "tensorboard", "wandb")
#: Trainer arguments medvlp builds itself from ``{class_path, init_args}`` specs
SPEC_TRAINER_KEYS = ("logger", "callbacks", "plugins")
def trainer_plugin_bases() -> tuple[type, ...]:
    """Classes a ``trainer.plugins`` entry may subclass (Lightning's plugin kinds)."""

    from lightning.fabric.plugins.environments import ClusterEnvironment  # lazy: keeps the CLI's early checks light (torch/Lightning cost seconds at import)
    from lightning.pytorch.plugins import CheckpointIO, LayerSync, Precision  # lazy: keeps the CLI's early checks light (torch/Lightning cost seconds at import)

    return (Precision, ClusterEnvironment, CheckpointIO, LayerSync)


_STOP = ("LightningModule", "LightningDataModule", "Module", "object", "HyperparametersMixin")


class ConfigError(ValueError):
    """A user error in a config; the message is one line naming every bad key and what is expected."""


# ---------------------------------------------------------------------------------------- signatures
def init_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """Named ``__init__`` parameters of ``cls`` and its bases reached through ``**kwargs``.

    Returns:
        ``(parameters, open)``: ``open`` is True when the chain ends in a ``**kwargs`` that is not passed to
        a known base, i.e. any key may be valid.
    """
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass.__name__ in _STOP:
            return params, True
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            return params, True
        var_kw = False
        for name, p in list(sig.parameters.items())[1:]:
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not p.VAR_POSITIONAL:
                params.setdefault(name, p)
        if not var_kw:
            return params, False
    return params, True


def _hints(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            out.update(typing.get_type_hints(init))
        except Exception:  # unresolvable annotations: no type checks for that class
            continue
    return out


def type_name(tp: Any) -> str:
    """Readable name of an annotation (``int``, ``float | None``, ``one of ['a', 'b']``)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(tp))}"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def type_ok(value: Any, tp: Any) -> bool | None:
    """Whether ``value`` (plain YAML data) fits annotation ``tp``; ``None`` when it cannot be told."""
    if tp is Any or tp is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        results = [type_ok(value, a) for a in typing.get_args(tp)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    base = origin or tp
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    if base in (dict, cabc.Mapping, cabc.MutableMapping):
        return isinstance(value, Mapping)
    if base in (list, tuple, cabc.Sequence, cabc.Iterable, set, frozenset):
        return isinstance(value, (list, tuple))
    return None


def check_kwargs(cls: type, kwargs: Mapping[str, Any], where: str, errors: list[str],
                 skip: Iterable[str] = ()) -> None:
    """Append to ``errors`` every key of ``kwargs`` that ``cls`` does not accept or whose type is wrong."""
    params, open_ = init_parameters(cls)
    hints = _hints(cls)
    for key, value in kwargs.items():
        if key in skip:
            continue
        if key not in params:
            if not open_:
                errors.append(unknown_key(where, str(key), params))
            continue
        tp = hints.get(key, params[key].annotation)
        if value is not None and type_ok(value, tp) is False:
            errors.append(f"{where}.{key}={value!r} is {type(value).__name__}, expected {type_name(tp)}")


# ---------------------------------------------------------------------------------------- components
def _resolve(registry: Any, name: Any, where: str, errors: list[str]) -> Any:
    try:
        return registry.get(str(name))
    except KeyError:
        names = registry.names()
        errors.append(f"unknown {registry.kind} {where}={name!r}{did_you_mean(str(name), names)}; "
                      f"available: {', '.join(names)}")
    except (ImportError, ValueError) as exc:  # ClassPathError: not the expected kind of class
        errors.append(f"{where}: {exc}")
    return None


def _class_from_spec(spec: Any, where: str, errors: list[str], base: type | tuple[type, ...] = object) -> Any:
    """Resolve ``spec['class_path']`` through :func:`medvlp.registry.import_class_path` (the only way a
    config names code), which refuses anything but a subclass of ``base``."""

    if not isinstance(spec, Mapping) or "class_path" not in spec:
        errors.append(f"{where} must be a mapping with class_path (and optional init_args), got {spec!r}")
        return None
    extra = set(spec) - {"class_path", "init_args"}
    if extra:
        errors.append(unknown_key(where, sorted(extra)[0], ("class_path", "init_args")))
    try:
        cls = import_class_path(str(spec["class_path"]), base)
    except (ImportError, ValueError) as exc:  # ClassPathError
        errors.append(f"{where}.class_path: {exc}")
        return None
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        errors.append(f"{where}.init_args must be a mapping, got {init_args!r}")
    else:
        check_kwargs(cls, init_args, f"{where}.init_args", errors)
    return cls


def _check_encoder(spec: Any, default_class_path: str, where: str, errors: list[str]) -> None:
    from torch import nn  # lazy: keeps the CLI's early checks light (torch/Lightning cost seconds at import)

    if spec is None:
        return
    if not isinstance(spec, Mapping):
        errors.append(f"{where} must be a mapping, got {spec!r}")
    elif "class_path" in spec:
        _class_from_spec(spec, where, errors, base=nn.Module)
    else:
        check_kwargs(import_class_path(default_class_path, nn.Module), spec, where, errors)


def check_method(spec: Mapping[str, Any], errors: list[str], where: str = "method") -> None:
    """Check ``{name, init_args}`` of a method, including its encoder and optimizer blocks."""
    from medvlp.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER  # lazy: keeps the CLI's early checks light (torch/Lightning cost seconds at import)
    from medvlp.method import DEFAULT_OPTIMIZER  # lazy: keeps the CLI's early checks light (torch/Lightning cost seconds at import)


    _keys(spec, ("name", "init_args"), where, errors)
    cls = _resolve(METHODS, spec.get("name"), f"{where}.name", errors)
    args = spec.get("init_args") or {}
    if cls is None or not isinstance(args, Mapping):
        return
    check_kwargs(cls, args, f"{where}.init_args", errors, skip=("image_encoder", "text_encoder", "optimizer"))
    _check_encoder(args.get("image_encoder"), DEFAULT_IMAGE_ENCODER, f"{where}.init_args.image_encoder", errors)
    _check_encoder(args.get("text_encoder"), DEFAULT_TEXT_ENCODER, f"{where}.init_args.text_encoder", errors)
    opt = args.get("optimizer") or {}
    if isinstance(opt, Mapping):
        for k in opt:
            if k not in DEFAULT_OPTIMIZER:
                errors.append(unknown_key(f"{where}.init_args.optimizer", str(k), DEFAULT_OPTIMIZER))


def check_data(spec: Mapping[str, Any], errors: list[str], where: str = "data") -> None:
    """Check ``{name, init_args}`` of a datamodule; composite datamodules check their children."""

    if not isinstance(spec, Mapping):
        errors.append(f"{where} must be a mapping with name and init_args, got {spec!r}")
        return
    _keys(spec, ("name", "init_args", "protocols"), where, errors)
    cls = _resolve(DATAMODULES, spec.get("name"), f"{where}.name", errors)
    args = spec.get("init_args") or {}
    if cls is None or not isinstance(args, Mapping):
        return
    children = getattr(cls, "child_specs", None)
    child_specs = children(args) if callable(children) else {}
    if child_specs:
        params, _ = init_parameters(cls)
        check_kwargs(cls, {k: v for k, v in args.items() if k in params}, f"{where}.init_args", errors)
        for key, child in child_specs.items():
            check_data(child, errors, f"{where}.init_args.{getattr(cls, 'children_key', 'datamodules')}.{key}")
    else:
        check_kwargs(cls, args, f"{where}.init_args", errors)


def _keys(section: Any, allowed: Iterable[str], where: str, errors: list[str]) -> None:
    if not isinstance(section, Mapping):
        errors.append(f"{where} must be a mapping, got {section!r}")
        return
    allowed = list(allowed)
    for k in section:
        if k not in allowed and not str(k).startswith("_"):  # "_..." keys are set by medvlp itself
            errors.append(unknown_key(where, str(k), allowed))


def _spec_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_trainer(trainer: Mapping[str, Any], errors: list[str], allowed_extra: Iterable[str] = ()) -> None:
    """Check ``trainer.*`` against ``lightning.Trainer`` and the logger/callback/plugin specs."""
    import lightning as L  # lazy: keeps the CLI's early checks light (torch/Lightning cost seconds at import)
    from lightning.pytorch.callbacks import Callback  # lazy: keeps the CLI's early checks light (torch/Lightning cost seconds at import)
    from lightning.pytorch.loggers import Logger  # lazy: keeps the CLI's early checks light (torch/Lightning cost seconds at import)


    if not isinstance(trainer, Mapping):
        errors.append(f"trainer must be a mapping, got {trainer!r}")
        return
    skip = (*SPEC_TRAINER_KEYS, "precision") if trainer.get("precision") == "auto" else SPEC_TRAINER_KEYS
    check_kwargs(L.Trainer, {k: v for k, v in trainer.items() if k not in allowed_extra}, "trainer", errors, skip=skip)
    for i, item in enumerate(_spec_list(trainer.get("logger"))):
        if isinstance(item, str):
            if item not in LOGGER_SHORTHANDS:
                errors.append(f"trainer.logger={item!r} is not a logger shorthand{did_you_mean(item, LOGGER_SHORTHANDS)}"
                              f" (use {'|'.join(LOGGER_SHORTHANDS)}, false, or {{class_path, init_args}})")
        else:
            _class_from_spec(item, f"trainer.logger[{i}]", errors, base=Logger)
    for i, item in enumerate(_spec_list(trainer.get("callbacks"))):
        _class_from_spec(item, f"trainer.callbacks[{i}]", errors, base=Callback)
    for i, item in enumerate(_spec_list(trainer.get("plugins"))):
        _class_from_spec(item, f"trainer.plugins[{i}]", errors, base=trainer_plugin_bases())


def check_config(cfg: Any, defaults: Mapping[str, Any]) -> None:
    """Validate a composed run config against ``defaults`` (the top-level and ``run.*`` keys) and the
    classes it names.

    Raises:
        ConfigError: one line listing every problem.
    """

    c = to_container(cfg)
    errors: list[str] = []
    _keys(c, defaults, "", errors)
    run = c.get("run") or {}
    _keys(run, defaults.get("run", {}), "run", errors)
    for k, v in run.items() if isinstance(run, Mapping) else ():
        d = defaults.get("run", {}).get(k)
        if d is not None and v is not None and type_ok(v, type(d)) is False:
            errors.append(f"run.{k}={v!r} is {type(v).__name__}, expected {type(d).__name__}")
    check_trainer(c.get("trainer") or {}, errors, allowed_extra=defaults.get("trainer", {}).keys() - _trainer_params())
    if isinstance(c.get("method"), Mapping):
        check_method(c["method"], errors)
    if isinstance(c.get("data"), Mapping):
        check_data(c["data"], errors)
    raise_if(errors)


def _trainer_params() -> set[str]:
    import lightning as L  # lazy: keeps the CLI's early checks light (torch/Lightning cost seconds at import)


    return set(init_parameters(L.Trainer)[0])


def raise_if(errors: list[str]) -> None:
    """Raise one :class:`ConfigError` listing ``errors`` (deduplicated, in order)."""
    if errors:
        unique = list(dict.fromkeys(errors))
        raise ConfigError("; ".join(unique))
