"""Benchmark protocols on fixtures with planted signal, metrics, splits, results and the suite runner."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medvlp.benchmarks.metrics.dice import dice_score
from medvlp.benchmarks.protocols.linear_probe import fit_predict_multilabel
from medvlp.benchmarks.kit.protocol import macro_auc
from medvlp.benchmarks.suite.results import ResultStore
from medvlp.benchmarks.protocols.retrieval import recall_at_k
from medvlp.benchmarks.protocols.segmentation import voi
from medvlp.benchmarks.kit.splits import fraction_ids, read_split_file, split_hash, write_split_file


def test_linear_probe_separable_features_give_auc_one_and_noise_half() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (400, 3)).astype(float)
    signal = y * 3 + rng.normal(0, 0.3, y.shape)
    x = np.concatenate([signal, rng.normal(size=(400, 5))], 1)
    scores = fit_predict_multilabel(x[:300], y[:300], x[300:])
    assert macro_auc(y[300:], scores)[0] > 0.99
    noise = rng.normal(size=(400, 8))
    assert abs(macro_auc(y[300:], fit_predict_multilabel(noise[:300], y[:300], noise[300:]))[0] - 0.5) < 0.1


def test_macro_auc_ignores_nan_and_single_class_columns() -> None:
    y = np.array([[1, 0, np.nan], [0, 0, 1], [1, 0, 0], [0, 0, np.nan]], float)
    s = np.array([[0.9, 0.1, 0.2], [0.1, 0.2, 0.9], [0.8, 0.3, 0.1], [0.2, 0.4, 0.5]])
    auc, per = macro_auc(y, s)
    assert per == [1.0, 1.0] and auc == 1.0


def test_recall_at_k_identity_is_one_and_ties_are_pessimistic() -> None:
    e = np.eye(20)
    assert recall_at_k(e @ e.T) == {1: 1.0, 5: 1.0, 10: 1.0}
    assert recall_at_k(np.ones((10, 10)), (1, 10)) == {1: 0.0, 10: 1.0}


def test_label_precision_at_k() -> None:
    from medvlp.benchmarks.protocols.retrieval import label_precision_at_k

    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], float)
    sim = np.array([[1, .9, 0, 0], [.9, 1, 0, 0], [0, 0, 1, .9], [0, 0, .9, 1]])
    prec, chance = label_precision_at_k(sim, labels, (1, 2, 4))
    assert prec == {1: 1.0, 2: 1.0, 4: 0.5} and chance == 0.5


def test_dice_definitions_on_known_masks() -> None:
    target = torch.zeros(3, 1, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, 0, :2, :2] = 1  # 4 px
    pred[0, 0, :2, :4] = 1  # 8 px, 4 overlap → Dice 2·4/12
    # image 1: both empty; image 2: empty GT, 1 false-positive px
    pred[2, 0, 0, 0] = 1
    assert dice_score(pred, target, 2, "foreground") == pytest.approx(8 / 12)  # empty-GT images excluded
    assert dice_score(pred, target, 2, "mgca_per_image") == pytest.approx((8 / 12 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="unknown Dice"):
        dice_score(pred, target, 2, "nope")


def test_voi_is_zero_for_identical_and_positive_for_merge() -> None:
    a = np.array([1, 1, 2, 2, 3, 3])
    assert voi(a, a) == (0.0, 0.0)
    split, merge = voi(np.ones(6, int), a)
    assert split == 0.0 and merge > 0


def test_fraction_splits_are_deterministic_nested_free_and_hashed(tmp_path) -> None:
    ids = [f"id{i}" for i in range(1000)]
    a = fraction_ids(ids, 0.1, 0)
    assert a == fraction_ids(list(reversed(ids)), 0.1, 0) and len(a) == 100
    assert a != fraction_ids(ids, 0.1, 1)
    assert len(fraction_ids(ids, 0.001, 0)) == 2  # min_count
    h = write_split_file(tmp_path / "s.txt", a)
    assert h == split_hash(a) and read_split_file(tmp_path / "s.txt", h) == sorted(a)
    with pytest.raises(ValueError, match="split changed"):
        read_split_file(tmp_path / "s.txt", "0" * 16)
    with pytest.raises(ValueError, match="unique"):
        fraction_ids(["a", "a"], 1.0, 0)


def test_result_store_resumes_without_duplicates(tmp_path) -> None:
    store = ResultStore(tmp_path / "r.csv")
    unit = dict(label="m", dataset="d", protocol="p", params="{}", fraction=0.1, seed=0)
    assert not store.done(**unit)
    store.add([{**unit, "metric": "auc", "value": 0.7}])
    again = ResultStore(tmp_path / "r.csv")
    assert again.done(**unit) and not again.done(**{**unit, "seed": 1})
    assert len(pd.read_csv(tmp_path / "r.csv")) == 1


def test_smoke_suite_runs_every_protocol_resumes_and_reports(tmp_path) -> None:
    from medvlp.benchmarks.suite.runner import load_suite, run_suite
    from medvlp.benchmarks.report.tables import report

    suite = load_suite("smoke", [f"output={tmp_path}"])
    path = run_suite(suite, "cpu")
    df = pd.read_csv(path)
    assert set(df["protocol"]) == {"zero_shot", "retrieval", "linear_probe", "segmentation"}
    assert set(df["label"]) == {"random_init", "clip"}
    assert df["value"].notna().all() and (df["definition"].str.len() > 20).all()
    lp = df[df.protocol == "linear_probe"]
    assert set(lp["seed"]) == {0, 1} and lp["split_hash"].notna().all()
    n = len(df)
    run_suite(suite, "cpu")  # rerun: every unit is skipped
    assert len(pd.read_csv(path)) == n
    md = report(path, tmp_path / "report")
    assert "random_init" in md and "± " in md
    for f in ("table.md", "table.tex", "summary.csv", "report.html", "phantom_xray_headline.png",
              "phantom_xray_linear_probe_fractions.png"):
        assert (tmp_path / "report" / f).is_file()
    assert all((tmp_path / rel).is_file() for rel in df["samples"])  # per-sample outputs beside results.csv
