"""``medvlp`` command line: list, pretrain, evaluate, benchmark, report, demo.

Every command takes OmegaConf dot-list overrides (``key=value``) and ``-c FILE`` config files; see
README "CLI" for the keys.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from omegaconf import OmegaConf

USAGE = """medvlp COMMAND [-c FILE] [key=value ...]

commands:
  list                         registered methods, datamodules and benchmark protocols (and their source)
  pretrain  method=M data=D    pretrain one method (resumes from <run>/checkpoints/last.ckpt)
  evaluate  ckpt=PATH data=D protocols=[..]   run protocols on one checkpoint
  benchmark suite=NAME|PATH    methods x datasets x protocols x fractions x seeds -> results.csv
  report    results=PATH       Markdown/LaTeX/CSV tables (mean ± std) and PNG plots
  demo                         benchmark suite=quickstart, then report (the main job)
  config    method=M data=D    print the composed config without running
"""


def _list() -> int:
    from medvlp.registry import BENCHMARKS, DATAMODULES, METHODS

    for title, reg in (("methods", METHODS), ("datamodules", DATAMODULES), ("benchmarks", BENCHMARKS)):
        print(f"{title}:")
        for e in reg.entries():
            print(f"  {e.name:<16} {e.source}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medvlp`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    logging.basicConfig(level=os.environ.get("MEDVLP_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    command, rest = argv[0], argv[1:]
    try:
        if command == "list":
            return _list()
        if command in ("pretrain", "config"):
            from medvlp.compose import compose

            cfg = compose(rest)
            if command == "config":
                print(OmegaConf.to_yaml(cfg))
                return 0
            from medvlp.train import pretrain

            print(f"checkpoint: {pretrain(cfg)}")
            return 0
        if command == "evaluate":
            from medvlp.benchmarks.runner import evaluate_command

            return evaluate_command(rest)
        if command == "benchmark":
            from medvlp.benchmarks.runner import benchmark_command

            return benchmark_command(rest)
        if command == "report":
            from medvlp.benchmarks.tables import report_command

            return report_command(rest)
        if command == "demo":
            from medvlp.benchmarks.runner import benchmark_command
            from medvlp.benchmarks.tables import report_command

            code = benchmark_command(["suite=quickstart", *rest])
            return code or report_command(["results=results/quickstart/results.csv", "out=results/quickstart"])
    except (KeyError, ValueError, ImportError, OSError) as exc:
        print(f"medvlp {command}: error: {exc}", file=sys.stderr)
        return 2
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
