"""The fast protocols that train (``finetune``, ``segmentation``) select on the validation split: the test
number comes from the weights of the best validation epoch, not the last one."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medvlp.benchmarks.metrics.dice import dice_score
from medvlp.benchmarks.kit.features import FeatureCache
from medvlp.benchmarks.protocols.finetune import Finetune
from medvlp.benchmarks.suite.paper_view import row_fields
from medvlp.benchmarks.kit.protocol import EvalContext, macro_auc
from medvlp.benchmarks.protocols.segmentation import Segmentation
from tests.conftest import build_tiny


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, dm = build_tiny("clip", "data.init_args.num_train=16", "data.init_args.num_val=8",
                           "data.init_args.num_test=12", "data.init_args.image_size=32")
    return model.eval(), dm


def _recorded(monkeypatch, cls, snapshots: list, history: list, built: dict) -> None:
    """Wrap ``cls.build`` so that every validation also snapshots the trained modules and records its value."""
    real = cls.build

    def build(self, ctx, fraction, seed):
        trainer, parts = real(self, ctx, fraction, seed)
        validate_real = trainer.validate

        def validate():
            snapshots.append([copy.deepcopy(m.state_dict()) for m in trainer.modules])
            out = validate_real()
            history.append(out[trainer.monitor])
            return out

        trainer.validate = validate
        built.update(trainer=trainer, parts=parts)
        return trainer, parts

    monkeypatch.setattr(cls, "build", build)


def test_segmentation_reports_test_dice_at_the_best_validation_epoch(tiny, monkeypatch) -> None:
    model, dm = tiny
    snaps, history, built = [], [], {}
    _recorded(monkeypatch, Segmentation, snaps, history, built)
    params = {"epochs": 6, "batch_size": 4, "lr": 3e-3, "width": 8, "max_stages": 1, "extra_dice": []}
    res = Segmentation().run(EvalContext(model, dm, FeatureCache(None), params), 1.0, 0)
    trainer, parts = built["trainer"], built["parts"]
    assert len(snaps) == 6 and trainer.mode == "max" and trainer.monitor == "val_dice"
    best = int(np.argmax(history))
    assert history[-1] < history[best]  # the case: the last epoch is worse on validation than an earlier one
    k = trainer.info["num_classes"]

    def test_dice(epoch: int) -> float:
        for m, state in zip(trainer.modules, snaps[epoch]):
            m.load_state_dict(state)
        return dice_score(parts["predict"](parts["test_x"])[0], parts["test_y"], k, "foreground")

    reported = {v.metric: v.value for v in res.values}["dice"]
    assert reported == pytest.approx(test_dice(best))  # the best validation epoch, not the last
    assert test_dice(5) != pytest.approx(test_dice(best))  # the last epoch's test Dice differs
    assert res.comparability == {"selection": "best_val", "selection_monitor": "val_dice", "best_epoch": best,
                                 "epochs_run": 6}
    assert f"best validation epoch {best + 1} of 6" in res.values[0].definition
    assert row_fields(Segmentation(), params, dm, res)["selection"] == "best_val"  # recorded in the result row


def test_finetune_reports_test_auc_at_the_best_validation_epoch(tiny, monkeypatch) -> None:
    model, dm = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snaps, history, built = [], [], {}
    _recorded(monkeypatch, Finetune, snaps, history, built)
    res = Finetune().run(EvalContext(model, dm, FeatureCache(None), {"epochs": 3, "batch_size": 4, "lr": 1e-2}), 1.0, 0)
    trainer, parts = built["trainer"], built["parts"]
    assert len(snaps) == 3 and trainer.monitor == "val_auc"
    best = int(np.argmax(history))
    assert history[-1] < history[best]

    def test_auc(epoch: int) -> float:
        for m, state in zip(trainer.modules, snaps[epoch]):
            m.load_state_dict(state)
        _, scores, labels = parts["test"]()
        return macro_auc(labels, scores)[0]

    assert res.values[0].value == pytest.approx(test_auc(best))
    assert test_auc(2) != pytest.approx(test_auc(best))
    assert res.comparability["selection"] == "best_val" and res.comparability["best_epoch"] == best
    assert res.comparability["selection_monitor"] == trainer.monitor
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was fine-tuned


def test_validation_scores_the_validation_split(tiny) -> None:
    """Segmentation validates on the cached val maps with the headline Dice; fine-tuning on the val
    images with macro AUROC; both run every epoch and the result keeps the best."""
    model, dm = tiny
    ctx = EvalContext(model, dm, FeatureCache(None), {"epochs": 2, "batch_size": 4, "width": 8, "max_stages": 1})
    trainer, parts = Segmentation().build(ctx, 1.0, 0)
    val = ctx.features.maps(model, dm, "val")
    expected = dice_score(parts["predict"](val)[0], val.masks, trainer.info["num_classes"], "foreground")
    assert trainer.validate() == {"val_dice": pytest.approx(expected)}
    assert trainer.info["n_val"] == len(dm.dataset("val", augment=False)) == 8
    from medvlp.benchmarks.kit.head_loop import fit

    result = fit(trainer)
    assert len(result.history) == 2 and result.best_value == max(h["val_dice"] for h in result.history)
    ft, ft_parts = Finetune().build(EvalContext(model, dm, FeatureCache(None), {"epochs": 1, "batch_size": 4}), 1.0, 0)
    images = torch.cat([b["image"] for b in dm.eval_dataloader("val", 64)])
    labels = torch.cat([b["labels"] for b in dm.eval_dataloader("val", 64)]).float().numpy()
    m, head = ft_parts["model"].eval(), ft_parts["head"]
    with torch.no_grad():
        auc = macro_auc(labels, torch.sigmoid(head(m.image_representation(images))).numpy())[0]
        assert ft.monitor == "val_auc" and ft.validate()["val_auc"] == pytest.approx(auc)


class _NoVal:
    """A datamodule whose validation split is empty."""

    def __init__(self, dm):
        self._dm = dm

    def __getattr__(self, name):
        return getattr(self._dm, name)

    def dataset(self, split, augment=False):
        return [] if split == "val" else self._dm.dataset(split, augment=augment)


def test_protocols_without_a_validation_split_are_skipped_with_the_reason(tiny) -> None:
    model, dm = tiny
    assert Segmentation().applicable(EvalContext(model, dm, FeatureCache(None), {})) is None
    ctx = EvalContext(model, _NoVal(dm), FeatureCache(None), {})
    for proto in (Finetune(), Segmentation()):
        reason = proto.applicable(ctx)
        assert reason is not None and "no validation split" in reason and "best validation" in reason
