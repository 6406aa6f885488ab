"""``medvlp benchmark``: run a suite (methods × datasets × protocols × fractions × seeds) into results.csv, here
or as SLURM jobs (``launcher=slurm``)."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from medvlp.cli.args import Key, Parsed
from medvlp.validate import did_you_mean

NAME = "benchmark"
SUMMARY = "methods x datasets x protocols x fractions x seeds -> results.csv (suite=NAME|PATH)"
HELP = """medvlp benchmark suite=NAME|PATH [key=value ...] [device=cpu|cuda] [launcher=local|slurm]

Run a suite (methods x datasets x protocols x fractions x seeds) into <output>/results.csv; finished units
are skipped on rerun. Other key=value tokens override the suite's keys (e.g. output=DIR,
methods.clip.trainer.max_steps=10). The suite's keys and protocol parameters are validated before any
work.

launcher=slurm submits each pretraining arm as a SLURM job and its evaluation as a job that depends on it
(afterok); only what has no results is submitted. Its options come from the suite's launcher: block and
launcher.KEY=VALUE tokens (nodes, gpus_per_node, time, partition, account, qos, sbatch, ...; README
"Scale"). It returns after submitting unless wait=true; dry_run=true prints the sbatch scripts instead.
`medvlp status out=DIR` shows the jobs."""
#: the only place a suite's pretraining may resume with pickled (non-weights-only) checkpoints
UNSAFE_RESUME = "run.weights_only_resume"
KEYS = {
    "suite": Key(str, help="a packaged suite name or a YAML path (or -c PATH)"),
    "device": Key(str, help="cpu or cuda (default: cuda when available)"),
    UNSAFE_RESUME: Key(bool, True, help="false: resume pretraining from pickled checkpoints (command line only)"),
    "launcher": Key(dict, help="local (here, default) or slurm; launcher.KEY=VALUE sets its options"),
    "wait": Key(bool, False, help="launcher=slurm: return when the jobs have finished"),
    "dry_run": Key(bool, False, help="launcher=slurm: print the sbatch scripts, submit nothing"),
    "only": Key(list, help="run only these arms (method label, or label@seed for pretraining seeds)"),
    "stage": Key(str, "all", help="all, or pretrain (pretraining only; what a SLURM pretraining job runs)"),
    "requeue": Key(bool, False, help="pretraining checkpoints and requeues its SLURM job on SIGUSR1"),
}
PASSTHROUGH = True
log = logging.getLogger(__name__)


def packaged_suites() -> list[str]:
    """Names of the packaged suites, read from the folder without importing the benchmark harness."""
    spec = importlib.util.find_spec("medvlp.benchmarks")  # imports the (light) parent package only
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(p.stem for p in (Path(list(spec.submodule_search_locations)[0]) / "suites").glob("*.yaml"))


def check_suite_name(name: str) -> None:
    """Refuse a suite that is neither a file nor a packaged name, before anything heavy is imported.

    Raises:
        FileNotFoundError: with the nearest packaged suite.
    """
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or "/" in name or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"suite file not found: {name}")
        return
    names = packaged_suites()
    if names and name not in names:
        raise FileNotFoundError(f"unknown suite {name!r}{did_you_mean(name, names)} (no packaged suite or file of "
                                f"that name; packaged: {', '.join(names)})")


def suite_from(parsed: Parsed, default: str | None = None) -> dict:
    """The suite named by ``suite=`` (or the first ``-c`` file), with the remaining tokens as overrides."""
    given = parsed.options.get("suite")  # `medvlp demo` has no suite= key
    if given or default:
        check_suite_name(str(given or default))
    from medvlp.benchmarks.suite.runner import UNSAFE_RESUME_KEY, load_suite  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    rest = list(parsed.rest)
    name = given or default
    if name is None and "-c" in rest:
        i = rest.index("-c")
        name = rest[i + 1]
        del rest[i:i + 2]
    if name is None:
        raise ValueError("benchmark needs suite=NAME or a suite file")
    if "-c" in rest or "--config" in rest:
        raise ValueError("benchmark takes one suite (suite=NAME or -c FILE); pass overrides as key=value")
    suite = load_suite(name, rest)
    suite.pop(UNSAFE_RESUME_KEY, None)  # only the command line sets it
    if parsed.options[UNSAFE_RESUME] is False:
        log.warning("run.weights_only_resume=false from the command line: pretraining resumes will unpickle "
                    "checkpoints, which can run code")
        suite[UNSAFE_RESUME_KEY] = False
    return suite


def launcher_block(suite: dict, given: object) -> dict:
    """The suite's ``launcher:`` block with the command line's ``launcher=`` / ``launcher.KEY=`` on top (a
    command line that names another launcher drops the suite block's options)."""
    block = suite.get("launcher") or {}
    block = {"name": block} if isinstance(block, str) else dict(block)
    if isinstance(given, str):
        given = {"name": given}
    if isinstance(given, dict):
        if given.get("name") not in (None, block.get("name", "local")):
            block = {}
        block.update(given)
    block.setdefault("name", "local")
    return block


def run(parsed: Parsed) -> int:
    """Run the suite here, or submit it with its launcher."""
    opts = parsed.options
    suite = suite_from(parsed)  # the suite's name is checked before the harness is imported
    from medvlp.benchmarks.suite.launch import LAUNCHERS  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs
    from medvlp.benchmarks.suite.runner import run_suite  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs
    from medvlp.checks import did_you_mean  # lazy: as above
    block = launcher_block(suite, opts["launcher"])
    suite.pop("launcher", None)
    if opts["stage"] != "all" or opts["requeue"]:  # one job's share of a launched suite: always here
        print(f"results: {run_suite(suite, opts['device'], opts['only'], opts['stage'], opts['requeue'])}")
        return 0
    name = block.pop("name")
    if name not in LAUNCHERS:
        raise ValueError(f"launcher={name!r}: unknown{did_you_mean(str(name), LAUNCHERS)} (launchers: "
                         f"{', '.join(LAUNCHERS)})")
    path = LAUNCHERS[name](block).launch(suite, opts["device"], only=opts["only"], wait=opts["wait"],
                                         dry_run=opts["dry_run"])
    if name == "local" or opts["wait"]:
        print(f"results: {path}")
    return 0
