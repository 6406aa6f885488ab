"""``medvlp config``: print the composed, checked config that ``medvlp pretrain`` would run."""
from __future__ import annotations

from omegaconf import OmegaConf

from medvlp.cli.args import Parsed, quick_check

NAME = "config"
SUMMARY = "print the composed (and validated) config without running"
HELP = """medvlp config [method=NAME] [data=NAME] [preset=NAME] [-c FILE] [key=value ...]

Print the composed (and validated) config that `medvlp pretrain` with the same arguments would run."""
KEYS: dict = {}
PASSTHROUGH = True


def run(parsed: Parsed) -> int:
    """Print the config as YAML."""
    quick_check(parsed.rest)  # typos in top-level/run/trainer keys: answered before torch is imported
    from medvlp.compose import compose  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    print(OmegaConf.to_yaml(compose(parsed.rest)))
    return 0
