"""``medvlp list``: registered components, presets and suites, or one component's arguments."""
from __future__ import annotations

from medvlp.cli.args import Key, Parsed

NAME = "list"
SUMMARY = "registered methods, datamodules, protocols, presets and suites; method=M | data=D | protocol=P: one's arguments"
HELP = """medvlp list [method=NAME | data=NAME | protocol=NAME]

Without arguments: every registered method, datamodule and benchmark protocol (with the package it comes
from), the packaged presets and suites. With method=/data=/protocol=: that component's arguments, types,
defaults and descriptions (from its docstring)."""
KEYS = {
    "method": Key(str, help="a method's arguments"),
    "data": Key(str, help="a datamodule's arguments"),
    "protocol": Key(str, help="a protocol's parameters"),
}
PASSTHROUGH = False


def run(parsed: Parsed) -> int:
    """Print the listing."""
    from medvlp.describe import describe, list_all  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    asked = [(k, parsed.options[k]) for k in KEYS if k in parsed.given]
    if not asked:
        print(list_all())
    for kind, name in asked:
        print(describe(kind, str(name)))
    return 0
