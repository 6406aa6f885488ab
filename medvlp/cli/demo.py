"""``medvlp demo``: the main job: the quickstart suite, its report, and the stored experiment outcomes."""
from __future__ import annotations

from medvlp.cli.args import Parsed
from medvlp.cli.benchmark import KEYS as BENCHMARK_KEYS
from medvlp.cli.benchmark import UNSAFE_RESUME

NAME = "demo"
SUMMARY = "benchmark suite=quickstart, then report (the main job)"
HELP = """medvlp demo [key=value ...]

`medvlp benchmark suite=quickstart`, then `medvlp report` into results/quickstart, then one summary line
per controlled experiment from its last stored run (`medvlp experiments` runs them). key=value tokens
override the quickstart suite's keys."""
KEYS = {k: v for k, v in BENCHMARK_KEYS.items() if k in ("device", UNSAFE_RESUME)}
PASSTHROUGH = True


def run(parsed: Parsed) -> int:
    """Run the quickstart suite and report it."""
    from pathlib import Path  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    from medvlp.benchmarks.report.tables import headline_only, report  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs
    from medvlp.benchmarks.suite.experiments import stored_summaries  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs
    from medvlp.benchmarks.suite.runner import run_suite  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs
    from medvlp.cli.benchmark import suite_from  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    suite = suite_from(parsed, default="quickstart")
    results = run_suite(suite, parsed.options["device"])
    out = Path(suite["output"])
    print(headline_only(report(results, out)))
    print(f"\nfull tables: {out / 'table.md'}; self-contained page: {out / 'report.html'}")
    print("\ncontrolled experiments (last stored run; `make experiments` runs them):")
    for line in stored_summaries():
        print(f"- {line}")
    return 0
