"""Result bookkeeping: grouping by every result-changing parameter, units keyed on weights, custom
protocol keys keeping their fractions, evaluate labels from checkpoint metadata."""
from __future__ import annotations

import pandas as pd

from medvlp.benchmarks.suite.results import ResultStore


def _tiny_suite(tmp_path, seed: int = 42) -> dict:
    from medvlp.benchmarks.suite.runner import load_suite

    suite = load_suite("smoke", [f"output={tmp_path}", f"seed={seed}"])
    suite["methods"] = {"random_init": {"method": "clip", "pretrain": False}}
    suite["protocols"] = {
        "zero_shot": {},
        "lp_strong_l2": {"protocol": "linear_probe", "C": 0.01, "fractions": [0.25, 0.5, 1.0], "seeds": [0]},
    }
    return suite


def test_report_groups_by_protocol_params(tmp_path) -> None:
    """Two C values in one folder are two cells, never averaged into a fake seed spread."""
    from medvlp.benchmarks.report.tables import report, summarize

    store = ResultStore(tmp_path / "results.csv")
    for c, value in (("1.0", 0.7), ("0.001", 0.5)):
        for seed in (0, 1):
            store.add([dict(label="m", method="clip", dataset="d", protocol="linear_probe", params=f'{{"C": {c}}}',
                            fraction=0.1, seed=seed, metric="auc", value=value + 0.01 * seed,
                            definition=f"probe with C={c}", weights="w", config_hash="h")])
    s = summarize(store.df)
    assert sorted(s["mean"].round(3)) == [0.505, 0.705]
    md = report(tmp_path / "results.csv", plots=False)
    assert "0.705" in md and "0.505" in md and "0.605" not in md
    assert "C=0.001" in md and "C=1" in md


def test_fraction_definitions_are_each_their_own(tmp_path) -> None:
    from medvlp.benchmarks.report.tables import report

    store = ResultStore(tmp_path / "results.csv")
    for frac in (0.1, 1.0):
        store.add([dict(label="m", dataset="d", protocol="linear_probe", params="{}", fraction=frac, seed=0,
                        metric="auc", value=0.6, definition=f"trained on {int(frac * 100)} samples")])
    md = report(tmp_path / "results.csv", plots=False)
    assert "trained on 10 samples" in md and "trained on 100 samples" in md


def test_changed_weights_are_recomputed_and_custom_protocol_keys_keep_fractions(tmp_path) -> None:
    from medvlp.benchmarks.suite.runner import run_suite
    from medvlp.benchmarks.report.tables import report

    path = run_suite(_tiny_suite(tmp_path, seed=42), "cpu")
    first = pd.read_csv(path, dtype={"weights": str})
    assert first["weights"].nunique() == 1
    # the same label now names different weights (another init seed): its rows must be recomputed
    path = run_suite(_tiny_suite(tmp_path, seed=7), "cpu")
    second = pd.read_csv(path, dtype={"weights": str})
    assert second["weights"].nunique() == 1 and second["weights"].iloc[0] != first["weights"].iloc[0]
    assert len(second) == len(first)
    # a protocol key other than the registered name keeps its three fractions as three cells
    md = report(path, tmp_path / "report", plots=False)
    header = next(line for line in md.splitlines() if "lp_strong_l2@0.25" in line)  # detailed table
    assert sum("lp_strong_l2@" in cell for cell in header.split("|")) == 3


def test_duplicate_cells_are_never_dropped_silently(tmp_path) -> None:
    import pytest

    from medvlp.benchmarks.report.tables import summarize, wide_table

    s = summarize(pd.DataFrame([dict(label="m", dataset="d", protocol="p", params="{}", fraction=1.0, seed=0,
                                     metric="auc", value=0.6)]))
    with pytest.raises(ValueError, match="m"):
        wide_table(pd.concat([s, s.assign(mean=0.9)]))


def test_evaluate_labels_rows_from_checkpoint_metadata(tmp_path) -> None:
    from tests.conftest import tiny_config

    from medvlp.cli import main
    from medvlp.train import pretrain

    cfg = tiny_config("clip", f"run.dir={tmp_path / 'some_run_folder'}", "trainer.max_steps=1",
                      "trainer.enable_progress_bar=false")
    from omegaconf import OmegaConf

    ckpt = pretrain(OmegaConf.create(cfg))
    out = tmp_path / "eval"
    data = cfg["data"]
    args = [f"ckpt={ckpt}", f"out={out}", "protocols=[zero_shot]", f"data.name={data['name']}"]
    args += [f"data.init_args.{k}={v}" for k, v in (data.get("init_args") or {}).items() if not isinstance(v, (dict, list))]
    assert main(["evaluate", *args]) == 0
    df = pd.read_csv(out / "results.csv")
    assert set(df["method"]) == {"clip"}
    assert df["label"].iloc[0].startswith("clip") and "some_run_folder" not in df["label"].iloc[0]
    assert df["backbone"].iloc[0] and df["backbone"].iloc[0] in df["label"].iloc[0]


def test_unit_seeds_separate_subset_and_training_seeds_and_skip_deterministic_repeats() -> None:
    from medvlp.benchmarks.protocols.finetune import Finetune
    from medvlp.benchmarks.protocols.linear_probe import LinearProbe
    from medvlp.benchmarks.suite.runner import unit_seeds

    lp, ft = LinearProbe(), Finetune()
    assert unit_seeds(lp, {"seeds": [0, 1, 2]}, 0.1) == [(0, 0), (1, 1), (2, 2)]  # each seed its own subset
    assert unit_seeds(lp, {"seeds": [0, 1, 2]}, 1.0) == [(0, 0)]  # same subset, deterministic: once
    assert unit_seeds(lp, {"seeds": [0, 1, 2], "subset_seeds": [5]}, 0.1) == [(5, 0)]
    # BenchX: one fixed subset, several training seeds of a stochastic protocol
    assert unit_seeds(ft, {"seeds": [0, 1, 2], "subset_seeds": [5]}, 0.1) == [(5, 0), (5, 1), (5, 2)]
    assert unit_seeds(ft, {"seeds": [0, 1], "subset_seeds": [5, 6]}, 1.0) == [(5, 0), (5, 1)]


def test_pretrain_seeds_are_run_and_aggregated_by_the_report(tmp_path) -> None:
    from medvlp.benchmarks.suite.runner import run_suite
    from medvlp.benchmarks.report.tables import report
    from medvlp.benchmarks.suite.schema import check_suite

    suite = _tiny_suite(tmp_path)
    suite["pretrain_seeds"] = [1, 2]
    suite["protocols"] = {"zero_shot": {}, "linear_probe": {"fractions": [1.0], "seeds": [0, 1], "subset_seeds": [0]}}
    check_suite(suite)
    df = pd.read_csv(run_suite(suite, "cpu"), dtype={"weights": str})
    assert sorted(set(df["pretrain_seed"])) == [1, 2] and df["weights"].nunique() == 2
    assert len(df[df.protocol == "linear_probe"]) == 2  # seeds 0/1 of a deterministic probe at 100 %: run once
    md = report(tmp_path / "results.csv", plots=False, n_boot=200)
    zs = next(line for line in md.splitlines() if line.startswith("| random_init"))
    assert "(2 seeds)" in zs
