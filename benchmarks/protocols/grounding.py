"""Phrase grounding (pointing game) and region-level classification on data with region boxes and
per-finding locations (phantom X-ray)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medvlp.benchmarks.kit.protocol import (EvalContext, MetricValue, Protocol, ProtocolResult, auc_recipe,
                                       constant_class_flags, macro_auc, mean_recipe)
from medvlp.encoders.vit import tokens_to_map
from medvlp.registry import register_benchmark
from medvlp.roi import roi_align
from medvlp.datamodules.phantom.render import Finding
from medvlp.datamodules.phantom.reports import POSITIVE, positive_sentence


def finding_region(label: str, side: str | None, zone: str | None) -> str | None:
    """Name of the region box a located finding lies in, or ``None`` when it has no location.

    Consolidation / lung nodule → ``"<side> <zone> lung zone"``; pleural effusion → ``"<side> costophrenic
    angle"``; pneumothorax → ``"<side> apical zone"``; cardiomegaly → ``"cardiac silhouette"`` (the phantom
    X-ray's :data:`~medvlp.datamodules.phantom.render.XRAY_REGIONS`).
    """
    name, side, zone = label.lower(), (side or "").lower(), (zone or "").lower()
    if name in ("consolidation", "lung nodule") and side and zone in ("upper", "mid", "lower"):
        return f"{side} {zone} lung zone"
    if name == "pleural effusion" and side:
        return f"{side} costophrenic angle"
    if name == "pneumothorax" and side:
        return f"{side} apical zone"
    if name == "cardiomegaly":
        return "cardiac silhouette"
    return None


def query_sentence(finding: Mapping[str, Any]) -> str:
    """The grounding query of a finding: the phantom report's first positive wording filled with the
    finding's side, zone and size (e.g. ``"There is a small right pleural effusion."``)."""

    if finding["label"] not in POSITIVE:
        raise ValueError(f"grounding: no report wording for finding {finding['label']!r}")
    return positive_sentence(Finding(finding["label"], finding.get("side") or "", finding.get("zone") or "",
                                     finding.get("size") or ""))


def region_labels(findings: Sequence[Mapping[str, Any]], region_names: Sequence[str]) -> np.ndarray:
    """``(R,)`` 0/1: whether some finding of the image lies in each region (:func:`finding_region`)."""
    index = {r: k for k, r in enumerate(region_names)}
    out = np.zeros(len(region_names), np.float32)
    for f in findings:
        region = finding_region(f["label"], f.get("side"), f.get("zone"))
        if region in index:
            out[index[region]] = 1.0
    return out


def cell_centres(grid: Sequence[int], image_hw: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(ys, xs)`` of the ``h × w`` patch cells' centres in pixel-index coordinates (pixel ``k``'s centre is
    ``k``, the convention of the phantom's boxes): cell ``j`` of ``w`` over ``W`` pixels → ``(j + ½)·W/w − ½``."""
    h, w = int(grid[0]), int(grid[1])
    ys = (np.arange(h) + 0.5) * image_hw[0] / h - 0.5
    xs = (np.arange(w) + 0.5) * image_hw[1] / w - 0.5
    return ys, xs


def inside_cells(box: Sequence[float], grid: Sequence[int], image_hw: Sequence[int]) -> np.ndarray:
    """``(h, w)`` bool: cells whose centre lies inside box ``x1, y1, x2, y2`` (bounds inclusive)."""
    ys, xs = cell_centres(grid, image_hw)
    x1, y1, x2, y2 = (float(v) for v in box)
    return ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]


def pointing_hit(sim: torch.Tensor | np.ndarray, box: Sequence[float], image_hw: Sequence[int]) -> tuple[float, float]:
    """``(hit, chance)`` of one query: hit = 1 when the arg-max cell of the ``(h, w)`` map ``sim`` (first one
    on ties) has its centre inside ``box``; chance = share of cell centres inside the box (the expected hit
    of a uniformly random cell)."""
    sim = np.asarray(sim.detach().float().cpu() if isinstance(sim, torch.Tensor) else sim, np.float64)
    inside = inside_cells(box, sim.shape, image_hw)
    k = int(np.argmax(sim))
    return float(inside.reshape(-1)[k]), float(inside.mean())


def region_features(model: Any, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``(B, R, D)`` backbone patch tokens RoI-aligned (1×1, ASG's operator) on each region box."""
    feats = model.image_features(image)
    grid = feats["grid"]
    fmap = tokens_to_map(feats["tokens"], grid)
    scale = (grid[1] / image.shape[-1], grid[0] / image.shape[-2])
    return roi_align(fmap.float(), boxes.to(fmap.device).float(), scale)


@dataclass
class _Split:
    """What one pass over a split collects."""

    ids: list[str] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)  # (B, R, D) per batch
    labels: list[np.ndarray] = field(default_factory=list)  # (B, R), NaN = region absent
    # pointing game, per batch (B, R): Σ hits, number of queries, Σ chance of the queries in region r;
    # (B, R, K): hit / chance of the query of finding k (NaN = no such query)
    hits: list[np.ndarray] = field(default_factory=list)
    queries: list[np.ndarray] = field(default_factory=list)
    chance: list[np.ndarray] = field(default_factory=list)
    by_finding: list[np.ndarray] = field(default_factory=list)
    chance_by_finding: list[np.ndarray] = field(default_factory=list)
    unlocated: int = 0


@torch.no_grad()
def collect(model: Any, datamodule: Any, split: str, device: str | torch.device, batch_size: int,
            pointing: bool) -> _Split:
    """One pass over ``split``: region features and labels; with ``pointing``, one query per positive located
    finding through ``model.dense_text_similarity`` (hits and chance summed per (image, region))."""
    region_names = list(datamodule.region_names())
    finding_names = list(datamodule.label_names)
    out = _Split()
    model.eval().to(device)
    for batch in datamodule.eval_dataloader(split, batch_size):
        if batch is None:
            continue
        image = batch["image"].to(device)
        boxes = batch["regions"].float()
        out.features.append(region_features(model, image, boxes).cpu().numpy())
        metas = batch["meta"]
        present = batch.get("region_present")
        labels = np.stack([region_labels(m["findings"], region_names) for m in metas])
        if present is not None:
            labels[~present.bool().numpy()] = np.nan
        out.labels.append(labels)
        out.ids.extend(str(m["id"]) for m in metas)
        if not pointing:
            continue
        rows, texts, qboxes, kinds, where = [], [], [], [], []
        for i, m in enumerate(metas):
            for f in m["findings"]:
                region = finding_region(f["label"], f.get("side"), f.get("zone"))
                if region not in region_names or f["label"] not in finding_names:
                    out.unlocated += 1
                    continue
                rows.append(i)
                texts.append(query_sentence(f))
                where.append(region_names.index(region))
                qboxes.append(boxes[i, where[-1]].tolist())
                kinds.append(finding_names.index(f["label"]))
        b, r, k = len(metas), len(region_names), len(finding_names)
        hits, queries, chances = np.zeros((b, r)), np.zeros((b, r)), np.zeros((b, r))
        by_finding, chance_by_finding = np.full((b, r, k), np.nan), np.full((b, r, k), np.nan)
        for start in range(0, len(rows), batch_size):
            chunk = slice(start, start + batch_size)
            idx = torch.tensor(rows[chunk], device=device)
            maps = model.dense_text_similarity(image[idx], texts[chunk])
            if maps.ndim != 3 or maps.shape[0] != len(idx):
                raise ValueError(f"{type(model).__name__}.dense_text_similarity must return (B, h, w), "
                                 f"got {tuple(maps.shape)} for B={len(idx)}")
            for m, i, box, kind, reg in zip(maps, rows[chunk], qboxes[chunk], kinds[chunk], where[chunk]):
                hit, chance = pointing_hit(m, box, image.shape[-2:])
                hits[i, reg] += hit
                queries[i, reg] += 1
                chances[i, reg] += chance
                by_finding[i, reg, kind], chance_by_finding[i, reg, kind] = hit, chance
        out.hits.append(hits)
        out.queries.append(queries)
        out.chance.append(chances)
        out.by_finding.append(by_finding)
        out.chance_by_finding.append(chance_by_finding)
    if not out.ids:
        raise ValueError(f"grounding: no readable sample in split {split!r}")
    return out


def fit_region_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float = 1.0,
                     max_iter: int = 2000) -> np.ndarray:
    """One logistic regression over all (image, region) pairs of the training split ("a finding lies in this
    region"), on standardised features; returns ``(N_test, R)`` probabilities.

    Args:
        x_train: ``(N, R, D)`` region features. y_train: ``(N, R)`` 0/1 (NaN = region absent, left out).
        x_test: ``(M, R, D)``.
    """
    from sklearn.linear_model import LogisticRegression  # lazy: heavy import (scikit-learn), only this path needs it
    from sklearn.preprocessing import StandardScaler  # lazy: heavy import (scikit-learn), only this path needs it

    d = x_train.shape[-1]
    xtr, ytr = x_train.reshape(-1, d), y_train.reshape(-1)
    ok = ~np.isnan(ytr)
    xtr, ytr = xtr[ok], ytr[ok].astype(int)
    if len(np.unique(ytr)) < 2:
        raise ValueError(f"grounding region probe: the training pairs have a single label value ({len(ytr)} pairs)")
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(xtr), ytr)
    m, r = x_test.shape[:2]
    return clf.predict_proba(scaler.transform(x_test.reshape(-1, d)))[:, 1].reshape(m, r)


@register_benchmark("grounding")
class Grounding(Protocol):
    """Phrase grounding and region-level classification against known finding locations.

    Needs 2D data whose samples carry ``regions`` boxes (pixel-index ``x1, y1, x2, y2``, ``region_names()``
    order) and ``meta["findings"]`` with ``label``, ``side``, ``zone`` (phantom X-ray). A finding lies in
    one region (:func:`finding_region`).

    * ``pointing_game``: for each test image and each positive finding with a region, the query
      :func:`query_sentence` (the report's first positive wording, naming finding and location) gives a
      similarity map over the patch grid (``model.dense_text_similarity``, see
      :meth:`~medvlp.method.VLPMethod.dense_text_similarity`); a hit when the centre of the map's arg-max
      cell lies inside the finding's region box. Value = hits / queries over the test split. Chance = the
      expected hit rate of a uniformly random cell, i.e. the share of cell centres inside the box,
      averaged over queries (recorded in the recipe and the definition).
    * ``pointing_game_macro``: the same hits averaged per finding type, then over types (recipe ``mean`` on
      a pairs × findings matrix, NaN where the pair has no query of that finding).
    * ``region_auc``: region features = the backbone's final patch tokens RoI-aligned on each region box
      (1×1, :func:`~medvlp.roi.roi_align`, ASG's operator); one logistic regression (standardised features,
      ``C``) trained on every (image, region) pair of the train split predicts "a finding lies in this
      region"; macro ROC-AUC over regions (each region's AUC across test images; regions without both
      labels skipped, e.g. the mediastinum). Method-agnostic (backbone tokens only).

    Per-sample outputs: one row per (test image, region) pair (ids ``"<image id>|<region>"``); pointing hits
    and queries are summed per pair (recipe ``ratio``), region scores and labels sit in the pair's region
    column (NaN elsewhere), so bootstrap CIs resample pairs, stratified for the AUC by region × label.

    A model without ``dense_text_similarity`` gets ``region_auc`` only (noted in the flags).

    Params: ``C`` (inverse L2 strength of the region probe, 1.0), ``batch_size`` (32).
    """

    parameters = {
        "C": "inverse L2 strength of the region probe's logistic regression (1.0)",
        "batch_size": "images per forward pass (32)",
    }

    name = "grounding"
    deterministic = True  # lbfgs probe on fixed features, argmax maps: no training seed enters
    needs_labels = True  # the finding vocabulary (label_names) names the queried findings
    primary_metric = "pointing_game"

    def applicable(self, ctx: EvalContext) -> str | None:
        dm = ctx.datamodule
        if getattr(dm, "spatial_dims", 2) != 2:
            return "grounding needs 2D images"
        if not hasattr(dm, "region_names") or not dm.region_names():
            return "dataset has no region boxes"
        sample = dm.dataset("test", augment=False)[0]
        if sample is None or "regions" not in sample or "findings" not in (sample.get("meta") or {}):
            return "dataset has no per-finding locations (meta['findings'] with side/zone) and region boxes"
        if not hasattr(ctx.model, "image_features"):
            return "model exposes no image_features (patch tokens)"
        return super().applicable(ctx)

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        dm, model = ctx.datamodule, ctx.model
        bs = int(ctx.params.get("batch_size", 32))
        pointing = hasattr(model, "dense_text_similarity")
        test = collect(model, dm, "test", ctx.device, bs, pointing)
        train = collect(model, dm, "train", ctx.device, bs, False)
        regions = list(dm.region_names())
        x_train, y_train = np.concatenate(train.features), np.concatenate(train.labels)
        x_test, y_test = np.concatenate(test.features), np.concatenate(test.labels)
        scores = fit_region_probe(x_train, y_train, x_test, float(ctx.params.get("C", 1.0)))
        auc, _ = macro_auc(y_test, scores)
        n_test, n_reg = len(test.ids), len(regions)
        # one per-sample row per (image, region) pair: the bootstrap resamples pairs, and AUC's label-pattern
        # strata (the one known column's value) are region x label, so every region keeps its positives
        own = np.eye(n_reg, dtype=bool)[None].repeat(n_test, 0).reshape(n_test * n_reg, n_reg)
        pair_labels = np.where(own, np.repeat(y_test, n_reg, axis=0), np.nan)
        pair_scores = np.where(own, np.repeat(scores, n_reg, axis=0), np.nan)
        samples: dict[str, np.ndarray] = {
            "ids": np.asarray([f"{i}|{r}" for i in test.ids for r in regions]),
            "scores": pair_scores.astype(np.float32), "labels": pair_labels.astype(np.float32),
            "class_names": np.asarray(regions)}
        recipes: dict[str, dict[str, Any]] = {"region_auc": auc_recipe()}
        c = float(ctx.params.get("C", 1.0))
        values = [MetricValue("region_auc", auc, (
            f"macro ROC-AUC over regions (each region's AUC across N={n_test} test images; regions without both "
            f"labels skipped) of one logistic regression (C={c:g}) on RoI-aligned final backbone patch tokens, "
            f"trained on {int((~np.isnan(y_train)).sum())} (image, region) pairs of the train split to predict "
            "'a finding lies in this region'"))]
        flags = constant_class_flags(y_test, regions, "the test split")
        if pointing:
            hits, queries, chance = (np.concatenate(v).reshape(-1) for v in (test.hits, test.queries, test.chance))
            n_q = int(queries.sum())
            if n_q == 0:
                flags.append("degenerate: no test image has a positive finding with a region (no pointing query)")
            else:
                k = len(dm.label_names)
                by_f = np.concatenate(test.by_finding).reshape(-1, k)
                ch_f = np.concatenate(test.chance_by_finding).reshape(-1, k)
                cols = ~np.all(np.isnan(by_f), axis=0)
                chance_all = float(chance.sum() / n_q)
                chance_macro = float(np.nanmean(ch_f[:, cols], axis=0).mean())
                samples.update({"pointing_hits": hits.astype(np.float32), "pointing_queries": queries.astype(np.float32),
                                "pointing_chance": chance.astype(np.float32),
                                "pointing_by_finding": by_f.astype(np.float32)})
                recipes["pointing_game"] = {"kind": "ratio", "num": "pointing_hits", "den": "pointing_queries",
                                            "chance": chance_all, "higher_is_better": True}
                recipes["pointing_game_macro"] = mean_recipe("pointing_by_finding", chance_macro)
                grid = "the model's dense_text_similarity map over the patch grid"
                values.insert(0, MetricValue("pointing_game", float(hits.sum() / n_q), (
                    f"pointing game: share of {n_q} queries (one per positive located finding of {n_test} test "
                    f"images; query = the report's first positive wording of the finding with its side/zone) whose "
                    f"arg-max cell of {grid} has its centre inside the finding's region box; chance "
                    f"(share of cell centres inside the box, mean over queries) {chance_all:.3f}")))
                values.insert(1, MetricValue("pointing_game_macro", float(np.nanmean(by_f[:, cols], axis=0).mean()), (
                    f"pointing game hit rate per finding type, averaged over the {int(cols.sum())} types with a query "
                    f"({n_q} queries, {n_test} test images); chance {chance_macro:.3f}")))
                unreachable = int((ch_f == 0).sum())
                if unreachable:
                    flags.append(f"note: {unreachable} of {n_q} pointing queries have no cell centre inside their box "
                                 "(a hit is impossible: the patch grid is coarse for the box)")
            if test.unlocated:
                flags.append(f"note: {test.unlocated} positive test findings without a region box were not queried")
        else:
            flags.append(f"note: {type(model).__name__} has no dense_text_similarity; pointing game not run")
        return ProtocolResult(values, samples=samples, recipes=recipes, flags=flags)
