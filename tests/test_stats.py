"""Bootstrap CIs, paired differences, DeLong and Holm checked against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from medvlp.benchmarks.metrics import stats
from medvlp.benchmarks.kit.protocol import auc_recipe, mean_recipe, recall_recipe

Y = np.array([[1.0], [1.0], [0.0], [0.0]])
SA = np.array([[0.9], [0.4], [0.5], [0.1]])
SB = np.array([[0.8], [0.6], [0.3], [0.2]])


def test_auc_and_weighted_auc_by_hand() -> None:
    # pairs (pos, neg): 0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1 -> 3/4
    assert stats.auc_binary(Y[:, 0], SA[:, 0]) == 0.75
    assert stats.auc_binary([1, 0, 1, 0], [0.5, 0.5, 0.7, 0.2]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)  # tie = 1/2
    W = np.array([[1, 1, 1, 1], [2, 0, 1, 1], [0, 2, 1, 1]], float)
    # resample 2 keeps only the 0.9 positive -> 1.0; resample 3 only the 0.4 positive -> 1/2
    assert stats.weighted_macro_auc(SA, Y, W).tolist() == [0.75, 1.0, 0.5]
    two = np.c_[Y, [1, 0, 1, np.nan]]  # class 2: pos 0.9, 0.5 vs neg 0.4 -> 1; NaN row ignored
    assert stats.metric_value(auc_recipe(), {"scores": np.c_[SA, SA], "labels": two}) == pytest.approx((0.75 + 1) / 2)


def test_mean_and_recall_recipes_by_hand() -> None:
    W = np.array([[1, 1, 0, 0], [0, 0, 3, 1], [1, 1, 1, 1]], float)
    ranks = {"r": np.array([0, 3, 1, 7])}  # hits at k=2: 1, 0, 1, 0
    assert stats.metric_under_weights(recall_recipe("r", 2, 4), ranks, W).tolist() == [0.5, 0.75, 0.5]
    dice = {"d": np.array([[1.0, np.nan], [0.5, 0.2], [np.nan, np.nan], [0.0, 0.4]])}
    # per class NaN-mean over images: (1 + .5 + 0)/3 = .5 and (.2 + .4)/2 = .3 -> mean .4
    assert stats.metric_value(mean_recipe("d"), dice) == pytest.approx(0.4)


def test_percentile_ci_bootstrap_p_and_holm_by_hand() -> None:
    lo, hi = stats.percentile_ci(np.arange(1, 101))
    assert (lo, hi) == pytest.approx((3.475, 97.525))  # 1 + 0.025·99, 1 + 0.975·99
    # Δ* = [-0.1, 0.2, 0.3, 0.4]: #(≤0) = 1, #(≥0) = 3 -> 2·(1+1)/(4+1) = 0.8
    assert stats.bootstrap_p(np.array([-0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.8)
    assert stats.bootstrap_p(np.full(999, 0.1)) == pytest.approx(2 / 1000)
    # sorted 0.005·4 = .02, 0.01·3 = .03, 0.03·2 = .06, 0.04·1 -> running max .06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(stats.holm([np.nan, 0.01])[0]) and stats.holm([np.nan, 0.01])[1] == 0.01


def test_delong_by_hand() -> None:
    # A: V10 = [1, .5], V01 = [.5, 1], AUC .75; B: AUC 1, V10 = V01 = [1, 1].
    # V10_A - V10_B = [0, -.5] (var .125), V01_A - V01_B = [-.5, 0] (var .125):
    # Var(Δ) = .125/2 + .125/2 = .125, Δ = -.25, z = -.7071, p = 2(1 - Φ(.7071)) = .4795
    a = [(auc_recipe(), {"scores": SA, "labels": Y})]
    b = [(auc_recipe(), {"scores": SB, "labels": Y})]
    out = stats.delong_difference(a, b)
    assert out["delta"] == pytest.approx(-0.25)
    assert out["se"] == pytest.approx(math.sqrt(0.125))
    assert out["p"] == pytest.approx(0.4795, abs=1e-4)


def test_stratified_bootstrap_keeps_positives_and_matches_normal_theory() -> None:
    labels = np.array([[1.0]] * 3 + [[0.0]] * 7)
    W = stats.bootstrap_weights(10, 200, 0, stats.label_strata(labels))
    assert (W[:, :3].sum(1) == 3).all() and (W.sum(1) == 10).all()
    assert (stats.bootstrap_weights(10, 5, 3) == stats.bootstrap_weights(10, 5, 3)).all()  # seeded
    # CI of a mean of 2,000 Bernoulli(0.3) draws ≈ p ± 1.96·sqrt(p(1-p)/n)
    rng = np.random.default_rng(0)
    hits = (rng.random(2000) < 0.3).astype(float)
    ci = stats.cell_interval([(mean_recipe("h"), {"h": hits})], n_boot=2000, seed=1)
    half = 1.959964 * math.sqrt(hits.mean() * (1 - hits.mean()) / 2000)
    assert ci["value"] == pytest.approx(hits.mean())
    assert ci["lo"] == pytest.approx(hits.mean() - half, abs=0.15 * half)
    assert ci["hi"] == pytest.approx(hits.mean() + half, abs=0.15 * half)


def test_auc_interval_is_not_frozen_by_rare_label_patterns() -> None:
    # 12 label columns, 240 samples: almost every sample has its own pattern. Pattern-only strata of one
    # sample resample themselves every time and froze the interval to (almost) zero width.
    rng = np.random.default_rng(0)
    y = (rng.random((240, 12)) < 0.3).astype(float)
    scores = y * 0.8 + rng.normal(size=y.shape)
    ci = stats.cell_interval([(auc_recipe(), {"scores": scores, "labels": y})], n_boot=400, seed=0)
    W = stats.bootstrap_weights(240, 400, 0)  # unstratified reference
    plain = stats.metric_under_weights(auc_recipe(), {"scores": scores, "labels": y}, W)
    width, plain_width = ci["hi"] - ci["lo"], np.subtract(*np.percentile(plain, [97.5, 2.5]))
    assert width > 0.5 * plain_width > 0
    strata = stats.label_strata(np.array([[1.0]] * 10 + [[0.0]] * 3 + [[2.0]] * 1))
    assert len(set(strata[:10])) == 1 and len(set(strata[10:])) == 1 and strata[0] != strata[-1]  # rare pooled


def test_delong_agrees_with_paired_bootstrap_on_a_large_synthetic_case() -> None:
    rng = np.random.default_rng(0)
    n = 1500
    y = (rng.random((n, 2)) < 0.4).astype(float)
    shared = rng.normal(size=(n, 2))
    sa = y * 1.0 + shared + 0.8 * rng.normal(size=(n, 2))
    sb = y * 0.8 + shared + 0.8 * rng.normal(size=(n, 2))
    a = [(auc_recipe(), {"scores": sa, "labels": y})]
    b = [(auc_recipe(), {"scores": sb, "labels": y})]
    dl = stats.delong_difference(a, b)
    W = stats.bootstrap_weights(n, 1000, 0, stats.label_strata(y))
    d = stats.metric_under_weights(*a[0], W) - stats.metric_under_weights(*b[0], W)
    assert dl["se"] == pytest.approx(d.std(ddof=1), rel=0.12)
    boot = stats.paired_difference(a, b, n_boot=1000, seed=0)
    assert boot["delta"] == pytest.approx(dl["delta"])
    assert boot["lo"] == pytest.approx(dl["lo"], abs=0.01) and boot["hi"] == pytest.approx(dl["hi"], abs=0.01)
    assert boot["p"] < 0.05 and dl["p"] < 0.05


def _synthetic_results(path) -> None:
    from medvlp.benchmarks.suite.results import ResultStore

    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random((n, 3)) < 0.3).astype(np.float32)
    ids = np.array([f"s{i}" for i in range(n)])
    store = ResultStore(path)
    for label, signal, ckpt in (("random_init", 0.0, "random-init"), ("good", 1.5, "x.ckpt"), ("same", 0.05, "y.ckpt")):
        for seed in (0, 1):
            scores = y * signal + rng.normal(size=y.shape)
            store.add([dict(label=label, method="clip", checkpoint=ckpt, dataset="d", protocol="linear_probe",
                            protocol_name="linear_probe", params="{}", fraction=1.0, seed=seed, subset_seed=seed,
                            metric="auc", value=0.5, definition="probe", weights=label)],
                      {"ids": ids, "scores": scores, "labels": y, "class_names": np.array(["a", "b", "c"])},
                      {"auc": auc_recipe()})
        store.add([dict(label=label, checkpoint=ckpt, dataset="d", protocol="instance_voi", protocol_name="instance_voi",
                        params="{}", fraction=1.0, seed=0, metric="voi", value=2.7, definition="voi", weights=label,
                        flags="degenerate: no boundary")],
                  {"ids": ids[:4], "voi": np.full(4, 2.7)}, {"voi": mean_recipe("voi", higher_is_better=False)})


def test_report_headline_marks_significance_withholds_degenerate_and_html_is_self_contained(tmp_path) -> None:
    from html.parser import HTMLParser

    import pandas as pd

    from medvlp.benchmarks.report.tables import report

    _synthetic_results(tmp_path / "results.csv")
    md = report(tmp_path / "results.csv", n_boot=300)
    head = md[: md.index("## Differences")]
    row = {line.split("|")[1].strip(): line for line in head.splitlines() if line.startswith("| ")}
    assert "†" in row["good"] and "**" in row["good"] and "†" not in row["same"]
    assert "⚠ withheld" in row["good"] and "(2 seeds)" in row["good"] and "(N=300)" in head
    comp = pd.read_csv(tmp_path / "comparisons.csv")
    good = comp[comp.label == "good"].iloc[0]
    assert good["p_delong"] < 1e-6 and good["significant"] and good["lo"] > 0
    assert set(comp["metric"]) == {"auc"}  # degenerate VOI cells are not compared

    class Check(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack, self.tags, self.links = [], [], []

        def handle_starttag(self, tag, attrs) -> None:
            self.tags.append(tag)
            self.links += [v for k, v in attrs if k in ("src", "href")]
            if tag not in ("meta", "img", "br"):
                self.stack.append(tag)

        def handle_endtag(self, tag) -> None:
            assert self.stack.pop() == tag

    page = (tmp_path / "report.html").read_text()
    checker = Check()
    checker.feed(page)
    assert not checker.stack and checker.tags.count("table") >= 3 and checker.tags.count("img") >= 1
    assert checker.links and all(link.startswith("data:image/png;base64,") for link in checker.links)
    assert "http://" not in page and "https://" not in page


def test_per_image_segmentation_outputs_reproduce_every_dice_definition() -> None:
    import torch

    from medvlp.benchmarks.metrics.dice import DEFINITIONS, dice_score
    from medvlp.benchmarks.protocols.segmentation import dice_areas, per_image_dice

    g = torch.Generator().manual_seed(0)
    target = (torch.rand(6, 1, 8, 8, generator=g) > 0.7).long() * torch.randint(1, 3, (6, 1, 8, 8), generator=g)
    target[0] = 0  # an image with empty ground truth
    pred = (torch.rand(6, 1, 8, 8, generator=g) > 0.6).long() * torch.randint(1, 3, (6, 1, 8, 8), generator=g)
    for d in DEFINITIONS:
        if d.startswith("mmseg_dataset"):
            num, den = dice_areas(pred, target, 3, background=d == "mmseg_dataset")
            recipe, arrays = {"kind": "ratio", "num": "n", "den": "d"}, {"n": num, "d": den}
        else:
            recipe, arrays = mean_recipe("v"), {"v": per_image_dice(pred, target, 3, d)}
        assert stats.metric_value(recipe, arrays) == pytest.approx(dice_score(pred, target, 3, d), abs=1e-6), d


def test_voi_at_the_single_instance_baseline_is_flagged_degenerate() -> None:
    from medvlp.benchmarks.protocols.segmentation import degenerate_voi_flags, voi

    target = np.repeat(np.arange(1, 5), 4).reshape(4, 4)  # 4 instances
    baseline = sum(voi(np.ones_like(target), target))  # split 0, merge = H(target) = ln 4
    assert baseline == pytest.approx(math.log(4))
    assert degenerate_voi_flags(baseline + 0.001, baseline)[0].startswith("degenerate")
    assert degenerate_voi_flags(sum(voi(target, target)), baseline) == []


def test_instance_voi_run_flags_a_decoder_without_boundaries_and_stores_per_volume_values(monkeypatch) -> None:
    import torch

    from medvlp.benchmarks.protocols.segmentation import InstanceVOI

    inst = torch.from_numpy(np.repeat(np.arange(1, 5), 16).reshape(1, 1, 4, 4, 4)).repeat(2, 1, 1, 1, 1)
    prob = torch.zeros(2, 2, 4, 4, 4)
    prob[:, 0] = 1.0  # background everywhere: no boundary predicted
    out = {"instances": inst, "ids": ["a", "b"], "split_hash": "h", "how": "test"}
    proto = InstanceVOI()
    monkeypatch.setattr(proto, "fit_stream", lambda ctx, f, s: {**out, "batches": iter([([0, 1], None, prob)])})
    res = proto.run(None)
    assert res.flags and res.flags[0].startswith("degenerate")
    assert res.samples["voi"] == pytest.approx([math.log(4)] * 2)
    assert stats.metric_value(res.recipes["voi"], res.samples) == pytest.approx(res.values[0].value)
    prob[:, 1, :, :, 0] = 1.0  # a boundary plane between every pair of instances along the last axis
    prob[:, 0, :, :, 0] = 0.0
    assert proto.run(None).flags == []
