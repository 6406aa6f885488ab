"""``medvlp demo`` (the main job, ``make demo``) runs the quickstart suite and reports it: the command's wiring is
tested here with the suite run and the report replaced by recorders (the real demo takes minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest


def test_demo_runs_the_quickstart_suite_then_reports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from medvlp.benchmarks.report import tables
    from medvlp.benchmarks.suite import experiments, runner
    from medvlp.cli import main

    seen: dict = {}

    def run_suite(suite, device=None, *args, **kwargs):
        seen["suite"], seen["device"] = suite, device
        return tmp_path / "results.csv"

    monkeypatch.setattr(runner, "run_suite", run_suite)
    monkeypatch.setattr(tables, "report", lambda results, out, *a, **k: f"| headline of {Path(results).name} |")
    monkeypatch.setattr(experiments, "stored_summaries", lambda names=None: ["exp: not run yet"])
    assert main(["demo", f"output={tmp_path}", "device=cpu"]) == 0
    assert seen["suite"]["name"] == "quickstart" and seen["suite"]["output"] == str(tmp_path)
    assert seen["device"] == "cpu"
    out = capsys.readouterr().out
    assert "headline of results.csv" in out and "exp: not run yet" in out


def test_demo_refuses_a_key_it_does_not_take() -> None:
    from medvlp.cli import main

    assert main(["demo", "suite=smoke"]) == 2
