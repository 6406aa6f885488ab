"""Reference evaluation protocols: the properties that define each one, on fixtures and tiny models."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medvlp.benchmarks.features import FeatureCache
from medvlp.benchmarks.protocol import EvalContext
from tests.conftest import build_tiny


@pytest.fixture(scope="module")
def tiny_xray():
    torch.manual_seed(0)
    model, dm = build_tiny("clip")
    return model.eval(), dm


def _ctx(model, dm, tmp_path, **params):
    return EvalContext(model, dm, FeatureCache(None), params, "cpu", tmp_path)


# ----------------------------------------------------------------------------- splits
def test_mgca_fraction_is_pandas_sample_random_state_42() -> None:
    from medvlp.benchmarks.splits import mgca_fraction_ids

    ids = [f"id{i}" for i in range(200)]
    expected = pd.DataFrame({"id": ids}).sample(frac=0.1, random_state=42)["id"].tolist()
    assert mgca_fraction_ids(ids, 0.1) == expected and len(expected) == 20
    assert mgca_fraction_ids(ids, 1.0) == ids


def test_benchx_subset_file_is_honoured_by_basename(tmp_path) -> None:
    from medvlp.benchmarks.splits import select_fraction

    ids = [f"images/{i:08d}_000.png" for i in range(10)]
    f = tmp_path / "train_1.txt"
    f.write_text("00000003_000.png 0 1 0\n00000007_000.png 1 0 0\n")  # BenchX: name + labels
    rows, h, how = select_fraction(ids, 0.01, 0, "file", {0.01: str(f)}, tmp_path / "splits")
    assert rows == [3, 7] and "train_1.txt" in how
    assert (tmp_path / "splits" / "file_0.01_s0.txt").read_text().split() == [ids[3], ids[7]]
    f.write_text("not_there.png 0\n")
    with pytest.raises(ValueError, match="train_1.txt: 1 listed ids not in the train split"):
        select_fraction(ids, 0.01, 0, "file", {0.01: str(f)})


# ----------------------------------------------------------------------------- shared loop
def test_head_loop_restores_best_validation_weights_and_stops_early() -> None:
    from medvlp.benchmarks.head_loop import HeadTrainer, fit

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
    from medvlp.benchmarks.mgca_linear import MGCALinear

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
    from medvlp.benchmarks.views import split_ids

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
    from medvlp.benchmarks.mgca_linear import MGCALinear

    model, dm = tiny_xray
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = MGCALinear().run(_ctx(model, dm, tmp_path, resize=32, crop=24, max_epochs=3, patience=1), 1.0, 0)
    vals = {v.metric: v.value for v in res.values}
    assert 0 <= vals["auc"] <= 1 and "best-val epoch" in res.values[0].definition
    assert res.comparability["protocol_variant"] == "mgca_linear" and res.comparability["fraction_source"] == "mgca"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # encoder untouched


def test_mgca_linear_uses_cross_entropy_for_one_hot_labels(tmp_path) -> None:
    from medvlp.benchmarks.mgca_linear import MGCALinear
    from medvlp.datamodules.xray import COVIDxDataModule
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
