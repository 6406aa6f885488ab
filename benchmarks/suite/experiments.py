"""Controlled experiments: claims about a method's mechanism, tested on stored suite results.

An *experiment* is a benchmark suite (``benchmarks/suites/exp_*.yaml``) with an ``experiment`` block::

    experiment:
      title: Region grounding (ASG)
      claim: ASG's region–sentence alignment grounds finding sentences better than CLIP
      factor: what the phantom controls (documentation)
      comparisons:
        - {a: asg, b: clip, dataset: phantom_xray, protocol: grounding, metric: pointing_game}
        - {a: asg, b: asg_no_arsa, dataset: phantom_xray, protocol: grounding, metric: pointing_game}

Each comparison names two method labels of the suite, a dataset key, a protocol key, a metric and
optionally ``fraction`` (default: the largest the protocol ran) and ``expect`` (``greater``, the default,
or ``less``: the direction the claim predicts for ``a − b``). The suite runs every method with several
``pretrain_seeds``; :func:`claim_outcomes` recomputes, from the stored per-sample outputs, Δ = mean over
A's pretraining seeds − mean over B's with a two-level bootstrap CI
(:func:`medvlp.benchmarks.metrics.stats.seed_level_difference`: seeds and test samples resampled), a two-sided
p-value, Holm's correction over the experiment's comparisons, and an outcome decided by the Holm-adjusted
p-value (the CI shown is per comparison, not adjusted):

* ``shown``: adjusted p < 0.05 and Δ in the expected direction;
* ``opposite``: adjusted p < 0.05 and Δ in the other direction;
* ``not shown``: adjusted p ≥ 0.05 (no effect separable from noise at this scale).

``experiment`` may also be a list of such blocks when one suite's pretrained models serve several
claims (e.g. the X-ray arms feed the grounding and the segmentation-sanity experiments). The runner
stores the blocks as ``experiment.yaml`` beside ``results.csv``; ``medvlp report`` adds the
outcomes to the report of that folder and ``medvlp experiments`` runs and summarises every experiment.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from medvlp.benchmarks.metrics import stats
from medvlp.benchmarks.suite.results import ResultStore
from medvlp.benchmarks.suite.schema import load_suite
from medvlp.io import atomic_write_text
from importlib import resources

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.yaml"
PREFIX = "exp_"
_KEYS = {"name", "a", "b", "dataset", "protocol", "metric", "fraction", "expect"}


@dataclass(frozen=True)
class Comparison:
    """One tested difference ``a − b`` of a metric cell (see module docstring)."""

    a: str
    b: str
    dataset: str
    protocol: str
    metric: str
    fraction: float | None = None
    expect: str = "greater"
    name: str = ""

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str) -> Comparison:
        """Build from a YAML mapping; errors name ``where`` and the offending key."""
        unknown = set(spec) - _KEYS
        if unknown:
            raise ValueError(f"{where}: unknown comparison keys {sorted(unknown)} (known: {sorted(_KEYS)})")
        missing = {"a", "b", "dataset", "protocol", "metric"} - set(spec)
        if missing:
            raise ValueError(f"{where}: comparison needs {sorted(missing)}")
        expect = str(spec.get("expect", "greater"))
        if expect not in ("greater", "less"):
            raise ValueError(f"{where}: expect must be 'greater' or 'less', got {expect!r}")
        frac = spec.get("fraction")
        return cls(str(spec["a"]), str(spec["b"]), str(spec["dataset"]), str(spec["protocol"]), str(spec["metric"]),
                   None if frac is None else float(frac), expect, str(spec.get("name", "")))

    @property
    def title(self) -> str:
        return self.name or f"{self.a} − {self.b}: {self.dataset} {self.protocol} {self.metric}"


def parse_experiment(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate an ``experiment`` block; returns it with ``comparisons`` as :class:`Comparison` objects.

    Raises:
        ValueError: naming ``where`` when ``title``, ``claim`` or ``comparisons`` is missing or malformed.
    """
    for key in ("title", "claim", "comparisons"):
        if not block.get(key):
            raise ValueError(f"{where}: experiment needs a non-empty {key!r}")
    comps = [Comparison.from_spec(c, f"{where} comparison {i}") for i, c in enumerate(block["comparisons"])]
    return {**dict(block), "comparisons": comps}


def check_against_suite(experiment: Mapping[str, Any], suite: Mapping[str, Any], where: str) -> None:
    """Every comparison names a method label, dataset and protocol key of ``suite``.

    Raises:
        ValueError: naming the comparison and the known keys.
    """
    for c in experiment["comparisons"]:
        for side in (c.a, c.b):
            if side not in suite["methods"]:
                raise ValueError(f"{where}: comparison {c.title!r} names method {side!r}; suite methods: {sorted(suite['methods'])}")
        if c.dataset not in suite["datasets"]:
            raise ValueError(f"{where}: comparison {c.title!r} names dataset {c.dataset!r}; suite datasets: {sorted(suite['datasets'])}")
        if c.protocol not in suite["protocols"]:
            raise ValueError(f"{where}: comparison {c.title!r} names protocol {c.protocol!r}; suite protocols: {sorted(suite['protocols'])}")


def parse_experiments(block: Any, where: str) -> list[dict[str, Any]]:
    """Parse an ``experiment`` value: one block or a list of blocks (:func:`parse_experiment` each)."""
    blocks = block if isinstance(block, (list, tuple)) else [block]
    out = [parse_experiment(b, f"{where} experiment {i}") for i, b in enumerate(blocks)]
    titles = [e["title"] for e in out]
    if len(set(titles)) != len(titles):
        raise ValueError(f"{where}: experiment titles must differ, got {titles}")
    return out


def write_experiment(suite: Mapping[str, Any]) -> Path | None:
    """Store the suite's ``experiment`` block(s) as ``<output>/experiment.yaml`` (nothing if it has none)."""
    block = suite.get("experiment")
    if not block:
        return None
    where = f"suite {suite.get('name')!r}"
    for exp in parse_experiments(block, where):
        check_against_suite(exp, suite, where)
    blocks = list(block) if isinstance(block, (list, tuple)) else [dict(block)]
    path = Path(suite["output"]) / EXPERIMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump({"suite": suite.get("name"), "pretrain_seeds": suite.get("pretrain_seeds"),
                                            "experiments": blocks}, sort_keys=False))
    return path


def load_experiments(results_dir: str | Path) -> list[dict[str, Any]] | None:
    """The parsed experiments of a results folder's ``experiment.yaml``, or ``None``."""
    path = Path(results_dir) / EXPERIMENT_FILE
    if not path.is_file():
        return None
    return parse_experiments((yaml.safe_load(path.read_text()) or {}).get("experiments") or [], str(path))


def _seed_groups(df: pd.DataFrame, store: ResultStore, label: str, c: Comparison) -> tuple[list[list[stats.Unit]], float, list[str]]:
    """Per pretraining seed of ``label``, the units of the comparison's cell (aligned by sample id)."""
    rows = df[(df["label"] == label) & (df["dataset"] == c.dataset) & (df["protocol"] == c.protocol)
              & (df["metric"] == c.metric)]
    if rows.empty:
        raise LookupError(f"no rows for {label} {c.dataset} {c.protocol} {c.metric}")
    fractions = rows["fraction"].astype(float)
    frac = float(fractions.max()) if c.fraction is None else c.fraction
    rows = rows[np.isclose(fractions, frac)]
    if rows.empty:
        raise LookupError(f"{label} {c.dataset} {c.protocol} {c.metric}: no rows at fraction {frac:g}")
    flags = sorted({f for fl in rows["flags"] for f in str(fl).split(" | ") if f.startswith("degenerate")})
    groups = []
    for _, g in rows.groupby("pretrain_seed", sort=True):
        rels = sorted(set(g["samples"]) - {""})
        if not rels:
            raise LookupError(f"{label} {c.dataset} {c.protocol} {c.metric}: no per-sample outputs stored")
        units = []
        for rel in rels:
            arrays, recipes = store.load_samples(rel)
            if c.metric not in recipes:
                raise LookupError(f"{rel}: no recipe for {c.metric}")
            units.append((recipes[c.metric], arrays))
        groups.append(units)
    return groups, frac, flags


def _align(groups: list[list[stats.Unit]], order: np.ndarray | None) -> list[list[stats.Unit]]:
    """Reorder every unit's per-sample arrays to the sample ids ``order`` (the test set both sides share)."""
    if order is None:
        return groups
    out = []
    for units in groups:
        aligned = []
        for recipe, arrays in units:
            if "ids" in arrays:
                arrays = stats.align_samples(dict(arrays), order)
                if arrays is None:
                    raise LookupError("the two sides were evaluated on different test samples; cannot pair them")
            aligned.append((recipe, arrays))
        out.append(aligned)
    return out


def outcome_of(lo: float, hi: float, expect: str) -> str:
    """``shown`` / ``opposite`` / ``not shown`` for a CI of ``a − b`` and the expected direction."""
    sign = 1.0 if expect == "greater" else -1.0
    lo_s, hi_s = sorted((sign * lo, sign * hi))
    if lo_s > 0:
        return "shown"
    if hi_s < 0:
        return "opposite"
    return "not shown"


def claim_outcomes(results_dir: str | Path, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Outcome of every comparison of the experiments stored in ``results_dir`` (see module docstring).

    Comparisons whose cells are missing, degenerate or lack per-sample outputs get outcome
    ``not measured`` with the reason, never a number. Holm's correction runs within each experiment.

    Raises:
        FileNotFoundError: when the folder has no ``experiment.yaml`` or ``results.csv``.
    """
    exps = load_experiments(results_dir)
    if exps is None:
        raise FileNotFoundError(f"{results_dir}: no {EXPERIMENT_FILE} (not an experiment's results folder)")
    store = ResultStore(Path(results_dir) / "results.csv")
    if store.df.empty:
        raise FileNotFoundError(f"{results_dir}: no result rows yet")
    meta = yaml.safe_load((Path(results_dir) / EXPERIMENT_FILE).read_text()) or {}
    planned = len(meta.get("pretrain_seeds") or [])
    return pd.concat([_outcomes(exp, store, n_boot, seed, planned) for exp in exps], ignore_index=True)


def _outcomes(exp: Mapping[str, Any], store: ResultStore, n_boot: int, seed: int, planned: int = 0) -> pd.DataFrame:
    df = store.df
    rows = []
    for c in exp["comparisons"]:
        base = {"experiment": exp["title"], "comparison": c.title, "a": c.a, "b": c.b, "dataset": c.dataset,
                "protocol": c.protocol, "metric": c.metric, "expect": c.expect}
        try:
            ga, fa, flags_a = _seed_groups(df, store, c.a, c)
            gb, fb, flags_b = _seed_groups(df, store, c.b, c)
            if flags_a or flags_b:
                raise LookupError("degenerate cell: " + "; ".join(flags_a + flags_b))
            if not np.isclose(fa, fb):
                raise LookupError(f"fractions differ ({fa:g} vs {fb:g})")
            order = ga[0][0][1].get("ids")
            res = stats.seed_level_difference(_align(ga, order), _align(gb, order), n_boot, seed)
        except LookupError as exc:
            rows.append({**base, "outcome": "not measured", "reason": str(exc)})
            continue
        recipe = ga[0][0][0]
        rows.append({**base, "fraction": fa, "mean_a": float(np.mean(res["seeds_a"])), "mean_b": float(np.mean(res["seeds_b"])),
                     "seeds_a": json.dumps([round(v, 4) for v in res["seeds_a"]]),
                     "seeds_b": json.dumps([round(v, 4) for v in res["seeds_b"]]),
                     "delta": res["delta"], "lo": res["lo"], "hi": res["hi"], "p": res["p"], "n_test": res["n"],
                     "chance": recipe.get("chance"), "outcome": outcome_of(res["lo"], res["hi"], c.expect),
                     "reason": (f"only {min(res['g_a'], res['g_b'])} of {planned} pretraining seeds stored"
                                if planned and min(res["g_a"], res["g_b"]) < planned else "")})
    out = pd.DataFrame(rows)
    measured = out["outcome"] != "not measured"
    out["p_holm"] = np.nan
    if measured.any():
        out.loc[measured, "p_holm"] = stats.holm(out.loc[measured, "p"].to_numpy())
        out.loc[measured, "outcome"] = [outcome_of_test(d, p, e) for d, p, e in
                                        out.loc[measured, ["delta", "p_holm", "expect"]].itertuples(index=False)]
    return out


def outcome_of_test(delta: float, p_holm: float, expect: str, alpha: float = 0.05) -> str:
    """``shown`` / ``opposite`` (Holm-adjusted ``p < alpha``, Δ in / against the expected direction) or ``not shown``."""
    if not p_holm < alpha:
        return "not shown"
    return "shown" if (delta > 0) == (expect == "greater") else "opposite"


def outcomes_markdown(outcomes: pd.DataFrame, exps: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per experiment its claim, then one row per comparison with per-seed values, Δ, CI, p, outcome."""
    lines: list[str] = []
    for exp in exps:
        lines += [f"### {exp['title']}\n", f"*Claim:* {exp['claim']}\n"]
        if exp.get("factor"):
            lines.append(f"*Controlled factor:* {exp['factor']}\n")
        lines += ["| comparison | A per seed | B per seed | Δ = A − B [95 % CI] | p (Holm) | outcome |",
                  "|---|---|---|---|---|---|"]
        for _, r in outcomes[outcomes["experiment"] == exp["title"]].iterrows():
            if r["outcome"] == "not measured":
                lines.append(f"| {r['comparison']} | — | — | — | — | not measured ({r['reason']}) |")
                continue
            chance = "" if r.get("chance") is None or pd.isna(r.get("chance")) else f" (chance {float(r['chance']):.3f})"
            lines.append(f"| {r['comparison']}{chance} | {r['a']}: {_seeds(r['seeds_a'])} | {r['b']}: {_seeds(r['seeds_b'])} | "
                         f"{r['delta']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['p_holm']:.3g} | "
                         f"**{r['outcome']}** (expected {'>' if r['expect'] == 'greater' else '<'} 0)"
                         + (f"; {r['reason']}" if r.get("reason") else "") + " |")
        lines.append("")
    lines.append("Δ: mean over pretraining seeds; CI and p: two-level bootstrap (pretraining seeds and test samples "
                 "resampled; test samples paired; CI not adjusted for multiplicity); p: two-sided bootstrap p, Holm-adjusted "
                 "over each experiment's comparisons. *shown*: adjusted p < 0.05 with Δ in the expected direction; "
                 "*opposite*: adjusted p < 0.05 with Δ the other way; *not shown*: adjusted p ≥ 0.05.")
    return "\n".join(lines) + "\n"


def _seeds(text: str) -> str:
    return ", ".join(f"{v:.3f}" for v in json.loads(text))


def summary_lines(outcomes: pd.DataFrame) -> list[str]:
    """One line per experiment: outcome counts and the first comparison's Δ and CI."""
    lines = []
    for title, g in outcomes.groupby("experiment", sort=False):
        measured = g[g["outcome"] != "not measured"]
        counts = ", ".join(f"{k} {v}" for k, v in measured["outcome"].value_counts().items()) or "nothing measured"
        first = ""
        if len(measured):
            r = measured.iloc[0]
            first = f"; {r['comparison']}: Δ {r['delta']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] {r['outcome']}"
        lines.append(f"{title}: {len(measured)}/{len(g)} comparisons measured ({counts}){first}")
    return lines


def packaged_experiments() -> list[str]:
    """Names of the packaged experiment suites (``exp_*``), sorted."""

    folder = resources.files("medvlp.benchmarks") / "suites"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.startswith(PREFIX) and p.name.endswith(".yaml"))


def stored_summaries(names: Sequence[str] | None = None) -> list[str]:
    """Summary lines from the last stored run of each packaged experiment (``not run yet`` when absent)."""
    lines = []
    for name in names or packaged_experiments():
        suite = load_suite(name)
        folder = Path(suite["output"])
        titles = [e["title"] for e in parse_experiments(suite["experiment"], name)]
        if not (folder / EXPERIMENT_FILE).is_file() or not (folder / "results.csv").is_file():
            lines += [f"{t}: not run yet (make experiments)" for t in titles]
            continue
        try:
            lines += summary_lines(claim_outcomes(folder))  # the n_boot of medvlp experiments: same outcomes
        except (LookupError, ValueError, FileNotFoundError) as exc:
            lines += [f"{t}: stored results unreadable ({exc})" for t in titles]
    return lines
