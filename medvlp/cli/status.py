"""``medvlp status``: the SLURM jobs of a suite's output folder (pending / running / done / failed, job id, last
log line)."""
from __future__ import annotations

from medvlp.cli.args import Key, Parsed

NAME = "status"
SUMMARY = "state of a suite's SLURM jobs: pending/running/done/failed, job id, last log line (out=DIR)"
HELP = """medvlp status out=DIR

For every job `medvlp benchmark ... launcher=slurm` submitted for DIR (its latest per arm and stage): the
arm, the stage (pretrain / evaluate), the job id, the state (from squeue/scontrol while SLURM knows the
job, then from the results store), the result rows of the arm and the last line of the job's log."""
KEYS = {"out": Key(str, required=True, help="the suite's output folder")}
PASSTHROUGH = False


def run(parsed: Parsed) -> int:
    """Print one line per job; exit 1 when a job failed."""
    from medvlp.benchmarks.suite.launch.slurm import status  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    rows = status(parsed.options["out"])
    cols = ["arm", "stage", "job", "state", "rows", "last log line"]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols[:-1]}
    print("  ".join(f"{c:<{width[c]}}" for c in cols[:-1]) + "  " + cols[-1])
    for r in rows:
        print("  ".join(f"{r[c]:<{width[c]}}" for c in cols[:-1]) + "  " + r[cols[-1]][:120])
    return 1 if any(r["state"].startswith("failed") for r in rows) else 0
