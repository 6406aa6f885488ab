"""The slice_selection protocol: precision of a method's text-guided slice selection against the known
lesion slice ranges (hand-made case with a stubbed hook; UniMedI end to end on tiny phantom CT)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from medvlp.benchmarks.kit.features import FeatureCache
from medvlp.benchmarks.kit.protocol import EvalContext
from medvlp.benchmarks.protocols.slice_selection import SliceSelection, lesion_slices
from medvlp.benchmarks.metrics.stats import metric_under_weights
from tests.conftest import build_tiny, first_batch


class _Data:
    """A 3D test split of three volumes (depth 8) with hand-written findings."""

    spatial_dims = 3
    dataset_version = "hand-made"
    label_names: list[str] = []

    def __init__(self, findings: list[list[dict[str, Any]]]) -> None:
        self.samples = [{"image": torch.zeros(1, 8, 4, 4), "text": f"report {i}",
                         "meta": {"id": f"v{i}", "findings": f}} for i, f in enumerate(findings)]

    def dataset(self, split: str, augment: bool = False) -> list[dict[str, Any]]:
        assert split == "test"
        return self.samples


class _Stub:
    """Selects fixed slabs per volume (patch depth 2 → slabs 0..3, middle slices 1, 3, 5, 7)."""

    def __init__(self, slabs: list[list[int]]) -> None:
        self.slabs = list(slabs)
        self.calls: list[list[str]] = []

    def selected_slices(self, volume: torch.Tensor, texts: list[str]) -> dict[str, Any]:
        self.calls.append(list(texts))
        slabs = torch.tensor([self.slabs.pop(0) for _ in range(volume.shape[0])])
        return {"slices": slabs * 2 + 1, "slabs": slabs, "patch_depth": 2, "candidates": torch.tensor([1, 3, 5, 7])}


def _ctx(model: Any, dm: Any, tmp_path, **params: Any) -> EvalContext:
    return EvalContext(model, dm, FeatureCache(tmp_path / "features"), params)


def test_hand_made_precision_chance_and_lift(tmp_path) -> None:
    dm = _Data([
        [{"label": "Lung nodule", "slices": [2, 3]}],                       # lesion slices {2, 3}
        [{"label": "Cardiomegaly", "slices": None}],                        # no slice range: not scored
        [{"label": "Effusion", "slices": [6, 7]}, {"label": "Nodule", "slices": [4, 4]}],  # {4, 6, 7}
    ])
    stub = _Stub([[1, 3], [2, 3]])  # volume 0 → slices 3, 7; volume 2 → slices 5, 7
    proto = SliceSelection()
    assert proto.applicable(_ctx(stub, dm, tmp_path)) is None
    res = proto.run(_ctx(stub, dm, tmp_path, batch_size=8))
    assert stub.calls == [["report 0", "report 2"]]  # one call, reports passed with their volumes
    v = {m.metric: m.value for m in res.values}
    # volume 0: slice 3 in {2,3}, 7 not → 0.5; chance: candidate 3 of {1,3,5,7} → 0.25
    #           slabs 1 (2-3) hit, 3 (6-7) miss → 0.5; slab chance: slab 1 of 4 → 0.25
    # volume 2: slice 7 in, 5 not → 0.5; chance: candidate 7 → 0.25; slabs 2 (4-5), 3 (6-7) hit → 1.0;
    #           slab chance: slabs 2, 3 → 0.5
    assert v["slice_precision"] == pytest.approx(0.5) and v["slice_chance"] == pytest.approx(0.25)
    assert v["slab_precision"] == pytest.approx(0.75)
    assert v["slice_lift"] == pytest.approx(0.25) and v["slab_lift"] == pytest.approx((0.25 + 0.5) / 2)
    assert list(res.samples["ids"]) == ["v0", "v2"] and res.samples["selected"].tolist() == [[3, 7], [5, 7]]
    assert res.recipes["slice_precision"]["chance"] == pytest.approx(0.25)
    assert res.recipes["slab_precision"]["chance"] == pytest.approx(0.375)
    # the stored per-volume arrays reproduce every metric through its recipe (what `medvlp report` bootstraps)
    w = np.ones((1, 2))
    for metric, recipe in res.recipes.items():
        assert metric_under_weights(recipe, res.samples, w)[0] == pytest.approx(v[metric])
    # batching does not change the result
    again = proto.run(_ctx(_Stub([[1, 3], [2, 3]]), dm, tmp_path, batch_size=1))
    assert [m.value for m in again.values] == [m.value for m in res.values]


def test_skips_with_a_reason_and_rejects_bad_input(tmp_path) -> None:
    proto = SliceSelection()
    dm = _Data([[{"label": "Nodule", "slices": [2, 3]}]])
    assert "no selected_slices" in proto.applicable(_ctx(object(), dm, tmp_path))
    flat = _Data([])
    flat.spatial_dims = 2
    assert "not 3D" in proto.applicable(_ctx(_Stub([]), flat, tmp_path))
    no_findings = _Data([[]])
    del no_findings.samples[0]["meta"]["findings"]
    assert "no lesion slice ranges" in proto.applicable(_ctx(_Stub([]), no_findings, tmp_path))
    with pytest.raises(ValueError, match="no test volume"):
        proto.run(_ctx(_Stub([]), _Data([[{"label": "Cardiomegaly", "slices": None}]]), tmp_path))
    with pytest.raises(ValueError, match="unknown params"):
        proto.run(_ctx(_Stub([[0, 1]]), dm, tmp_path, k=3))
    with pytest.raises(ValueError, match="ends before"):
        lesion_slices([{"label": "x", "slices": [5, 2]}])


def test_unimedi_hook_is_the_training_selection(monkeypatch) -> None:
    """The hook returns exactly the slabs (and middle slices) that the training step selected."""
    from medvlp.methods.unimedi import UniMedI

    method, dm = build_tiny("unimedi")
    volume = first_batch(dm)["ct"]
    seen: list[torch.Tensor] = []
    original = UniMedI._select_slabs

    def spy(self: UniMedI, attention: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        out = original(self, attention, grid)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(UniMedI, "_select_slabs", spy)
    method.eval()
    with torch.no_grad():
        method.compute_losses(volume)
    trained = seen[-1]
    sel = method.selected_slices(volume["image"], list(volume["text"]))
    assert torch.equal(sel["slabs"], trained) and sel["slices"].dtype == torch.long
    depth = method.teacher_encoder.patch_size(3)[0]
    assert torch.equal(sel["slices"], trained * depth + depth // 2)
    assert sel["slices"].shape == (volume["image"].shape[0], method.select_k)
    assert len(sel["candidates"]) == volume["image"].shape[2] // depth > method.select_k


def test_suite_scores_unimedi_and_skips_a_method_without_the_hook(tmp_path) -> None:
    from medvlp.benchmarks.suite.results import ResultStore
    from medvlp.benchmarks.suite.runner import run_suite

    ct = {"name": "phantom", "init_args": {"modality": "ct", "num_train": 8, "num_val": 4, "num_test": 12,
                                            "volume_size": [16, 32, 32], "batch_size": 4}}
    suite = {"name": "sel", "output": str(tmp_path / "out"), "preset": "tiny",
             "pretrain": {"trainer": {"max_steps": 1, "enable_progress_bar": False}},
             "methods": {"unimedi_3d": {"method": "unimedi", "init_args": {"modalities": "3d"}, "data": ct},
                         "clip": {"method": "clip", "pretrain": False, "data": ct}},
             "datasets": {"phantom_ct": ct}, "protocols": {"slice_selection": {}}}
    path = run_suite(suite, "cpu")
    df = pd.read_csv(path)
    assert set(df["label"]) == {"unimedi_3d"}  # CLIP has no hook: skipped, not an error
    v = df.set_index("metric")["value"]
    assert 0 <= v["slice_precision"] <= 1 and 0 < v["slice_chance"] < 1
    assert v["slice_lift"] == pytest.approx(v["slice_precision"] - v["slice_chance"], abs=1e-6)
    store = ResultStore(path)
    arrays, recipes = store.load_samples(df["samples"].iloc[0])
    assert recipes["slice_precision"]["kind"] == "mean" and len(arrays["ids"]) == len(arrays["slice_precision"]) > 0
