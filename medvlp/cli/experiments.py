"""``medvlp experiments``: run the controlled-experiment suites and decide each claim from stored results."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from medvlp.checks import did_you_mean
from medvlp.cli.args import Key, Parsed
from medvlp.cli.benchmark import packaged_suites

NAME = "experiments"
SUMMARY = "controlled experiments on the phantom (exp_* suites) -> claims with CIs"
HELP = """medvlp experiments [names=[exp_a,exp_b]] [run=false] [out=results/experiments] [n_boot=2000]
                   [key=value ...]

Run the controlled-experiment suites (default: every packaged exp_* suite; stored units are skipped),
then compute each claim's outcome from the stored results (Δ with a two-level bootstrap CI over
pretraining seeds and test samples) into <out>/claims.md and claims.csv. run=false only summarises.
By default each suite's results live where the suite says (results/exp_*); with out=DIR given, they
live in DIR/<suite> (run=false reads them there). Other key=value tokens override every suite's keys."""
KEYS = {
    "names": Key(list, help="experiment suites (default: every packaged exp_* suite)"),
    "run": Key(bool, True, help="false: only summarise stored results"),
    "out": Key(str, "results/experiments", help="where claims.md and claims.csv go; given: also each suite's results (DIR/<suite>)"),
    "n_boot": Key(int, 2000, help="bootstrap resamples"),
}
PASSTHROUGH = True


def run_experiments(names: Sequence[str] | None, overrides: Sequence[str] = (), run: bool = True,
                    out: str | Path = "results/experiments", n_boot: int = 2000,
                    results_root: str | Path | None = None) -> tuple[Path, list[str]]:
    """Run each named (default: every packaged) experiment suite — units already stored are skipped —
    then write ``<out>/claims.md`` and ``claims.csv`` from the stored results.

    Args:
        names: experiment suites (packaged names or YAML paths); ``None``: every packaged ``exp_*`` suite.
        overrides: dot-list overrides applied to every suite.
        run: False only summarises what is stored (the claims are rewritten from the suites as they are now).
        out: folder of ``claims.md`` / ``claims.csv``.
        n_boot: bootstrap resamples.
        results_root: when given, each suite's results folder is ``<results_root>/<suite name>`` (written by a
            run, read by ``run=False``) instead of the suite's ``output``.

    Returns:
        ``(claims.md path, one summary line per claim)``.
    """
    packaged = [n for n in packaged_suites() if n.startswith("exp_")]
    for name in names or ():
        if name not in packaged and not Path(name).is_file():  # checked before the harness is imported
            raise ValueError(f"unknown experiment {name!r}{did_you_mean(name, packaged)} (packaged: {packaged})")
    import pandas as pd  # lazy: command modules load for `medvlp --help`, which must stay fast

    from medvlp.benchmarks.suite.experiments import (  # lazy: as above
        claim_outcomes, load_experiments, outcomes_markdown, packaged_experiments, summary_lines, write_experiment,
    )
    from medvlp.benchmarks.suite.runner import load_suite, run_suite  # lazy: as above
    from medvlp.io import atomic_write_text  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    names = list(names or packaged_experiments())
    out = Path(out)
    sections, tables, lines = [], [], []
    for name in names:
        where = [f"output={Path(results_root) / Path(str(name)).stem}"] if results_root is not None else []
        suite = load_suite(name, [*overrides, *where])
        if not suite.get("experiment"):
            raise ValueError(f"suite {name!r} has no experiment block")
        if run:
            run_suite(suite)
        else:
            write_experiment(suite)  # the claims as the suite states them now, checked against it
        folder = Path(suite["output"])
        outcomes = claim_outcomes(folder, n_boot)
        tables.append(outcomes.assign(suite=name))
        sections.append(outcomes_markdown(outcomes, load_experiments(folder) or []))
        lines += summary_lines(outcomes)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "claims.md", "\n".join(sections))
    atomic_write_text(out / "claims.csv", pd.concat(tables).to_csv(index=False))
    return out / "claims.md", lines


def run(parsed: Parsed) -> int:
    """Run (or summarise) the experiments and print one line per claim."""
    if any(t in ("-c", "--config") for t in parsed.rest):
        raise ValueError("experiments takes no -c files; pass suite overrides as key=value")
    o = parsed.options
    claims, lines = run_experiments(o["names"], parsed.rest, run=o["run"], out=o["out"], n_boot=o["n_boot"],
                                    results_root=o["out"] if "out" in parsed.given else None)
    for line in lines:
        print(line)
    print(f"claims: {claims}")
    return 0
