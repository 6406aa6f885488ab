"""``medvlp benchmark``: run a suite (methods × datasets × protocols × fractions × seeds) into results.csv."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from medvlp.cli.args import Key, Parsed
from medvlp.validate import did_you_mean

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
    if parsed.options["suite"] or default:
        check_suite_name(str(parsed.options["suite"] or default))
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
    suite = suite_from(parsed)  # the suite's name is checked before the harness is imported
    from medvlp.benchmarks.suite.runner import run_suite

    print(f"results: {run_suite(suite, parsed.options['device'])}")
    return 0
