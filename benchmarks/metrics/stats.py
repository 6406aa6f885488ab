"""Uncertainty of benchmark cells from stored per-sample outputs (pure numpy).

A *recipe* (see :func:`medvlp.benchmarks.kit.protocol.auc_recipe` and friends) says how a metric is
computed from a unit's per-sample arrays:

* ``macro_auc``: mean over classes with both labels of the Mann–Whitney ROC-AUC (ties count ½; NaN
  labels ignored) of ``scores`` against ``labels``;
* ``recall``: share of queries whose paired item ranks below ``k`` (``ranks``, 0 = best);
* ``mean``: mean of ``values`` over samples; 2-D values are NaN-averaged over samples per column, then
  averaged over the columns that have a value (MONAI Dice with ``ignore_empty``);
* ``ratio``: per column ``Σ num / Σ den`` over samples (columns with ``Σ den = 0`` skipped), mean over
  columns (dataset-level Dice as MMSeg: ``num`` = 2·intersection, ``den`` = predicted + true area).

Resampling is expressed as a weight matrix ``W`` (``B × N``, multiplicity of each test sample in each
bootstrap resample), so every metric of every resample is one matrix product.

* :func:`bootstrap_weights` – ``B`` resamples of the ``N`` test samples, seeded, optionally stratified
  (resampling within each stratum keeps its size: with strata = label patterns every class keeps its
  number of positives, so AUC stays defined).
* :func:`cell_interval` – value and percentile 95 % CI of the mean over units (seeds) of a metric,
  all units resampled with the same test indices.
* :func:`paired_difference` – Δ = A − B on the same resamples, percentile CI and two-sided bootstrap
  p-value :func:`bootstrap_p`.
* :func:`seed_level_difference` – Δ of two models trained with several pretraining seeds each: a two-level
  bootstrap that resamples the seeds of each side (with replacement, independently) *and* the test samples
  (shared by both sides), so the interval carries training-run variability as well as test-set noise.
* :func:`delong_difference` – DeLong et al. (1988) test of a difference of (macro) AUCs through the
  per-sample structural components (influence values); the macro AUC and the mean over units are
  linear in them.
* :func:`holm` – Holm–Bonferroni adjusted p-values (family-wise error control).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]
Unit = tuple[Mapping[str, Any], Arrays]  # (recipe, per-sample arrays), samples aligned across units


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    change = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(change) - 1
    starts = np.flatnonzero(change)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), np.float64)
    ranks[order] = ((starts + ends - 1) / 2 + 1)[group]
    return ranks


def auc_binary(y: np.ndarray, s: np.ndarray) -> float:
    """Mann–Whitney ROC-AUC of binary ``y`` (0/1) and scores ``s``; ties count ½."""
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    r = midranks(s)
    return float((r[y].sum() - m * (m + 1) / 2) / (m * n))


def _valid_classes(labels: np.ndarray) -> list[int]:
    return [k for k in range(labels.shape[1]) if len(np.unique(labels[~np.isnan(labels[:, k]), k])) == 2]


def _pair_matrix(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``H[i, j] = 1`` if pos_i > neg_j, ``½`` if equal, else 0."""
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def weighted_macro_auc(scores: np.ndarray, labels: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Macro AUC under each row of weights ``W`` (``B × N``); classes without both labels are skipped.

    Raises:
        ValueError: when no class has both a positive and a negative.
    """
    ks = _valid_classes(labels)
    if not ks:
        raise ValueError("no class has both positive and negative labels: AUC undefined")
    per_class = np.full((W.shape[0], len(ks)), np.nan)
    for j, k in enumerate(ks):
        ok = ~np.isnan(labels[:, k])
        y, s, w = labels[ok, k] > 0.5, scores[ok, k].astype(np.float64), W[:, ok]
        H = _pair_matrix(s[y], s[~y])
        wp, wn = w[:, y], w[:, ~y]
        den = wp.sum(1) * wn.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class[:, j] = np.where(den > 0, ((wp @ H) * wn).sum(1) / den, np.nan)
    # a resample without a positive (or negative) of a class leaves that class out (pooled strata)
    return np.nanmean(per_class, axis=1)


def metric_under_weights(recipe: Mapping[str, Any], arrays: Arrays, W: np.ndarray) -> np.ndarray:
    """The recipe's metric for every row of sample weights ``W`` (``B × N``)."""
    kind = recipe["kind"]
    if kind == "macro_auc":
        return weighted_macro_auc(np.asarray(arrays[recipe["scores"]]), np.asarray(arrays[recipe["labels"]], np.float64), W)
    if kind == "recall":
        hit = (np.asarray(arrays[recipe["ranks"]]) < int(recipe["k"])).astype(np.float64)
        return W @ hit / W.sum(1)
    if kind == "mean":
        v = np.asarray(arrays[recipe["values"]], np.float64)
        if v.ndim == 1:
            ok = ~np.isnan(v)
            return W[:, ok] @ v[ok] / W[:, ok].sum(1)
        ok = ~np.isnan(v)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_col = (W @ np.where(ok, v, 0.0)) / (W @ ok.astype(np.float64))  # B × C, NaN when no sample
        return np.nanmean(per_col, axis=1)
    if kind == "ratio":
        num = np.asarray(arrays[recipe["num"]], np.float64).reshape(W.shape[1], -1)
        den = np.asarray(arrays[recipe["den"]], np.float64).reshape(W.shape[1], -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_col = np.where(W @ den > 0, (W @ num) / (W @ den), np.nan)
        return np.nanmean(per_col, axis=1)
    raise ValueError(f"unknown metric recipe kind {kind!r}")


def n_samples(recipe: Mapping[str, Any], arrays: Arrays) -> int:
    """Number of test samples the recipe's arrays cover."""
    key = {"macro_auc": "scores", "recall": "ranks", "mean": "values", "ratio": "num"}[recipe["kind"]]
    return len(arrays[recipe[key]])


def metric_value(recipe: Mapping[str, Any], arrays: Arrays) -> float:
    """The recipe's metric on all samples (weight 1 each)."""
    n = n_samples(recipe, arrays)
    return float(metric_under_weights(recipe, arrays, np.ones((1, n)))[0])


#: label patterns with fewer test samples than this are pooled into one stratum (see :func:`label_strata`)
MIN_STRATUM = 5


def label_strata(labels: np.ndarray, min_size: int = MIN_STRATUM) -> np.ndarray:
    """Stratum id per sample = its label pattern (NaN counts as its own value); patterns with fewer than
    ``min_size`` samples share one pooled stratum.

    A stratum of one sample is resampled as itself in every resample, so with many rare patterns
    (many label columns, few samples) pure pattern strata would freeze most of the test set and give
    too narrow (down to zero-width) intervals. Pooling keeps the frequent patterns' positives fixed
    and lets the rare ones vary; a class that loses all its positives or negatives in a resample is
    left out of that resample's macro AUC (:func:`weighted_macro_auc`).
    """
    pattern = np.where(np.isnan(labels), -1.0, labels)
    ids = np.unique(pattern, axis=0, return_inverse=True)[1].reshape(-1)
    counts = np.bincount(ids)
    rare = counts[ids] < min_size
    if rare.any():
        ids = np.where(rare, -1, ids)
        ids = np.unique(ids, return_inverse=True)[1].reshape(-1)
    return ids


def bootstrap_weights(n: int, n_boot: int = 1000, seed: int = 0, strata: np.ndarray | None = None) -> np.ndarray:
    """``n_boot × n`` multiplicities of ``n`` samples drawn with replacement (within each stratum)."""
    rng = np.random.default_rng(seed)
    strata = np.zeros(n, np.int64) if strata is None else np.asarray(strata)
    flat = np.zeros(n_boot * n)
    offsets = (np.arange(n_boot) * n)[:, None]
    for g in np.unique(strata):
        members = np.flatnonzero(strata == g)
        pick = members[rng.integers(0, len(members), (n_boot, len(members)))]
        flat += np.bincount((pick + offsets).ravel(), minlength=n_boot * n)
    W = flat.reshape(n_boot, n)
    return W


def strata_for(units: Sequence[Unit]) -> np.ndarray | None:
    """Label-pattern strata when the first unit's metric is an AUC (stratified bootstrap), else ``None``."""
    recipe, arrays = units[0]
    return label_strata(np.asarray(arrays[recipe["labels"]], np.float64)) if recipe["kind"] == "macro_auc" else None


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval (linear interpolation) of bootstrap values."""
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(values, np.float64), [a, 100 - a])
    return float(lo), float(hi)


def bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value of H0 Δ = 0: ``min(1, 2·min((1 + #{Δ* ≤ 0}), (1 + #{Δ* ≥ 0})) / (B + 1))``."""
    d = np.asarray(deltas, np.float64)
    b = len(d)
    return float(min(1.0, 2 * min(1 + np.sum(d <= 0), 1 + np.sum(d >= 0)) / (b + 1)))


def _units_mean(units: Sequence[Unit], W: np.ndarray) -> np.ndarray:
    return np.mean([metric_under_weights(r, a, W) for r, a in units], axis=0)


def cell_interval(units: Sequence[Unit], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Value (mean over units) and bootstrap CI over test samples; ``n`` = test samples, ``units`` = seeds."""
    n = n_samples(*units[0])
    value = float(_units_mean(units, np.ones((1, n)))[0])
    boot = _units_mean(units, bootstrap_weights(n, n_boot, seed, strata_for(units)))
    lo, hi = percentile_ci(boot, level)
    return {"value": value, "lo": lo, "hi": hi, "n": n, "units": len(units)}


def paired_difference(units_a: Sequence[Unit], units_b: Sequence[Unit], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, float]:
    """Paired bootstrap of Δ = mean_units(A) − mean_units(B) over the same resampled test samples."""
    n = n_samples(*units_a[0])
    ones = np.ones((1, n))
    delta = float(_units_mean(units_a, ones)[0] - _units_mean(units_b, ones)[0])
    W = bootstrap_weights(n, n_boot, seed, strata_for(units_a))
    d = _units_mean(units_a, W) - _units_mean(units_b, W)
    lo, hi = percentile_ci(d, level)
    return {"delta": delta, "lo": lo, "hi": hi, "p": bootstrap_p(d)}


def _group_metric(groups: Sequence[Sequence[Unit]], W: np.ndarray) -> np.ndarray:
    """``G × B``: per pretraining seed (group), the mean over its units of the metric under each row of ``W``."""
    return np.stack([_units_mean(g, W) for g in groups])


def seed_level_difference(groups_a: Sequence[Sequence[Unit]], groups_b: Sequence[Sequence[Unit]], n_boot: int = 1000,
                          seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Two-level (hierarchical) bootstrap of Δ = mean over seeds of A − mean over seeds of B.

    ``groups_*`` hold one list of units per pretraining seed (a group's units, e.g. probe seeds, are
    averaged first). Each resample draws test-sample weights shared by both sides (paired on the test
    set, stratified as :func:`strata_for`) and, independently for A and B, as many pretraining seeds as
    each side has, with replacement. With few seeds the seed level's spread is underestimated by
    about ``(G − 1) / G`` (the plug-in bootstrap variance); with one seed per side it reduces to
    :func:`paired_difference` on the test samples.

    Returns:
        ``delta``, ``lo``, ``hi`` (percentile CI), ``p`` (:func:`bootstrap_p`), the per-seed values
        ``seeds_a`` / ``seeds_b`` and their counts ``g_a`` / ``g_b``, and ``n`` test samples.

    Raises:
        ValueError: when a side has no seed.
    """
    if not groups_a or not groups_b:
        raise ValueError("seed_level_difference needs at least one pretraining seed on each side")
    n = n_samples(*groups_a[0][0])
    ones = np.ones((1, n))
    va, vb = _group_metric(groups_a, ones)[:, 0], _group_metric(groups_b, ones)[:, 0]
    W = bootstrap_weights(n, n_boot, seed, strata_for(groups_a[0]))
    ma, mb = _group_metric(groups_a, W), _group_metric(groups_b, W)  # G × B
    rng = np.random.default_rng([seed, 1])
    cols = np.arange(n_boot)[:, None]
    pick_a = rng.integers(0, len(groups_a), (n_boot, len(groups_a)))
    pick_b = rng.integers(0, len(groups_b), (n_boot, len(groups_b)))
    d = ma[pick_a, cols].mean(1) - mb[pick_b, cols].mean(1)
    lo, hi = percentile_ci(d, level)
    return {"delta": float(va.mean() - vb.mean()), "lo": lo, "hi": hi, "p": bootstrap_p(d),
            "seeds_a": va.tolist(), "seeds_b": vb.tolist(), "g_a": len(groups_a), "g_b": len(groups_b), "n": n}


def auc_influence(scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Macro AUC and per-sample DeLong influence values ``φ`` such that, for one class,
    ``Σ φ² = S10/m + S01/n`` (DeLong's variance; ``S`` with ddof 1) and the macro AUC's influence is
    the mean of the classes'. Samples with an unknown label of a class contribute 0 to it."""
    ks = _valid_classes(labels)
    if not ks:
        raise ValueError("no class has both positive and negative labels: AUC undefined")
    phi = np.zeros(len(scores))
    aucs = []
    for k in ks:
        ok = np.flatnonzero(~np.isnan(labels[:, k]))
        y = labels[ok, k] > 0.5
        s = scores[ok, k].astype(np.float64)
        m, n = int(y.sum()), int((~y).sum())
        H = _pair_matrix(s[y], s[~y])
        v10, v01 = H.mean(1), H.mean(0)
        auc = float(v10.mean())
        aucs.append(auc)
        phi[ok[y]] += (v10 - auc) / math.sqrt(m * max(m - 1, 1))
        phi[ok[~y]] += (v01 - auc) / math.sqrt(n * max(n - 1, 1))
    return float(np.mean(aucs)), phi / len(ks)


def normal_two_sided_p(z: float) -> float:
    """``2·(1 − Φ(|z|))``."""
    return float(math.erfc(abs(z) / math.sqrt(2)))


def delong_difference(units_a: Sequence[Unit], units_b: Sequence[Unit]) -> dict[str, float]:
    """DeLong test of Δ = mean_units(macro AUC of A) − mean_units(macro AUC of B) on the same samples.

    Returns Δ, its standard error, the normal-theory 95 % CI and two-sided p-value.
    """
    def mean_influence(units: Sequence[Unit]) -> tuple[float, np.ndarray]:
        out = [auc_influence(np.asarray(a[r["scores"]]), np.asarray(a[r["labels"]], np.float64)) for r, a in units]
        return float(np.mean([v for v, _ in out])), np.mean([p for _, p in out], axis=0)

    va, pa = mean_influence(units_a)
    vb, pb = mean_influence(units_b)
    delta = va - vb
    se = float(math.sqrt(np.sum((pa - pb) ** 2)))
    p = 1.0 if se == 0 and delta == 0 else (0.0 if se == 0 else normal_two_sided_p(delta / se))
    return {"delta": delta, "se": se, "lo": delta - 1.959964 * se, "hi": delta + 1.959964 * se, "p": p}


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (same order as given; NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="mergesort")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def align_samples(arrays: dict[str, np.ndarray], order: np.ndarray) -> dict[str, np.ndarray] | None:
    """A unit's per-sample arrays reordered to the sample ids ``order``; ``None`` when its ids are another set."""
    pos = {str(i): k for k, i in enumerate(arrays["ids"])}
    if set(pos) != set(map(str, order)):
        return None
    idx = np.array([pos[str(i)] for i in order])
    n = len(arrays["ids"])
    return {k: (v[idx] if v.ndim and len(v) == n and k != "class_names" else v) for k, v in arrays.items()}
