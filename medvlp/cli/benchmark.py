"""``medvlp benchmark``: run a suite (methods × datasets × protocols × fractions × seeds) into results.csv."""
from __future__ import annotations

import logging

from medvlp.cli.args import Key, Parsed

NAME = "benchmark"
SUMMARY = "methods x datasets x protocols x fractions x seeds -> results.csv (suite=NAME|PATH)"
HELP = """medvlp benchmark suite=NAME|PATH [key=value ...] [device=cpu|cuda]

Run a suite (methods x datasets x protocols x fractions x seeds) into <output>/results.csv; finished units
are skipped on rerun. Other key=value tokens override the suite's keys (e.g. output=DIR,
methods.clip.trainer.max_steps=10). The suite's keys and protocol parameters are validated before any
work."""
#: the only place a suite's pretraining may resume with pickled (non-weights-only) checkpoints
UNSAFE_RESUME = "run.weights_only_resume"
KEYS = {
    "suite": Key(str, help="a packaged suite name or a YAML path (or -c PATH)"),
    "device": Key(str, help="cpu or cuda (default: cuda when available)"),
    UNSAFE_RESUME: Key(bool, True, help="false: resume pretraining from pickled checkpoints (command line only)"),
}
PASSTHROUGH = True
log = logging.getLogger(__name__)


def suite_from(parsed: Parsed, default: str | None = None) -> dict:
    """The suite named by ``suite=`` (or the first ``-c`` file), with the remaining tokens as overrides."""
    from medvlp.benchmarks.suite.runner import UNSAFE_RESUME_KEY, load_suite

    rest = list(parsed.rest)
    name = parsed.options["suite"] or default
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


def run(parsed: Parsed) -> int:
    """Run the suite."""
    from medvlp.benchmarks.suite.runner import run_suite

    print(f"results: {run_suite(suite_from(parsed), parsed.options['device'])}")
    return 0
