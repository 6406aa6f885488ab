"""The ``medvlp`` entry point: dispatch to one module per command, logging set-up, one-line errors.

Every command parses its tokens the same way (:mod:`medvlp.cli.args`): its own ``key=value`` keys, and for
commands that run a config, ``-c FILE`` files and config overrides passed on to the composer.
"""
from __future__ import annotations

import importlib
import logging
import os
import pickle
import sys
from types import ModuleType
from typing import Sequence

import yaml  # type: ignore[import-untyped]
from omegaconf.errors import OmegaConfBaseException

from medvlp.cli.args import keys_help, parse
from medvlp.checks import did_you_mean
from medvlp.errors import DISK_FULL_ERRNOS, WRITE_ERRNOS, WriteError

#: command name → the module that defines it (NAME, SUMMARY, HELP, KEYS, PASSTHROUGH, run); imported lazily
COMMANDS = {
    "list": "medvlp.cli.listing",
    "pretrain": "medvlp.cli.pretrain",
    "evaluate": "medvlp.cli.evaluate",
    "export": "medvlp.cli.export",
    "benchmark": "medvlp.cli.benchmark",
    "report": "medvlp.cli.report",
    "demo": "medvlp.cli.demo",
    "experiments": "medvlp.cli.experiments",
    "prepare": "medvlp.cli.prepare",
    "config": "medvlp.cli.config",
    "status": "medvlp.cli.status",
}


def command_module(name: str) -> ModuleType:
    """The module of command ``name``.

    Raises:
        ValueError: for an unknown command, with the nearest command as a suggestion.
    """
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}{did_you_mean(name, COMMANDS)}; commands: {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[name])


def usage() -> str:
    """The top-level help, generated from the command modules."""
    lines = ["medvlp COMMAND [-c FILE] [key=value ...] [--debug]", "", "commands:"]
    for name in COMMANDS:
        lines.append(f"  {name:<12} {command_module(name).SUMMARY}")
    lines += ["", "options: medvlp COMMAND --help, medvlp --version, --debug (full traceback on errors)"]
    return "\n".join(lines)


def command_help(name: str) -> str:
    """One command's ``--help``: its text and its keys (generated from the keys it parses)."""
    mod = command_module(name)
    parts = [mod.HELP, keys_help(mod.KEYS)]
    if mod.PASSTHROUGH:
        parts.append("other key=value tokens and -c FILE go to the config (validated against its keys)")
    return "\n\n".join(p for p in parts if p)


def setup_logging() -> None:
    """One handler (ours) on the root logger; Lightning's own console handler is removed (right after
    Lightning is imported, which most commands never need for ``--help`` or a config error) so every
    message prints once."""
    logging.basicConfig(level=os.environ.get("MEDVLP_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    from medvlp import noise  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    noise.install()
    noise.after_import("lightning", _own_lightning_logs)


def _own_lightning_logs(_: ModuleType) -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler):
                lg.removeHandler(h)
        lg.propagate = True


def _version() -> str:
    import importlib.metadata  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    from medvlp.version import __version__  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    libs = []
    for lib in ("torch", "lightning", "transformers", "monai"):
        try:
            libs.append(f"{lib} {importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            libs.append(f"{lib} not installed")
    return f"medvlp {__version__} ({', '.join(libs)})"


def run_command(command: str, rest: list[str]) -> int:
    """Parse ``rest`` in the command's one argument style and run it."""
    mod = command_module(command)
    return int(mod.run(parse(command, rest, mod.KEYS, passthrough=mod.PASSTHROUGH)))


#: user errors: one line, exit 2 (config, usage, missing files or classes, a refused file: YAML tags, pickles,
#: bad interpolations; a file that cannot be written: no space, quota, read-only, permission)
USER_ERRORS: tuple[type[BaseException], ...] = (KeyError, ValueError, TypeError, FileNotFoundError, ImportError,
                                                WriteError, OmegaConfBaseException, yaml.YAMLError,
                                                pickle.UnpicklingError)
#: errors while running a user's action (I/O, a failing run): one line, exit 1
RUN_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, ArithmeticError)
#: exit codes: a user error (including a write that failed), a failed run
EXIT_USER_ERROR, EXIT_RUN_ERROR = 2, 1


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.errno in DISK_FULL_ERRNOS:
        cause = os.strerror(exc.errno).lower()
        return f"cannot write {exc.filename}: {cause}" if exc.filename else f"cannot write: {cause}"
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, OmegaConfBaseException):
        text = str(text).split("full_key:")[0]
    return " ".join(str(text).split()) or type(exc).__name__


def exit_code(exc: BaseException) -> int:
    """:data:`EXIT_USER_ERROR` for a user error or any failed write (the disk is full, read-only, over quota
    or not writable), :data:`EXIT_RUN_ERROR` for a run that failed."""
    if isinstance(exc, USER_ERRORS):
        return EXIT_USER_ERROR
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return EXIT_USER_ERROR
    return EXIT_RUN_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medvlp`` console script.

    Errors from the user's config or inputs print one line (``medvlp <command>: error: ...``) and exit
    with 2 (config/usage) or 1 (a run that failed); ``--debug`` re-raises them with the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"medvlp: error: unknown command {command!r}{did_you_mean(command, COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(command_help(command))
        return 0
    if command != "list":
        setup_logging()
    try:
        code = run_command(command, rest)
    except USER_ERRORS + RUN_ERRORS as exc:
        if debug:
            raise
        print(f"medvlp {command}: error: {_message(exc)} (--debug shows the traceback)", file=sys.stderr)
        return exit_code(exc)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
