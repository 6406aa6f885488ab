"""``medvlp report``: tables, plots and report.html from a results CSV."""
from __future__ import annotations

from pathlib import Path

from medvlp.cli.args import Key, Parsed

NAME = "report"
SUMMARY = "headline table with 95 % CIs and significance vs a reference, tables, plots, report.html"
HELP = """medvlp report results=PATH [out=DIR] [key=value ...]

Markdown/LaTeX/CSV tables (mean ± std over seeds, bootstrap CIs), PNG plots and a self-contained
report.html from a results CSV; prints the headline table (full=true: every table)."""
KEYS = {
    "results": Key(str, required=True, help="the results CSV"),
    "out": Key(str, help="output folder (default: the results CSV's folder)"),
    "plots": Key(bool, True, help="write PNG plots"),
    "paper": Key(bool, False, help="add the paper view (published numbers beside ours)"),
    "reference": Key(str, help="the row label differences are tested against (default: random_init when present)"),
    "n_boot": Key(int, 1000, help="bootstrap resamples for CIs"),
    "ci_seed": Key(int, 0, help="seed of the bootstrap"),
    "ci": Key(bool, True, help="compute CIs and paired tests"),
    "full": Key(bool, False, help="print every table, not only the headline"),
}
PASSTHROUGH = False


def run(parsed: Parsed) -> int:
    """Write the report and print its headline."""
    from medvlp.benchmarks.report.tables import headline_only, report  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    o = parsed.options
    if not Path(o["results"]).is_file():
        raise FileNotFoundError(f"report: results file {o['results']} does not exist")
    md = report(o["results"], o["out"], o["plots"], o["paper"], o["reference"], o["n_boot"], o["ci_seed"], o["ci"])
    out = Path(o["out"] or Path(o["results"]).parent)
    print(md if o["full"] else headline_only(md))
    print(f"\nfull tables: {out / 'table.md'}; self-contained page: {out / 'report.html'}")
    return 0
