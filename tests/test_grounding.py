"""The ``grounding`` protocol: pointing game against known finding boxes and region-level classification."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medvlp.benchmarks.kit.features import FeatureCache
from medvlp.benchmarks.protocols.grounding import (Grounding, finding_region, inside_cells, pointing_hit, query_sentence,
                                         region_labels)
from medvlp.benchmarks.kit.protocol import EvalContext
from medvlp.datamodules import PhantomDataModule
from medvlp.datamodules.phantom.render import XRAY_REGIONS


def test_pointing_hit_and_chance_on_a_hand_made_box() -> None:
    # 32 px image, 4x4 grid: cell centres at 3.5, 11.5, 19.5, 27.5 (pixel-index coordinates)
    box = (0.0, 0.0, 15.0, 15.0)  # contains the 2x2 top-left cell centres
    inside = inside_cells(box, (4, 4), (32, 32))
    assert inside.sum() == 4 and inside[:2, :2].all()
    peak_in, peak_out = torch.zeros(4, 4), torch.zeros(4, 4)
    peak_in[1, 0], peak_out[3, 3] = 1.0, 1.0
    assert pointing_hit(peak_in, box, (32, 32)) == (1.0, 0.25)
    assert pointing_hit(peak_out, box, (32, 32)) == (0.0, 0.25)
    # a thin box: x covers only the 11.5 column, y the 11.5/19.5/27.5 rows -> 3 of 16 cells
    assert pointing_hit(peak_out, (10.0, 10.0, 12.0, 31.0), (32, 32))[1] == pytest.approx(3 / 16)
    assert pointing_hit(np.zeros((4, 4)), (0.0, 0.0, 2.0, 2.0), (32, 32)) == (0.0, 0.0)  # no centre inside


def test_finding_regions_labels_and_queries() -> None:
    findings = [{"label": "Consolidation", "side": "right", "zone": "lower", "size": "patchy"},
                {"label": "Pleural Effusion", "side": "left", "zone": "lower", "size": "small"},
                {"label": "Pneumothorax", "side": "left", "zone": "apical", "size": "small"},
                {"label": "Cardiomegaly", "side": "", "zone": "", "size": "mild"},
                {"label": "Lung Nodule", "side": "left", "zone": "mid", "size": "small"}]
    y = region_labels(findings, XRAY_REGIONS)
    expected = {"right lower lung zone", "left costophrenic angle", "left apical zone", "cardiac silhouette",
                "left mid lung zone"}
    assert {XRAY_REGIONS[k] for k in np.flatnonzero(y)} == expected
    assert finding_region("Emphysema", "", "") is None and finding_region("Consolidation", "", "") is None
    assert query_sentence(findings[1]) == "There is a small left pleural effusion."
    assert query_sentence(findings[4]) == "A small nodule is seen in the left mid lung zone."


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().float().numpy().tobytes()).hexdigest()


class OracleModel(nn.Module):
    """Fake encoder: its map is the indicator of the queried finding's box (``invert``: of the outside)."""

    def __init__(self, dm: PhantomDataModule, invert: bool = False, grid: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 8)
        self.grid, self.invert = grid, invert
        self.samples = {_key(s["image"]): s for s in dm.dataset("test", augment=False)}

    def image_features(self, image: torch.Tensor) -> dict:
        b = image.shape[0]
        pooled = nn.functional.adaptive_avg_pool2d(image, self.grid).reshape(b, -1, 1)
        return {"tokens": self.lin(pooled), "grid": (self.grid, self.grid), "pooled": pooled.mean(1)}

    def dense_text_similarity(self, image: torch.Tensor, texts: list[str]) -> torch.Tensor:
        maps = []
        for img, text in zip(image, texts):
            s = self.samples[_key(img)]
            f = next(f for f in s["meta"]["findings"] if query_sentence(f) == text)
            box = s["regions"][XRAY_REGIONS.index(finding_region(f["label"], f["side"], f["zone"]))]
            inside = torch.from_numpy(inside_cells(box.tolist(), (self.grid, self.grid), img.shape[-2:])).float()
            maps.append(1 - inside if self.invert else inside)
        return torch.stack(maps)


@pytest.fixture(scope="module")
def phantom() -> PhantomDataModule:
    dm = PhantomDataModule("xray", num_train=24, num_val=4, num_test=12, image_size=32, prevalence=0.5,
                           augment=False, batch_size=8)
    dm.prepare_data()
    return dm


def test_oracle_scores_one_and_anti_oracle_zero(phantom) -> None:
    for invert, expected in ((False, 1.0), (True, 0.0)):
        ctx = EvalContext(OracleModel(phantom, invert), phantom, FeatureCache(None), {})
        assert Grounding().applicable(ctx) is None
        res = Grounding().run(ctx)
        values = {v.metric: v.value for v in res.values}
        assert values["pointing_game"] == expected and values["pointing_game_macro"] == expected
        n_queries = sum(1 for s in ctx.model.samples.values() for f in s["meta"]["findings"])
        assert res.samples["pointing_queries"].sum() == n_queries > 0
        chance = res.recipes["pointing_game"]["chance"]
        assert 0 < chance < 0.5 and chance == pytest.approx(res.samples["pointing_chance"].sum() / n_queries)
        assert f"{chance:.3f}" in next(v.definition for v in res.values if v.metric == "pointing_game")
        r = len(XRAY_REGIONS)  # per-sample rows are (image, region) pairs, scores in the pair's region column
        assert 0.0 <= values["region_auc"] <= 1.0 and res.samples["scores"].shape == (12 * r, r)
        assert res.samples["ids"][1] == f"{next(iter(ctx.model.samples.values()))['meta']['id']}|{XRAY_REGIONS[1]}"
        assert (np.isnan(res.samples["labels"]).sum(1) == r - 1).all()


def test_not_applicable_without_regions_or_2d(phantom) -> None:
    ct = PhantomDataModule("ct", num_train=2, num_val=1, num_test=2, volume_size=(8, 16, 16))
    assert "2D" in Grounding().applicable(EvalContext(None, ct, FeatureCache(None), {}))


def test_suite_with_random_init_clip_and_asg_reports_intervals(tmp_path) -> None:
    from medvlp.benchmarks.suite.runner import run_suite
    from medvlp.benchmarks.report.tables import report

    suite = {"name": "grounding_test", "output": str(tmp_path), "preset": "tiny",
             "pretrain": {"trainer": {"max_steps": 2, "enable_progress_bar": False}},
             "methods": {"random_init": {"method": "clip", "pretrain": False}, "asg": {"method": "asg"},
                         "asg_no_arsa": {"method": "asg", "pretrain": False, "init_args": {"use_regions": False}}},
             "datasets": {"phantom_xray": {"name": "phantom", "init_args": {
                 "modality": "xray", "num_train": 24, "num_val": 8, "num_test": 16, "image_size": 32,
                 "prevalence": 0.5, "batch_size": 8}}},
             "protocols": {"grounding": {"C": 0.5}}}
    df = pd.read_csv(run_suite(suite, "cpu"))
    assert set(df["label"]) == {"random_init", "asg", "asg_no_arsa"}
    assert set(df["metric"]) == {"pointing_game", "pointing_game_macro", "region_auc"}
    assert df["value"].between(0, 1).all()
    md = report(tmp_path / "results.csv", tmp_path / "report", plots=False)
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    pg = summary[summary["metric"] == "pointing_game"]
    assert len(pg) == 3 and pg["lo"].notna().all() and (pg["lo"] <= pg["mean"]).all() and (pg["mean"] <= pg["hi"]).all()
    assert pg["chance"].between(0, 0.5).all() and pg["chance"].nunique() == 1  # same queries, same grid
    auc = summary[summary["metric"] == "region_auc"]
    # pair-level rows: the stratified bootstrap (strata = region x label) gives a real interval
    assert (auc["chance"] == 0.5).all() and (auc["lo"] < auc["hi"]).all()
    assert "pointing_game" in md and "asg_no_arsa" in md


def test_dense_text_similarity_definitions() -> None:
    from medvlp.method import VLPMethod
    from medvlp.testing import build_tiny

    texts = ["There is a small left pleural effusion.", "The heart size is enlarged."]
    clip, dm = build_tiny("clip")
    image = next(iter(dm.eval_dataloader("test", 2)))["image"]
    clip.eval()
    with torch.no_grad():
        sim = clip.dense_text_similarity(image, texts)
        feats = clip.image_features(image)
        patch = nn.functional.normalize(clip.image_proj(feats["tokens"]), dim=-1)  # global head on every token
        want = (patch * clip.encode_text(texts)[:, None]).sum(-1).reshape(2, *feats["grid"])
    assert sim.shape == (2, *feats["grid"]) and torch.allclose(sim, want, atol=1e-5)
    with pytest.raises(ValueError, match="pairs text i with image i"):
        clip.dense_text_similarity(image, texts[:1])

    asg, _ = build_tiny("asg")
    asg.eval()
    with torch.no_grad():
        sim = asg.dense_text_similarity(image, texts)
        feats = asg.image_features(image)
        patch = nn.functional.normalize(asg.region_proj(feats["tokens"]), dim=-1)
        for i, t in enumerate(texts):  # one sentence: mean of its normalised word-piece embeddings (no CLS/SEP)
            out = asg.text_encoder([t])
            words = (out["offsets"][0, :, 1] > out["offsets"][0, :, 0]) & out["attention_mask"][0].bool()
            emb = nn.functional.normalize(asg.sentence_proj(out["tokens"][0][words]), dim=-1).mean(0)
            want = patch[i] @ nn.functional.normalize(emb, dim=-1)
            assert torch.allclose(sim[i].reshape(-1), want, atol=1e-4)
        asg.use_regions = False  # the ablation: the local heads are untrained, the base definition applies
        assert torch.allclose(asg.dense_text_similarity(image, texts), VLPMethod.dense_text_similarity(asg, image, texts))
