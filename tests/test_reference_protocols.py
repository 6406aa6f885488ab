"""Reference evaluation protocols: the properties that define each one, on fixtures and tiny models."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medvlp.benchmarks.kit.features import FeatureCache
from medvlp.benchmarks.kit.protocol import EvalContext
from tests.conftest import build_tiny


@pytest.fixture(scope="module")
def tiny_xray():
    torch.manual_seed(0)
    model, dm = build_tiny("clip")
    return model.eval(), dm


def _ctx(model, dm, tmp_path, **params):
    return EvalContext(model, dm, FeatureCache(None), params, "cpu", tmp_path)


def _recomputes(res) -> set[str]:
    """Every metric with a recipe equals its value recomputed from the stored per-sample arrays (what the
    report's CIs resample); returns the metrics that have one."""
    from medvlp.benchmarks.metrics import stats

    ids = res.samples["ids"]
    for v in res.values:
        if v.metric in res.recipes:
            recipe = res.recipes[v.metric]
            assert stats.n_samples(recipe, res.samples) == len(ids), v.metric
            assert stats.metric_value(recipe, res.samples) == pytest.approx(v.value, abs=1e-6), v.metric
    return set(res.recipes)


# ----------------------------------------------------------------------------- splits
def test_mgca_fraction_is_pandas_sample_random_state_42() -> None:
    from medvlp.benchmarks.kit.splits import mgca_fraction_ids

    ids = [f"id{i}" for i in range(200)]
    expected = pd.DataFrame({"id": ids}).sample(frac=0.1, random_state=42)["id"].tolist()
    assert mgca_fraction_ids(ids, 0.1) == expected and len(expected) == 20
    assert mgca_fraction_ids(ids, 1.0) == ids


def test_benchx_subset_file_is_honoured_by_basename(tmp_path) -> None:
    from medvlp.benchmarks.kit.splits import select_fraction

    ids = [f"images/{i:08d}_000.png" for i in range(10)]
    f = tmp_path / "train_1.txt"
    f.write_text("00000003_000.png 0 1 0\n00000007_000.png 1 0 0\n")  # BenchX: name + labels
    rows, h, how = select_fraction(ids, 0.01, 0, "file", {1: str(f)}, tmp_path / "splits")
    assert rows == [3, 7] and "train_1.txt" in how
    assert (tmp_path / "splits" / "file_0.01_s0.txt").read_text().split() == [ids[3], ids[7]]
    f.write_text("not_there.png 0\n")
    with pytest.raises(ValueError, match="train_1.txt: 1 listed ids not in the train split"):
        select_fraction(ids, 0.01, 0, "file", {"1": str(f)})


# ----------------------------------------------------------------------------- shared loop
def test_head_loop_restores_best_validation_weights_and_stops_early() -> None:
    from medvlp.benchmarks.kit.head_loop import HeadTrainer, fit

    head = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(head.weight)
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    # each step moves the weight by +1; validation loss is best when the weight is 2
    trainer = HeadTrainer([head], opt, lambda e: [None], lambda b: -head.weight.sum(),
                          lambda: {"val_loss": float((head.weight.item() - 2) ** 2)}, max_epochs=20, patience=3)
    res = fit(trainer)
    assert res.best_epoch == 1 and head.weight.item() == pytest.approx(2.0)
    assert res.epochs_run == 5  # epochs 2, 3, 4 without improvement → stop


# ----------------------------------------------------------------------------- MGCA linear
def test_mgca_linear_builds_the_reference_trainer(tiny_xray, tmp_path) -> None:
    from medvlp.benchmarks.reference.mgca_linear import MGCALinear

    model, dm = tiny_xray
    proto = MGCALinear()
    ctx = _ctx(model, dm, tmp_path, resize=32, crop=24, max_epochs=2)
    trainer, parts = proto.build(ctx, 0.5, 0)
    opt = trainer.optimizer
    assert type(opt) is torch.optim.AdamW and trainer.scheduler is None
    g = opt.param_groups[0]
    assert len(opt.param_groups) == 1 and g["lr"] == 5e-4 and g["weight_decay"] == 1e-6
    assert {id(p) for p in g["params"]} == {id(p) for p in parts["head"].parameters()}  # encoder frozen
    assert isinstance(parts["head"], torch.nn.Linear)
    assert (trainer.monitor, trainer.mode, trainer.patience, trainer.max_epochs) == ("val_loss", "min", 10, 2)
    # fraction: MGCA's df.sample over the train ids, materialised as an id file
    from medvlp.benchmarks.kit.views import split_ids

    ids = split_ids(dm, "train")
    expected = pd.Series(ids).sample(frac=0.5, random_state=42).tolist()
    assert [ids[r] for r in trainer.info["rows"]] == expected
    files = list((tmp_path / "splits").rglob("mgca_0.5_s0.txt"))
    assert len(files) == 1 and sorted(files[0].read_text().split()) == sorted(expected)
    # train view: random 24-crop that differs between draws; eval view: the deterministic center crop
    x = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32).repeat(4, 1, 1, 1)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a, b = proto.view(ctx, x, True, g1), proto.view(ctx, x, True, g2)
    assert a.shape == (4, 1, 24, 24) and not torch.equal(a, b)
    c1, c2 = proto.view(ctx, x, False, g1), proto.view(ctx, x, False, g2)
    assert torch.equal(c1, c2)
    # MGCA normalisation (v − 0.5)/0.5 from the datamodule's (0.5, 0.25)
    assert torch.allclose(c1, ((x * 0.25 + 0.5 - 0.5) / 0.5)[..., 4:28, 4:28])
    with pytest.raises(ValueError, match="set the datamodule's image_size to 256"):
        proto.view(_ctx(model, dm, tmp_path), x, False, g1)


def test_mgca_linear_runs_and_reports_variant(tiny_xray, tmp_path) -> None:
    from medvlp.benchmarks.reference.mgca_linear import MGCALinear

    model, dm = tiny_xray
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = MGCALinear().run(_ctx(model, dm, tmp_path, resize=32, crop=24, max_epochs=3, patience=1), 1.0, 0)
    vals = {v.metric: v.value for v in res.values}
    assert 0 <= vals["auc"] <= 1 and "best-val epoch" in res.values[0].definition
    assert res.comparability["protocol_variant"] == "mgca_linear" and res.comparability["fraction_source"] == "mgca"
    assert res.comparability["selection"] == "best_val"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # encoder untouched
    assert _recomputes(res) == {"auc"} and len(res.samples["ids"]) == len(dm.dataset("test", augment=False))


def test_mgca_linear_uses_cross_entropy_for_one_hot_labels(tmp_path) -> None:
    from medvlp.benchmarks.reference.mgca_linear import MGCALinear
    from medvlp.datamodules.xray.chest import COVIDxDataModule
    from tests.fixtures import make_covidx

    root = make_covidx(tmp_path / "covidx")
    dm = COVIDxDataModule(str(root), image_size=32, batch_size=4)
    torch.manual_seed(0)
    model, _ = build_tiny("clip")
    proto = MGCALinear()
    if proto.applicable(_ctx(model, dm, tmp_path)):
        pytest.skip("fixture has no validation rows")
    trainer, parts = proto.build(_ctx(model, dm, tmp_path, resize=32, crop=24, max_epochs=1), 1.0, 0)
    assert trainer.info["multiclass"]
    batch = next(iter(trainer.train_batches(0)))
    logits = parts["logits_of"](batch, False)
    y = batch["labels"].float()
    assert float(parts["loss_of"](logits, y).detach()) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y.argmax(1)).detach()))
    res = proto.run(_ctx(model, dm, tmp_path, resize=32, crop=24, max_epochs=1), 1.0, 0)
    assert _recomputes(res) == {"auc", "acc"}  # accuracy = mean of per-sample correctness


# ----------------------------------------------------------------------------- zero-shot / retrieval
class _StubFeatures:
    def __init__(self, feats):
        self.feats = feats

    def get(self, *a, **k):
        return self.feats


class _StubDM:
    label_names = ["a", "b", "c"]

    def class_prompts(self):
        return {"a": ["pa1", "pa2"], "b": ["pb"], "c": ["pc"]}

    def negative_prompts(self):
        return {n: [f"no {n}"] for n in self.label_names}


class _StubModel:
    table = {"pa1": [1, 0, 0], "pa2": [0.6, 0.8, 0], "pb": [0, 1, 0], "pc": [0, 0, 1],
             "no a": [0, 1, 1], "no b": [1, 0, 1], "no c": [1, 1, 0]}

    def encode_text(self, texts):
        return torch.nn.functional.normalize(torch.tensor([self.table[t] for t in texts], dtype=torch.float32), dim=-1)

    def zero_shot_classifier(self, prompts):
        return torch.stack([torch.nn.functional.normalize(self.encode_text(p).mean(0), dim=-1) for p in prompts.values()])


def _zs_features():
    from medvlp.benchmarks.kit.features import Features

    img = np.array([[1, 0.1, 0], [0.1, 1, 0], [0, 0.2, 1], [0.9, 0, 0.3], [0, 0.1, 1], [0.2, 1, 0.1]], np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]  # not every image is nearest its own class
    n = len(img)
    return Features(img, img, np.full_like(img, np.nan), labels, [str(i) for i in range(n)], [""] * n)


def test_zero_shot_argmax_is_gloria_max_over_prompts_zscored(tmp_path) -> None:
    from medvlp.benchmarks.protocols.zero_shot import ZeroShotArgmax

    feats = _zs_features()
    ctx = EvalContext(_StubModel(), _StubDM(), _StubFeatures(feats), {}, "cpu", tmp_path)
    vals = {v.metric: v.value for v in ZeroShotArgmax().run(ctx).values}
    # by hand: max cosine over each class's prompts, z-score per class column, arg-max
    t = {k: _StubModel().encode_text(v).numpy() for k, v in _StubDM().class_prompts().items()}
    sim = np.stack([(feats.image_embedding @ t[k].T).max(1) for k in "abc"], 1)
    sim = (sim - sim.mean(0)) / sim.std(0)
    expected = float((sim.argmax(1) == feats.labels.argmax(1)).mean())
    assert vals["acc"] == pytest.approx(expected) and expected == pytest.approx(4 / 6)
    assert {"f1_macro", "max_f1", "auc"} <= set(vals)


def test_zero_shot_softmax_branch_is_reachable_without_negated_prompts(tmp_path) -> None:
    from medvlp.benchmarks.protocols.zero_shot import ZeroShot

    ctx = EvalContext(_StubModel(), _StubDM(), _StubFeatures(_zs_features()), {"negatives": False}, "cpu", tmp_path)
    res = ZeroShot().run(ctx)
    assert "softmax over class prompts" in res.values[0].definition
    ctx.params = {}
    assert "negated prompt" in ZeroShot().run(ctx).values[0].definition


def test_category_retrieval_precision_and_hit_at_k() -> None:
    from medvlp.benchmarks.protocols.retrieval import hit_at_k, label_precision_at_k

    labels = np.eye(2)[[0, 0, 1, 1]]
    sim = np.array([[0, 1, .9, .8], [1, 0, .9, .8], [.9, .8, 0, 1], [.9, .8, 1, 0]], float)
    hits = hit_at_k(sim, labels, (1, 2, 3))
    prec, _ = label_precision_at_k(sim, labels, (1, 2, 3))
    # query 0 ranks [1 (same), 2, 3, 0]: every query finds its class-mate at rank 1
    assert hits == {1: 1.0, 2: 1.0, 3: 1.0} and prec[2] == pytest.approx(0.5)


def test_retrieval_on_dataset_without_text_is_skipped_not_raised(tmp_path) -> None:
    from medvlp.benchmarks.suite.runner import run_suite

    root = __import__("tests.fixtures", fromlist=["make_covidx"]).make_covidx(tmp_path / "covidx")
    suite = {"name": "t", "output": str(tmp_path / "out"), "preset": "tiny",
             "methods": {"random_init": {"method": "clip", "pretrain": False}},
             "datasets": {"covidx": {"name": "covidx", "init_args": {"root": str(root), "image_size": 32}}},
             "protocols": {"retrieval": {}, "category_retrieval": {}, "zero_shot_argmax": {}}}
    df = pd.read_csv(run_suite(suite, "cpu"))
    assert set(df["protocol"]) == {"zero_shot_argmax"}  # both retrieval protocols skipped with a reason
    comp = __import__("json").loads(df["comparability"].iloc[0])
    assert comp["protocol_variant"] == "gloria_argmax" and comp["dataset_class"] == "COVIDxDataModule"
    assert comp["method_class"] == "CLIP" and comp["pretrain_data"] == "none"


# ----------------------------------------------------------------------------- splits as the references
def test_rsna_mgca_split_is_the_classification_split_70_15_15(tmp_path) -> None:
    from sklearn.model_selection import train_test_split

    from medvlp.datamodules.xray.chest import RSNAPneumoniaDataModule
    from tests.fixtures import make_rsna

    root = make_rsna(tmp_path / "rsna", n=20)
    recs = RSNAPneumoniaDataModule(str(root), split_convention="mgca").records
    ids = sorted(r["id"] for r in RSNAPneumoniaDataModule(str(root)).index())
    _, hold = train_test_split(ids, test_size=0.3, random_state=0)
    test, val = train_test_split(hold, test_size=0.5, random_state=0)
    assert sorted(r["id"] for r in recs("test")) == sorted(test) and sorted(r["id"] for r in recs("val")) == sorted(val)
    assert (len(recs("train")), len(recs("val")), len(recs("test"))) == (14, 3, 3)
    det = RSNAPneumoniaDataModule(str(root), split_convention="mgca_detection").records
    assert len(det("train")) == 10  # test_size 5337·2 capped at half the patients


def test_covidx_asg_split_holds_out_ten_percent_for_validation(tmp_path) -> None:
    from medvlp.datamodules.xray.chest import COVIDxDataModule
    from tests.fixtures import make_covidx

    root = make_covidx(tmp_path / "covidx")
    dm = COVIDxDataModule(str(root), split_convention="asg")
    assert (len(dm.records("train")), len(dm.records("val"))) == (9, 1)


# ----------------------------------------------------------------------------- paper view
def _result_rows(fields: dict, label: str = "asg", dataset: str = "chexpert", values=(0.88, 0.90)) -> pd.DataFrame:
    import json

    return pd.DataFrame([{"label": label, "method": "asg", "dataset": dataset, "protocol": "mgca_linear",
                          "fraction": 0.01, "seed": s, "metric": "auc", "value": v,
                          "comparability": json.dumps(fields)} for s, v in enumerate(values)])


def test_paper_view_fills_only_comparable_rows() -> None:
    from medvlp.benchmarks.suite.paper_view import paper_numbers, paper_table

    row = next(r for r in paper_numbers() if r["method"] == "asg" and r["dataset"] == "chexpert")
    good = {k: row[k] for k in ("protocol_variant", "split_convention", "fraction_source", "dataset_class",
                                "method_class", "backbone", "pretrain_data")}
    md = paper_table(_result_rows(good), [row])
    assert "| 87.9 | 89.0 ± 1.4 (n=2, asg) | yes |" in md
    # the example: a demo CLIP on phantom data under the key "chexpert", labelled "asg"
    bad = {**good, "method_class": "CLIP", "dataset_class": "PhantomDataModule", "protocol_variant": "fast",
           "backbone": "ViT(d32,L1)/8"}
    md = paper_table(_result_rows(bad), [row])
    line = next(ln for ln in md.splitlines() if "| 0.01 |" in ln)
    assert "| — | no: asg/chexpert:" in line and "method_class CLIP ≠ ASG" in line and "88." not in line


def test_report_paper_on_phantom_results_shows_no_paper_number_next_to_a_phantom_number(tmp_path) -> None:
    from medvlp.benchmarks.suite.runner import load_suite, run_suite
    from medvlp.benchmarks.report.tables import report

    suite = load_suite("smoke", [f"output={tmp_path}", "protocols={linear_probe: {fractions: [0.01, 1.0], seeds: [0]}}"])
    # label the phantom runs like the paper rows to tempt a wrong match
    suite["methods"] = {"asg": {"method": "clip", "pretrain": False}}
    suite["datasets"] = {"chexpert": suite["datasets"]["phantom_xray"]}
    path = run_suite(suite, "cpu")
    report(path, tmp_path / "rep", plots=False, paper=True)
    lines = [ln for ln in (tmp_path / "rep" / "paper_table.md").read_text().splitlines()[2:]]
    assert lines and all("| — | no" in ln for ln in lines)
    assert any("dataset_class PhantomDataModule ≠ CheXpertDataModule" in ln for ln in lines)


def test_mmseg_dataset_dice_sums_areas_over_the_dataset() -> None:
    from medvlp.benchmarks.metrics.dice import dice_score

    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, 0, :2, :2] = 1  # 4 px, prediction 8 px with 4 overlapping
    pred[0, 0, :2, :4] = 1
    target[1, 0, 0, 0] = 1  # 1 px, missed
    # foreground: dataset level 2·4/(8+5) — not the per-image mean (8/12 + 0)/2
    assert dice_score(pred, target, 2, "mmseg_dataset_foreground") == pytest.approx(8 / 13)
    assert dice_score(pred, target, 2, "foreground") == pytest.approx((8 / 12 + 0) / 2)
    bg_pred, bg_true = 32 - 8, 32 - 5
    bg = 2 * (32 - 9) / (bg_pred + bg_true)  # background overlap: pixels that are 0 in both
    assert dice_score(pred, target, 2, "mmseg_dataset") == pytest.approx((bg + 8 / 13) / 2)


# ----------------------------------------------------------------------------- MGCA segmentation
def test_mgca_mixed_loss_matches_mgca_formula() -> None:
    from medvlp.benchmarks.reference.mgca_segmentation import mgca_mixed_loss

    torch.manual_seed(0)
    x, t = torch.randn(2, 8, 8) * 3, (torch.rand(2, 8, 8) > 0.7).float()
    # MGCA FocalLoss (max_val form) and dice_loss written out
    max_val = (-x).clamp(min=0)
    bce = x - x * t + max_val + ((-max_val).exp() + (-x - max_val).exp()).log()
    focal = ((torch.nn.functional.logsigmoid(-x * (t * 2 - 1)) * 2.0).exp() * bce).mean()
    p = torch.sigmoid(x)
    dice = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert float(mgca_mixed_loss(x, t)) == pytest.approx(float(10 * focal - torch.log(dice)), rel=1e-5)


@pytest.fixture(scope="module")
def siim_dm(tmp_path_factory):
    from medvlp.datamodules.xray.chest import SIIMDataModule
    from tests.fixtures import make_siim

    root = make_siim(tmp_path_factory.mktemp("siim") / "siim", n=24)
    return SIIMDataModule(str(root), image_size=32, batch_size=4)


def test_mgca_segmentation_builds_the_reference_trainer(siim_dm, tmp_path) -> None:
    from medvlp.benchmarks.reference.mgca_segmentation import MGCASegmentation, SETRDecoder

    torch.manual_seed(0)
    model, _ = build_tiny("clip")
    dm = siim_dm
    proto = MGCASegmentation()
    ctx = _ctx(model, dm, tmp_path, image_size=32, balance=1, max_epochs=1)
    trainer, parts = proto.build(ctx, 1.0, 0)
    g = trainer.optimizer.param_groups[0]
    # run_seg_finetune.sh / README: lr 5e-4; batch 8 on SIIM (16 on RSNA)
    assert type(trainer.optimizer) is torch.optim.AdamW and (g["lr"], g["weight_decay"]) == (5e-4, 0.05)
    assert trainer.info["batch_size"] == 8
    assert {id(q) for q in g["params"]} == {id(q) for q in parts["decoder"].parameters()}  # encoder frozen
    dec = parts["decoder"]
    assert isinstance(dec, SETRDecoder)
    assert [m.out_channels for m in dec.decoder if isinstance(m, torch.nn.Conv2d)] == [512, 256, 128, 64]
    assert (trainer.monitor, trainer.patience) == ("val_loss", 10)
    # SIIM training set balanced 1:1
    recs = dm.dataset("train", augment=False).records
    pos = [bool(recs[r]["labels"][0]) for r in trainer.info["rows"]]
    all_pos = sum(bool(r["labels"][0]) for r in recs)
    assert sum(pos) == all_pos and len(pos) - sum(pos) == min(all_pos, len(recs) - all_pos) > 0
    # augmentation on train only
    batch = next(iter(subset_loader_for(dm)))
    xs = [parts["view"](batch, True)[0] for _ in range(4)]
    assert any(not torch.equal(xs[0], x) for x in xs[1:])
    assert torch.equal(parts["view"](batch, False)[0], parts["view"](batch, False)[0])


def subset_loader_for(dm):
    from medvlp.benchmarks.kit.views import subset_loader

    return subset_loader(dm, "train", None, 4, False, 0)


def test_mgca_segmentation_runs_with_the_mgca_dice(siim_dm, tmp_path) -> None:
    from medvlp.benchmarks.reference.mgca_segmentation import MGCASegmentation

    torch.manual_seed(0)
    model, _ = build_tiny("clip")
    res = MGCASegmentation().run(_ctx(model, siim_dm, tmp_path, image_size=32, max_epochs=2, features=[16, 16, 8, 8]), 0.5, 0)
    vals = {v.metric: v.value for v in res.values}
    assert 0 <= vals["dice_mgca_per_image"] <= 1 and res.values[0].definition.startswith("MGCA per-image")
    assert res.comparability["protocol_variant"] == "mgca_segmentation" and res.comparability["selection"] == "best_val"
    assert _recomputes(res) == set(vals)
    assert list((tmp_path / "splits").rglob("mgca_seg_0.5_s0.txt"))


# ----------------------------------------------------------------------------- BenchX
def test_benchx_finetune_builds_the_reference_trainer(tiny_xray, tmp_path) -> None:
    from medvlp.benchmarks.reference.benchx import BenchXFinetune
    from medvlp.benchmarks.kit.views import split_ids

    model, dm = tiny_xray
    ids = split_ids(dm, "train")
    subset = tmp_path / "train_1.txt"
    subset.write_text("".join(f"{i} 0 1\n" for i in ids[:3]))  # BenchX layout: image + labels
    proto = BenchXFinetune()
    ctx = _ctx(model, dm, tmp_path, crop=24, fraction_files={1: str(subset)})
    trainer, parts = proto.build(ctx, 0.01, 42)
    opt = trainer.optimizer
    assert type(opt) is torch.optim.SGD and [g["initial_lr"] for g in opt.param_groups] == [1e-2, pytest.approx(1e-3)]
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    enc = {id(q) for q in parts["model"].image_backbone().parameters()}
    assert {id(q) for q in opt.param_groups[1]["params"]} == enc  # the encoder trains (×0.1)
    lam = trainer.scheduler.lr_lambdas[0]  # BenchX's periodic factor (see test_benchx_lr_factor_is_not_clamped)
    assert lam(0) == 0.0 and lam(25) == pytest.approx(0.5) and lam(3000) == pytest.approx(0.0)
    assert lam(5950) == pytest.approx(1.0)
    assert (trainer.grad_clip, trainer.monitor, trainer.mode) == (1.0, "val_auc", "max")
    # BenchX's loop runs range(0, epochs + 1) = 201 epochs for epochs: 200
    assert (trainer.eval_start, trainer.eval_interval, trainer.patience, trainer.max_epochs) == (10, 5, 10, 201)
    head = parts["head"]  # BenchX Classifier: LayerNorm(eps 1e-6), trunc_normal_(std 2e-5)
    assert head.norm.eps == 1e-6 and float(head.fc.weight.std()) < 1e-4
    assert [ids[r] for r in trainer.info["rows"]] == ids[:3]  # BenchX subset file honoured
    x = torch.randn(4, 1, 32, 32)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    assert proto.view(ctx, x, True, g1).shape == (4, 1, 24, 24)
    assert not torch.equal(proto.view(ctx, x, True, g1), proto.view(ctx, x, True, g2))
    assert torch.equal(proto.view(ctx, x, False, g1), proto.view(ctx, x, False, g2))
    with pytest.raises(ValueError, match="no file for 10 % labels"):
        proto.build(ctx, 0.1, 42)


def test_benchx_finetune_selects_on_validation_auroc(tiny_xray, tmp_path) -> None:
    from medvlp.benchmarks.reference.benchx import BenchXFinetune

    model, dm = tiny_xray
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = BenchXFinetune().run(_ctx(model, dm, tmp_path, crop=24, max_epochs=2, eval_start=1, eval_interval=1,
                                    batch_size=8), 1.0, 0)
    assert 0 <= res.values[0].value <= 1 and "best-val epoch" in res.values[0].definition
    assert res.comparability["protocol_variant"] == "benchx_finetune"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was fine-tuned
    assert res.comparability["selection"] == "best_val" and _recomputes(res) == {"auc"}


# ----------------------------------------------------------------------------- NIH ChestX-ray14
def make_nih(root, n: int = 20):
    """NIH ChestX-ray14 in its published layout (Kaggle image folders)."""
    from tests.fixtures import write_jpg

    findings = ["No Finding", "Atelectasis|Effusion", "Hernia", "Mass"]
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"]
    names = []
    for i in range(n):
        name = f"{i // 2:08d}_{i % 2:03d}.png"
        names.append(name)
        write_jpg(root / f"images_{1 + i % 2:03d}" / "images" / name)
        rows.append(f"{name},{findings[i % 4]},{i % 2},{i // 2},50,M,PA")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(names[:16]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[16:]) + "\n")
    return root


def test_nih_datamodule_reads_the_published_layout(tmp_path) -> None:
    from medvlp.datamodules.xray.nih import NIH_14, NIHChestXray14DataModule

    root = make_nih(tmp_path / "nih")
    dm = NIHChestXray14DataModule(str(root), image_size=32, val_fraction=0.25)
    recs = {s: dm.records(s) for s in ("train", "val", "test")}
    assert len(recs["test"]) == 4 and len(recs["train"]) + len(recs["val"]) == 16 and recs["val"]
    pid = lambda r: r["id"].split("_")[0]  # noqa: E731
    assert not {pid(r) for r in recs["train"]} & {pid(r) for r in recs["val"]}  # patient-level val split
    r1 = next(r for r in recs["train"] + recs["val"] if r["id"] == "00000000_001.png")
    assert [NIH_14[k] for k in np.flatnonzero(r1["labels"])] == ["Atelectasis", "Effusion"]
    batch = next(iter(dm.eval_dataloader("test", 4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["labels"].shape == (4, 14)
    (root / "Data_Entry_2017.csv").write_text((root / "Data_Entry_2017.csv").read_text().replace("Hernia", "Hernai"))
    from medvlp.datamodules.io.readers import DataError

    with pytest.raises(DataError, match="unknown finding"):
        NIHChestXray14DataModule(str(root)).records("train")


# ----------------------------------------------------------------------------- MIMIC 5x200
def test_five_by_200_builder_keeps_single_class_rows() -> None:
    from medvlp.datamodules.xray.mimic_5x200 import five_by_200
    from medvlp.datamodules.io.readers import DataError
    from medvlp.datamodules.xray.chest import CHEXPERT_5, CHEXPERT_14

    lab = np.zeros((30, 14), np.float32)
    for i in range(30):
        lab[i, CHEXPERT_14.index(CHEXPERT_5[i % 5])] = 1
    lab[0, CHEXPERT_14.index("Pneumothorax")] = 1  # excluded: another finding
    lab[5, CHEXPERT_14.index("No Finding")] = 1  # kept: No Finding is ignored, as GLoRIA
    chosen = five_by_200(lab, per_class=3, seed=0)
    assert len(chosen) == 15 and 0 not in {r for r, _ in chosen}
    assert all(lab[r, CHEXPERT_14.index(c)] == 1 for r, c in chosen)
    with pytest.raises(DataError, match="class 'Atelectasis' has only 5"):
        five_by_200(lab, per_class=6)


def test_mimic_5x200_from_benchx_ids_feeds_category_retrieval(tmp_path) -> None:
    from medvlp.benchmarks.protocols.retrieval import CategoryRetrieval
    from medvlp.datamodules.xray.mimic_5x200 import MIMIC5x200DataModule
    from tests.fixtures import make_mimic

    root = make_mimic(tmp_path / "mimic", n=12)
    ids = ["00000001", "00000002", "00000003", "00000004", "00000005"]
    full = [f"{i}-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd" for i in ids]
    (tmp_path / "ids.csv").write_text("Path,dicom_id,subject_id,study_id,Report\n" +
                                      "".join(f"x,{d},0,0,r\n" for d in full))
    dm = MIMIC5x200DataModule(str(root), ids_file=str(tmp_path / "ids.csv"), image_size=32, batch_size=4)
    test = dm.records("test")
    assert sorted(r["id"] for r in test) == sorted(full) and all(r["labels"].sum() == 1 for r in test)
    assert not {r["id"] for r in dm.records("train")} & set(full) and all(r["text"] for r in test)
    torch.manual_seed(0)
    model, _ = build_tiny("clip")
    res = CategoryRetrieval().run(_ctx(model, dm, tmp_path, ks=[1, 5]))
    vals = {v.metric: v.value for v in res.values}
    assert vals["i2t_Hit@5"] == 1.0 and vals["i2t_P@5"] == pytest.approx(0.2)  # 5 classes, one image each
    assert _recomputes(res) == set(vals)  # P@K and Hit@K: means over queries
    assert res.samples["t2i_P@5"].shape == (5,)


# ----------------------------------------------------------------------------- paper suites
PAPER_SUITES = ["paper_mgca_linear", "paper_mgca_segmentation", "paper_benchx", "paper_gtgm_seg3d", "paper_unimedi"]


def _fixture_roots(tmp_path):
    from tests.fixtures import make_chexpert, make_covidx, make_mimic, make_rsna, make_siim

    mimic = make_mimic(tmp_path / "mimic", n=12)
    ids = tmp_path / "mimic_5x200_ids.csv"
    ids.write_text("dicom_id\n" + "".join(f"{i:08x}-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd\n" for i in range(1, 6)))
    nih = make_nih(tmp_path / "nih")
    for name, lines in (("train_list.txt", range(0, 12)), ("val_list.txt", range(12, 16)), ("test_list.txt", range(16, 20))):
        (nih / name).write_text("".join(f"{i // 2:08d}_{i % 2:03d}.png 0\n" for i in lines))
    (nih / "train_1.txt").write_text("00000000_000.png 0\n00000000_001.png 0\n")
    (nih / "train_10.txt").write_text("00000001_000.png 0\n00000001_001.png 0\n00000002_000.png 0\n")
    from tests.fixtures import make_btcv, make_cc_ccii, make_msd

    msd = make_msd(tmp_path / "msd", n=10)
    return {"msd": msd, "cc_ccii": make_cc_ccii(tmp_path / "cc_ccii", n_patients=5),
            "btcv": make_btcv(tmp_path / "btcv", n=6, layout="monai"), "chexpert": make_chexpert(tmp_path / "chex", n=12), "rsna": make_rsna(tmp_path / "rsna", n=40),
            "covidx": make_covidx(tmp_path / "covidx"), "nih": nih, "siim": make_siim(tmp_path / "siim", n=16),
            "mimic": mimic, "mimic_ids": ids}


def test_paper_suites_run_one_step_on_fixtures_in_published_layouts(tmp_path) -> None:
    """Every paper suite loads, takes dataset roots as overrides and runs each protocol once (tiny
    encoder, one epoch, small images) on the fixtures."""
    from medvlp.benchmarks.suite.runner import load_suite, run_suite

    roots = _fixture_roots(tmp_path)
    key_root = {"chexpert": "chexpert", "chexpert_5x200": "chexpert", "rsna": "rsna", "covidx": "covidx",
                "nih": "nih", "siim": "siim", "mimic_5x200": "mimic", "msd_liver": "msd", "msd_lung": "msd",
                "msd_pancreas": "msd", "msd_heart": "msd", "btcv": "btcv", "bcv": "btcv", "rsna_seg": "rsna",
                "cc_ccii": "cc_ccii"}
    for name in PAPER_SUITES:
        raw = load_suite(name)
        overrides = [f"output={tmp_path / name}", "preset=tiny"]
        for key in raw["datasets"]:
            overrides.append(f"datasets.{key}.init_args.root={roots[key_root[key]]}")
            overrides.append(f"datasets.{key}.init_args.volume_size=[8,16,16]" if key.startswith(("msd", "btcv", "bcv", "cc_ccii"))
                             else f"datasets.{key}.init_args.image_size=32")
            if key.startswith("chexpert"):  # MGCA's CheXpert split removes a 5x200 set the fixture cannot hold
                overrides += [f"datasets.{key}.init_args.val_size=3", f"datasets.{key}.init_args.split_convention=hash"]
            if key == "mimic_5x200":
                overrides.append(f"datasets.{key}.init_args.ids_file={roots['mimic_ids']}")
        for key, params in raw["protocols"].items():
            proto = params.get("protocol", key)
            if proto in ("mgca_linear",):
                overrides += [f"protocols.{key}.resize=32", f"protocols.{key}.crop=24", f"protocols.{key}.max_epochs=1"]
            if proto == "mgca_segmentation":
                overrides += [f"protocols.{key}.image_size=32", f"protocols.{key}.max_epochs=1",
                              f"protocols.{key}.features=[8,8,8,8]"]
            if proto == "benchx_finetune":
                overrides += [f"protocols.{key}.crop=24", f"protocols.{key}.max_epochs=1", f"protocols.{key}.batch_size=8"]
            if proto == "benchx_segmentation":
                overrides += [f"protocols.{key}.max_iterations=1", f"protocols.{key}.eval_interval=1",
                              f"protocols.{key}.channels=8", f"protocols.{key}.aux_channels=8"]
            if proto == "gtgm_finetune":
                overrides += [f"protocols.{key}.max_iterations=1", f"protocols.{key}.eval_interval=1",
                              f"protocols.{key}.batch_size=2", f"protocols.{key}.width=8", f"protocols.{key}.max_stages=1"]
            if proto == "linear_probe":
                overrides.append(f"protocols.{key}.fractions=[1.0]")
            if "fraction_files" in params:
                overrides += [f"protocols.{key}.fraction_files.1={roots['nih'] / 'train_1.txt'}",
                              f"protocols.{key}.fraction_files.10={roots['nih'] / 'train_10.txt'}"]
            if proto in ("mgca_linear", "mgca_segmentation", "benchx_finetune", "gtgm_finetune", "benchx_segmentation"):
                overrides.append(f"protocols.{key}.fractions=[{1.0 if proto == 'gtgm_finetune' else 0.1}]")
        suite = load_suite(name, overrides)
        # a 3D encoder for the 3D table; UniMedI's one ViT for its 2D and 3D tables
        method = {"paper_gtgm_seg3d": "gtgm", "paper_unimedi": "unimedi"}.get(name, "clip")
        suite["methods"] = {"random_init": {"method": method, "pretrain": False,  # pretraining is not under test
                                            "init_args": {"image_encoder": {"depth": 4}}}}  # 4 levels for UperNet
        if name == "paper_gtgm_seg3d":  # one MSD task stands for the four (same datamodule and protocol), and BTCV
            suite["datasets"] = {k: suite["datasets"][k] for k in ("msd_liver", "btcv")}
        # CheXpert 5x200 needs 200 single-finding images per class, more than a fixture holds; the same
        # protocols run on MIMIC 5x200 (built from BenchX's id file) in this suite
        suite["datasets"].pop("chexpert_5x200", None)
        df = pd.read_csv(run_suite(suite, "cpu"))
        expected = {p.get("protocol", k) for k, p in raw["protocols"].items()}
        assert set(df["protocol"].map(lambda k: raw["protocols"][k].get("protocol", k))) == expected, name
        assert df["comparability"].str.contains('"protocol_variant"').all()
        if name in ("paper_gtgm_seg3d", "paper_unimedi"):  # BTCV ran, on its published test split
            btcv = df[df["dataset"].isin(["btcv", "bcv"])]
            assert len(btcv) and set(btcv["metric"]) >= {"dice_with_background", "dice"}, name
        if name == "paper_unimedi":  # CC-CCII scans (slice folders) went through the 3D ViT into the probe
            ccii = df[df["dataset"] == "cc_ccii"]
            assert len(ccii) and set(ccii["metric"]) >= {"auc", "acc"}, name


def test_btcv_published_layout_holds_out_its_validation_list_as_the_test_split(tmp_path) -> None:
    """BTCV as released for MONAI/UNETR: ``imagesTr``/``labelsTr`` + ``dataset_0.json`` whose
    ``validation`` list is the test split; the unlabelled ``imagesTs`` volumes are in no split."""
    from medvlp.datamodules.volume.ct import BTCVDataModule
    from tests.fixtures import make_btcv

    dm = BTCVDataModule(str(make_btcv(tmp_path / "btcv", n=6, layout="monai")), volume_size=(8, 16, 16))
    recs = {s: [r["id"] for r in dm.records(s)] for s in ("train", "val", "test")}
    assert sorted(recs["test"]) == ["img0005", "img0006"]
    assert sorted(recs["train"] + recs["val"]) == [f"img000{i}" for i in range(1, 5)]
    assert "img0061" not in recs["train"] + recs["val"] + recs["test"]
    batch = next(iter(dm.eval_dataloader("test", 2)))
    assert batch["mask"].shape == (2, 1, 8, 16, 16) and set(batch["mask"].unique().tolist()) <= {0, 1, 6}


# ----------------------------------------------------------------------------- EM as CREMI
def test_cremi_voi_and_adapted_rand_on_hand_computed_labelings() -> None:
    from medvlp.benchmarks.reference.em_cremi import adapted_rand_error, cremi_voi

    gt = np.array([[1, 1, 2, 2]])
    assert cremi_voi(gt, gt) == (0.0, 0.0) and adapted_rand_error(gt, gt) == 0.0
    merged = np.array([[5, 5, 5, 5]])  # one segment for two cells: 1 bit of merge, no split
    assert cremi_voi(merged, gt) == pytest.approx((0.0, 1.0))
    # n = [[2, 2]]: Σn² = 8, Σa² = 16, Σb² = 8 → CREMI form F = 2·8/24 = 2/3; pair form (scikit-image,
    # minus N = 4): F = 2·4/(12 + 4) = 1/2
    assert adapted_rand_error(merged, gt, pairs=False) == pytest.approx(1 / 3)
    assert adapted_rand_error(merged, gt) == pytest.approx(1 / 2)
    split = np.array([[1, 2, 3, 4]])
    assert cremi_voi(split, gt) == pytest.approx((1.0, 0.0))
    assert cremi_voi(merged, np.array([[0, 0, 2, 2]])) == pytest.approx((0.0, 0.0))  # id 0 ignored


def test_watershed_agglomeration_floods_boundaries_into_cells() -> None:
    from medvlp.benchmarks.reference.em_cremi import watershed_agglomeration

    prob = np.zeros((1, 5, 9), np.float32)
    prob[:, :, 4] = 0.9  # a boundary plane between two cells
    seg = watershed_agglomeration(prob)
    assert len(np.unique(seg)) == 2 and (seg[0, :, :4] == seg[0, 0, 0]).all() and (seg[0, :, 5:] == seg[0, 0, 8]).all()
    assert seg[0, 0, 0] != seg[0, 0, 8] and seg.min() > 0


def test_em_cremi_scores_whole_stitched_test_volumes(tmp_path) -> None:
    from medvlp.benchmarks.reference.em_cremi import EMCremi
    from medvlp.datamodules.em.datasets import CREMIDataModule
    from tests.fixtures import make_cremi

    dm = CREMIDataModule(str(make_cremi(tmp_path / "cremi")), samples=["A", "B"], volume_size=(4, 16, 16), test_fraction=0.34,
                         val_fraction=0.34, batch_size=4)
    torch.manual_seed(0)
    model, _ = build_tiny("gtgm")
    res = EMCremi().run(_ctx(model, dm, tmp_path, epochs=1, width=8, max_stages=1), 1.0, 0)
    vals = {v.metric: v.value for v in res.values}
    assert vals["voi"] == pytest.approx(vals["voi_split"] + vals["voi_merge"]) and 0 <= vals["arand"] <= 1
    assert "2 volume(s) stitched from 8 sub-volumes" in res.values[0].definition
    assert _recomputes(res) == set(vals) and len(res.samples["ids"]) == 2  # one sample per stitched volume


# ----------------------------------------------------------------------------- GTGM 3D fine-tuning
def test_gtgm_split_is_first_90_percent_times_ratio_and_last_10_percent() -> None:
    from medvlp.benchmarks.reference.gtgm_finetune import gtgm_split

    ids = [str(i) for i in range(20)]
    assert gtgm_split(ids, 1.0) == (list(range(18)), [18, 19])
    assert gtgm_split(ids, 0.1) == ([0], [18, 19])  # int(20 · 0.9 · 0.1) = 1


def test_gtgm_finetune_trains_everything_and_selects_best_validation_dice(tmp_path) -> None:
    from medvlp.benchmarks.reference.gtgm_finetune import GTGMFinetune
    from medvlp.datamodules.volume.ct import MSDDataModule
    from tests.fixtures import make_msd

    root = make_msd(tmp_path / "msd", n=10)
    dm = MSDDataModule(str(root), volume_size=(8, 16, 16), test_fraction=0.3, batch_size=2)
    torch.manual_seed(0)
    model, _ = build_tiny("gtgm")
    proto = GTGMFinetune()
    ctx = _ctx(model, dm, tmp_path, max_iterations=2, eval_interval=1, batch_size=2, width=8, max_stages=1)
    trainer, parts = proto.build(ctx, 1.0, 0)
    g = trainer.optimizer.param_groups
    # task1.py as GTGM's launchers run it: AdamW lr 1e-5, wd 1e-5
    assert type(trainer.optimizer) is torch.optim.AdamW and len(g) == 1 and (g[0]["lr"], g[0]["weight_decay"]) == (1e-5, 1e-5)
    enc = {id(q) for q in parts["model"].image_backbone().parameters()}
    assert enc <= {id(q) for q in g[0]["params"]}  # full fine-tuning
    assert (trainer.monitor, trainer.mode, trainer.max_epochs) == ("val_dice_bg", "max", 2)
    res = proto.run(ctx, 1.0, 0)
    vals = {v.metric: v.value for v in res.values}
    assert 0 <= vals["dice_with_background_bestval"] <= 1 and 0 <= vals["dice_with_background"] <= 1
    assert res.comparability["split_convention"] == "gtgm_task1_after_test_holdout"
    assert res.comparability["fraction_source"] == "gtgm_task1_train_rate"
    assert res.comparability["protocol_variant"] == "gtgm_task1" and res.comparability["fidelity"].startswith("deviates")
    assert _recomputes(res) == set(vals) - {"dice_with_background_bestval"}  # a validation statistic: no test samples


def test_benchx_segmentation_follows_the_released_config_and_reports_mmseg_dice(siim_dm, tmp_path) -> None:
    from medvlp.benchmarks.reference.benchx import BenchXSegmentation, UPerHead

    torch.manual_seed(0)
    model, _ = build_tiny("clip", "method.init_args.image_encoder.depth=4")
    ids = __import__("medvlp.benchmarks.kit.views", fromlist=["split_ids"]).split_ids(siim_dm, "train")
    f = tmp_path / "train_10.txt"
    f.write_text("".join(f"{i}\n" for i in ids[:6]))
    proto = BenchXSegmentation()
    assert proto.params(_ctx(model, siim_dm, tmp_path))["max_iterations"] == 20000
    assert proto.params(_ctx(model, siim_dm, tmp_path))["eval_interval"] == 2000
    ctx = _ctx(model, siim_dm, tmp_path, max_iterations=2, eval_interval=1, warmup_iterations=1, batch_size=4,
               channels=8, aux_channels=8, fraction_files={10: str(f)})
    trainer, parts = proto.build(ctx, 0.1, 0)
    groups = trainer.optimizer.param_groups
    # released upernet_vit.py L38-49: AdamW lr 1e-3, wd 0.05, no layer decay (one group)
    assert type(trainer.optimizer) is torch.optim.AdamW and len(groups) == 1
    assert (groups[0]["initial_lr"], groups[0]["weight_decay"]) == (1e-3, 0.05)
    assert isinstance(parts["heads"][1], UPerHead) and trainer.monitor == "val_mdice"
    assert [ids[r] for r in trainer.info["rows"]] == ids[:6]
    res = proto.run(ctx, 0.1, 0)
    assert {v.metric for v in res.values} == {"dice_mmseg_dataset", "dice_mmseg_dataset_foreground"}
    assert _recomputes(res) == {v.metric for v in res.values}  # dataset-level Dice: per-image areas, summed
    assert "max_iterations=2" in res.comparability["fidelity"]
