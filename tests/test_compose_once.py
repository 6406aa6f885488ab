"""Each run config is composed once and validated once: ``medvlp pretrain``, and every method entry of a suite
(whatever its number of pretraining seeds); a warning from a method's config is printed once."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from medvlp import compose as compose_module
from medvlp import validate

OVERRIDE_WARNING = "config override of the method's value"


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts of compose passes (by method name) and of config validations."""
    counts: Counter = Counter()
    real_compose, real_check = compose_module.compose_with_overrides, validate.check_config

    def compose_with_overrides(args, defaults=None, layers=()):
        cfg, overrides = real_compose(args, defaults, layers)
        counts[("compose", str(cfg.method.name))] += 1
        return cfg, overrides

    def check_config(cfg, defaults):
        counts["validate"] += 1
        return real_check(cfg, defaults)

    monkeypatch.setattr(compose_module, "compose_with_overrides", compose_with_overrides)
    monkeypatch.setattr(validate, "check_config", check_config)
    return counts


def test_pretrain_composes_once_and_validates_once(tmp_path: Path, counted: Counter,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from medvlp.cli import main

    caplog.set_level(logging.WARNING)
    assert main(["pretrain", "method=clip", "preset=tiny", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=1",
                 "trainer.enable_progress_bar=false", "logger=false"]) == 0
    assert counted == Counter({("compose", "clip"): 1, "validate": 1})
    assert sum(OVERRIDE_WARNING in r.getMessage() for r in caplog.records) == 1  # tiny's embed_dim over clip.yaml's


def test_a_suite_composes_and_validates_each_method_entry_once(tmp_path: Path, counted: Counter,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from medvlp.benchmarks.suite.runner import load_suite, run_suite

    caplog.set_level(logging.WARNING)
    suite = load_suite("smoke", [f"output={tmp_path}"])
    suite["methods"] = {
        "clip": {"method": "clip"},  # pretrains (2 steps) once per seed
        "umcl": {"method": "umcl", "pretrain": False},
        "asg": {"method": "asg", "pretrain": False},
    }
    suite["pretrain_seeds"] = [0, 1, 2]
    suite["protocols"] = {"zero_shot": {}}
    run_suite(suite, "cpu")
    assert counted == Counter({("compose", "clip"): 1, ("compose", "umcl"): 1, ("compose", "asg"): 1, "validate": 3})
    warnings = Counter(r.getMessage() for r in caplog.records if OVERRIDE_WARNING in r.getMessage())
    assert warnings and all(n == 1 for n in warnings.values()), warnings


def test_a_suite_entry_error_names_the_entry_before_any_work(tmp_path: Path) -> None:
    from medvlp.benchmarks.suite.runner import load_suite, run_suite

    suite = load_suite("smoke", [f"output={tmp_path}"])
    suite["methods"]["clip"]["trainer"] = {"max_stpes": 3}
    with pytest.raises(validate.ConfigError, match=r"methods\.clip: .*trainer\.max_stpes.*did you mean trainer\.max_steps"):
        run_suite(suite, "cpu")
    assert not (tmp_path / "runs").exists()
