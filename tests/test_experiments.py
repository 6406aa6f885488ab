"""Controlled-experiment bookkeeping: seed-level bootstrap, claim outcomes from stored results, packaged suites."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from medvlp.benchmarks.metrics import stats
from medvlp.benchmarks.suite.experiments import (
    Comparison,
    check_against_suite,
    claim_outcomes,
    outcome_of,
    outcomes_markdown,
    packaged_experiments,
    parse_experiment,
    parse_experiments,
    summary_lines,
    write_experiment,
)
from medvlp.benchmarks.kit.protocol import mean_recipe
from medvlp.benchmarks.suite.results import ResultStore
from medvlp.benchmarks.suite.runner import load_suite


def _unit(values: np.ndarray) -> stats.Unit:
    return mean_recipe("v"), {"v": values, "ids": np.arange(len(values)).astype(str)}


def test_seed_level_difference_carries_seed_variance() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(400)
    # A's seeds disagree strongly (means 0.2 .. 0.8); B's agree. Test-sample noise alone would give a narrow CI.
    groups_a = [[_unit(np.clip(base + off, 0, 1))] for off in (-0.3, 0.0, 0.3)]
    groups_b = [[_unit(base)] for _ in range(3)]
    two_level = stats.seed_level_difference(groups_a, groups_b, n_boot=2000, seed=1)
    test_only = stats.paired_difference([u for g in groups_a for u in g], [u for g in groups_b for u in g], 2000, 1)
    assert two_level["delta"] == pytest.approx(test_only["delta"])
    assert (two_level["hi"] - two_level["lo"]) > 5 * (test_only["hi"] - test_only["lo"])
    assert two_level["lo"] < 0 < two_level["hi"]  # three disagreeing seeds: no separable effect
    assert len(two_level["seeds_a"]) == 3 and two_level["g_b"] == 3


def test_seed_level_difference_one_seed_equals_paired_bootstrap() -> None:
    rng = np.random.default_rng(1)
    a, b = [[_unit(rng.random(200))]], [[_unit(rng.random(200))]]
    x = stats.seed_level_difference(a, b, n_boot=500, seed=3)
    y = stats.paired_difference(a[0], b[0], n_boot=500, seed=3)
    assert (x["lo"], x["hi"], x["p"]) == pytest.approx((y["lo"], y["hi"], y["p"]))


def test_outcome_uses_the_holm_adjusted_p() -> None:
    from medvlp.benchmarks.suite.experiments import outcome_of_test

    assert outcome_of_test(0.1, 0.01, "greater") == "shown"
    assert outcome_of_test(-0.1, 0.01, "greater") == "opposite"
    assert outcome_of_test(-0.1, 0.01, "less") == "shown"
    assert outcome_of_test(0.1, 0.051, "greater") == "not shown"  # an unadjusted CI may exclude 0 here


def test_outcome_direction() -> None:
    assert outcome_of(0.01, 0.2, "greater") == "shown"
    assert outcome_of(-0.2, -0.01, "greater") == "opposite"
    assert outcome_of(-0.2, -0.01, "less") == "shown"
    assert outcome_of(-0.1, 0.1, "greater") == "not shown"


def _store_experiment(tmp_path, effect: float) -> None:
    store = ResultStore(tmp_path / "results.csv")
    rng = np.random.default_rng(0)
    for label, shift in (("m", effect), ("ref", 0.0)):
        for ps in (0, 1, 2):
            v = (rng.random(300) < 0.4 + shift + 0.01 * ps).astype(float)
            store.add([dict(label=label, dataset="d", protocol="p", params="{}", fraction=1.0, pretrain_seed=ps,
                            subset_seed=0, seed=0, metric="hit", value=float(v.mean()), flags="")],
                      {"v": v, "ids": np.arange(300).astype(str)}, {"hit": mean_recipe("v", chance=0.1)})
    block = {"title": "T", "claim": "m beats ref", "comparisons": [
        {"a": "m", "b": "ref", "dataset": "d", "protocol": "p", "metric": "hit"},
        {"a": "m", "b": "ref", "dataset": "d", "protocol": "p", "metric": "missing_metric"}]}
    suite = {"name": "t", "output": str(tmp_path), "experiment": block, "pretrain_seeds": [0, 1, 2],
             "methods": {"m": {}, "ref": {}}, "datasets": {"d": {}}, "protocols": {"p": {}}}
    write_experiment(suite)


@pytest.mark.parametrize("effect,expected", [(0.3, "shown"), (0.0, "not shown")])
def test_claim_outcomes_from_stored_results(tmp_path, effect: float, expected: str) -> None:
    _store_experiment(tmp_path, effect)
    out = claim_outcomes(tmp_path, n_boot=500)
    first, missing = out.iloc[0], out.iloc[1]
    assert first["outcome"] == expected
    assert len(json.loads(first["seeds_a"])) == 3 and first["chance"] == pytest.approx(0.1)
    assert missing["outcome"] == "not measured" and "no rows" in missing["reason"]
    assert first["reason"] == ""  # all three planned pretraining seeds are stored
    md = outcomes_markdown(out, yaml.safe_load((tmp_path / "experiment.yaml").read_text())["experiments"])
    assert "m beats ref" in md and expected in md
    assert summary_lines(out)[0].startswith("T: 1/2 comparisons measured")


def test_experiment_block_errors_name_the_key(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs a non-empty 'claim'"):
        parse_experiment({"title": "x", "comparisons": [{}]}, "suite x")
    with pytest.raises(ValueError, match="unknown comparison keys"):
        Comparison.from_spec({"a": "m", "b": "r", "dataset": "d", "protocol": "p", "metric": "x", "metrc": 1}, "w")
    exp = parse_experiment({"title": "x", "claim": "c", "comparisons": [
        {"a": "m", "b": "nope", "dataset": "d", "protocol": "p", "metric": "x"}]}, "suite x")
    with pytest.raises(ValueError, match="names method 'nope'"):
        check_against_suite(exp, {"methods": {"m": {}}, "datasets": {"d": {}}, "protocols": {"p": {}}}, "suite x")


def test_packaged_experiments_are_consistent() -> None:
    names = packaged_experiments()
    for name in names:
        suite = load_suite(name)
        for exp in parse_experiments(suite["experiment"], name):
            check_against_suite(exp, suite, name)
        seeds = suite.get("pretrain_seeds")
        assert seeds is not None and len(seeds) >= 3, f"{name}: an experiment needs >= 3 pretraining seeds"
        assert str(suite["output"]).startswith("results/exp_"), name


def test_report_adds_claims_section(tmp_path) -> None:
    from medvlp.benchmarks.report.tables import headline_only, report

    _store_experiment(tmp_path, 0.3)
    md = report(tmp_path / "results.csv", plots=False, n_boot=200)
    assert md.startswith("## Claims") and "**shown**" in headline_only(md)
    assert pd.read_csv(tmp_path / "claims.csv")["outcome"].iloc[0] == "shown"


def test_demo_summary_lines_without_stored_runs(tmp_path, monkeypatch) -> None:
    from medvlp.benchmarks.suite.experiments import stored_summaries

    monkeypatch.chdir(tmp_path)
    lines = stored_summaries()
    assert len(lines) >= len(packaged_experiments()) >= 3
    assert all(line.endswith("not run yet (make experiments)") for line in lines)


def test_method_protocols_subset_runs_only_those(tmp_path) -> None:
    from medvlp.benchmarks.suite.runner import load_suite, run_suite

    suite = load_suite("smoke", [f"output={tmp_path}"])
    suite["methods"] = {"random_init": {"method": "clip", "pretrain": False, "protocols": ["zero_shot"]},
                        "other_init": {"method": "clip", "pretrain": False}}
    suite["protocols"] = {"zero_shot": {}, "retrieval": {}}
    df = pd.read_csv(run_suite(suite, "cpu"))
    assert set(df.loc[df.label == "random_init", "protocol"]) == {"zero_shot"}
    assert set(df.loc[df.label == "other_init", "protocol"]) == {"zero_shot", "retrieval"}
    suite["methods"]["random_init"]["protocols"] = ["linear_probe"]
    with pytest.raises(ValueError, match="not protocol keys of the suite"):
        run_suite(suite, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["exp_xray", "exp_unimedi", "exp_gtgm"])
def test_experiment_suite_runs_one_step_and_reports_claims(tmp_path, name: str) -> None:
    from medvlp.benchmarks.suite.runner import load_suite, run_suite

    suite = load_suite(name, [f"output={tmp_path}", "preset=tiny", "pretrain.trainer.max_steps=1", "pretrain_seeds=[0,1,2]"])
    for ds in suite["datasets"].values():
        ds["init_args"].update(num_train=24, num_val=8, num_test=16)
    for params in suite["protocols"].values():
        if "epochs" in params:
            params["epochs"] = 1
    run_suite(suite, "cpu")
    out = claim_outcomes(tmp_path, n_boot=100)
    assert len(out) == sum(len(e["comparisons"]) for e in parse_experiments(suite["experiment"], name))
    assert set(out["outcome"]) <= {"shown", "not shown", "opposite", "not measured"}


def test_missing_pretraining_seeds_are_named(tmp_path) -> None:
    _store_experiment(tmp_path, 0.3)
    meta = yaml.safe_load((tmp_path / "experiment.yaml").read_text())
    meta["pretrain_seeds"] = [0, 1, 2, 3]
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(meta))
    out = claim_outcomes(tmp_path, n_boot=100)
    assert out.iloc[0]["reason"] == "only 3 of 4 pretraining seeds stored"
