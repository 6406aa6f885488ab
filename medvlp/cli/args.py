"""The one argument style of every ``medvlp`` command: ``key=value`` tokens and ``-c FILE`` config files.

A command declares its own keys (:class:`Key`: type, default, help); :func:`parse` reads them, converts
each value to the declared type and refuses unknown keys with the nearest valid key as a suggestion.
Commands that run a config (``pretrain``, ``benchmark``, ...) pass every other token on to the config
composer, which validates it against the config's own keys. Library modules never read ``argv``.
"""
from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from medvlp.checks import did_you_mean
from medvlp.compose import DEFAULTS, SHORTHANDS
from medvlp.config import check_preset
from medvlp.validate import ConfigError, unknown_key


@dataclass(frozen=True)
class Key:
    """One command-line key of a command.

    Attributes:
        type: ``str``, ``int``, ``float``, ``bool``, ``list`` or ``dict`` (``dict``/``list`` values are
            YAML, e.g. ``protocols=[a,b]`` or ``ckpt={format: mgca, path: x.ckpt}``).
        default: the value when the key is absent (``None``: absent).
        help: one line for ``--help``.
        required: the command refuses to run without it.
    """

    type: type
    default: Any = None
    help: str = ""
    required: bool = False


@dataclass
class Parsed:
    """What :func:`parse` returns: the command's own options and the tokens passed on to the config."""

    options: dict[str, Any] = field(default_factory=dict)
    rest: list[str] = field(default_factory=list)
    given: set[str] = field(default_factory=set)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def convert(command: str, key: str, raw: str, spec: Key) -> Any:
    """``raw`` (the text after ``key=``) as ``spec.type``.

    Raises:
        ValueError: naming the command, the key, the value and the expected type.
    """
    def bad(expected: str) -> ValueError:
        return ValueError(f"{command}: {key}={raw!r} is not {expected}")

    if spec.type is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise bad("a boolean (true/false)")
    if spec.type is int:
        try:
            return int(raw)
        except ValueError:
            raise bad("an integer") from None
    if spec.type is float:
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if spec.type is dict and not raw.lstrip().startswith("{"):
        return raw  # a name or a path (data=phantom, ckpt=run/last.ckpt)
    if spec.type in (list, dict):
        try:
            parsed: Any = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))
            value = parsed["v"]
        except Exception as exc:  # omegaconf's grammar errors: one line
            raise ValueError(f"{command}: {key}={raw!r} is not valid YAML ({type(exc).__name__})") from None
        if spec.type is list and isinstance(value, str):
            value = [value]  # names=exp_a is names=[exp_a]
        if not isinstance(value, spec.type) and not (spec.type is dict and isinstance(value, str)):
            raise bad(f"a {'list' if spec.type is list else 'mapping'}")
        return value
    return raw


def parse(command: str, args: Sequence[str], keys: Mapping[str, Key], passthrough: bool = False) -> Parsed:
    """Read ``key=value`` tokens of ``command``.

    Args:
        command: the command's name (for messages).
        args: the tokens after the command name.
        keys: the command's own keys.
        passthrough: when True, ``-c FILE`` and keys the command does not own are returned in
            :attr:`Parsed.rest` for the config composer (which validates them); when False they are errors.

    Raises:
        ValueError: one line naming an unknown key (with a suggestion), a malformed token or a bad value.
    """
    out = Parsed()
    dotted: dict[str, list[str]] = {}
    it = iter(args)
    for tok in it:
        if tok in ("-c", "--config"):
            if not passthrough:
                raise ValueError(f"{command}: takes no -c config files (keys: {', '.join(sorted(keys))})")
            path = next(it, None)
            if path is None:
                raise ValueError(f"{tok} needs a file path")
            out.rest += [tok, path]
            continue
        key, eq, raw = tok.partition("=")
        if not eq:
            raise ValueError(f"{command}: unexpected argument {tok!r}: use key=value"
                             + (" or -c FILE" if passthrough else ""))
        head, _, sub = key.partition(".")
        if key in keys:
            out.options[key] = convert(command, key, raw, keys[key])
            out.given.add(key)
        elif sub and head in keys and keys[head].type is dict:  # data.init_args.root=DIR
            dotted.setdefault(head, []).append(f"{sub}={raw}")
            out.given.add(head)
        elif passthrough:
            out.rest.append(tok)
        else:
            hint = did_you_mean(key, keys) or f" (keys: {', '.join(sorted(keys))})"
            raise ValueError(f"{command}: unknown key {key!r}{hint}")
    for head, items in dotted.items():
        base = out.options.get(head, keys[head].default)
        base = {"name": base} if isinstance(base, str) else dict(base or {})
        try:
            out.options[head] = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(items)))
        except Exception as exc:  # omegaconf's grammar errors: one line
            raise ValueError(f"{command}: {head}.* overrides {items} are not valid ({type(exc).__name__})") from None
    for key, spec in keys.items():
        if key not in out.options:
            if spec.required:
                raise ValueError(f"{command} needs {key}=... ({spec.help})")
            out.options[key] = spec.default
    return out


def keys_help(keys: Mapping[str, Key]) -> str:
    """The ``--help`` lines of a command's keys (generated, so they cannot drift from :func:`parse`)."""
    if not keys:
        return ""
    width = max(len(k) for k in keys) + 2
    lines = ["keys:"]
    for name, spec in keys.items():
        default = " (required)" if spec.required else ("" if spec.default is None else f" (default: {spec.default})")
        lines.append(f"  {name:<{width}}{spec.type.__name__:<6} {spec.help}{default}")
    return "\n".join(lines)


def _trainer_parameters() -> set[str] | None:
    """``lightning.Trainer.__init__``'s parameter names read from its source (no import of Lightning), or
    ``None`` when the source cannot be found (the full check then does the work)."""
    spec = importlib.util.find_spec("lightning")  # a top-level find_spec imports nothing
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(list(spec.submodule_search_locations)[0]) / "pytorch" / "trainer" / "trainer.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
                    a = fn.args
                    return {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]} - {"self"}
    return None


def quick_check(tokens: Sequence[str]) -> None:
    """Check the keys of ``key=value`` config overrides that need no import of a model library: top-level,
    ``run.*`` and ``trainer.*`` keys and the preset name. A typo there is answered before torch or Lightning
    is loaded, with the same message the full check (:func:`medvlp.validate.check_config`) gives; everything
    else (class arguments, ``-c`` files, types) is left to that check.

    Raises:
        medvlp.validate.ConfigError: one line listing the unknown keys.
    """
    errors: list[str] = []
    trainer = None
    it = iter(tokens)
    for tok in it:
        if tok in ("-c", "--config"):
            next(it, None)
            continue
        key, eq, value = tok.partition("=")
        if not eq:
            continue
        key = SHORTHANDS.get(key, key)
        head, _, rest = key.partition(".")
        sub = rest.split(".")[0]
        if head not in DEFAULTS:
            errors.append(unknown_key("", head, DEFAULTS))
        elif head == "run" and sub and sub not in DEFAULTS["run"]:
            errors.append(unknown_key("run", sub, DEFAULTS["run"]))
        elif head == "trainer" and sub:
            trainer = _trainer_parameters() if trainer is None else trainer
            if trainer is not None and sub not in trainer | set(DEFAULTS["trainer"]):
                errors.append(unknown_key("trainer", sub, trainer | set(DEFAULTS["trainer"])))
        elif head == "preset" and not rest and value and value.lower() != "null":
            check_preset(value)
    if errors:
        raise ConfigError("; ".join(dict.fromkeys(errors)))
