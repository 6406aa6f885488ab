"""Render result rows as a headline table, comparisons to a reference row, detailed tables, per-class
AUC tables, plots and one self-contained ``report.html``.

A *cell* is every row of one (label, dataset, protocol key, params, fraction, metric): protocol
parameters are part of the cell, so runs with different ``C`` are never averaged. Its units (seeds:
pretraining × label subset × training) are averaged; the 95 % CI is a bootstrap over test samples of
that average (:mod:`medvlp.benchmarks.metrics.stats`, stratified by label pattern for AUC), and differences to
the reference row are paired on the same test samples.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from medvlp.benchmarks.metrics import stats
from medvlp.benchmarks.suite.results import ResultStore
from medvlp.io import atomic_write_text
from medvlp.paths import slug
from medvlp.registry import BENCHMARKS
from medvlp.benchmarks.suite.experiments import claim_outcomes, load_experiments, outcomes_markdown
from medvlp.benchmarks.suite.paper_view import LABEL_DERIVED
from medvlp.benchmarks.suite.paper_view import paper_table

log = logging.getLogger(__name__)

GROUP = ["label", "dataset", "protocol", "protocol_name", "params", "fraction", "metric"]
CELL = ["dataset", "protocol", "protocol_name", "params", "fraction", "metric"]
ALPHA = 0.05


def _fill(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col, default in (("params", "{}"), ("flags", ""), ("samples", ""), ("checkpoint", ""), ("method", "")):
        if col not in df.columns:
            df[col] = default
        df[col] = df[col].fillna(default).astype(str).replace("", default)
    if "protocol_name" not in df.columns:
        df["protocol_name"] = df["protocol"]
    df["protocol_name"] = [p or k for p, k in zip(df["protocol_name"].fillna("").astype(str), df["protocol"])]
    df["fraction"] = df["fraction"].astype(float)
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1; 0 for one unit) and number of units (seeds) per cell; flags and sample files kept."""
    df = _fill(df)
    rows = []
    for key, g in df.groupby(GROUP, sort=False):
        v = g["value"].astype(float)
        flags = sorted({f for fl in g["flags"] for f in fl.split(" | ") if f})
        rows.append({**dict(zip(GROUP, key)), "mean": float(v.mean()),
                     "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v)),
                     "flags": " | ".join(flags), "degenerate": any(f.startswith("degenerate") for f in flags),
                     "samples": json.dumps(sorted(set(g["samples"]) - {""})),
                     "reference_candidate": bool((g["checkpoint"] == "random-init").all())})
    return pd.DataFrame(rows)


def _registered(name: str) -> Any | None:

    try:
        return BENCHMARKS.get(name)
    except (KeyError, ValueError):
        return None


def _fmt_param(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _param_tags(summary: pd.DataFrame) -> dict[tuple[str, str, str], str]:
    """``[k=v, ...]`` of the parameters that differ between variants of one (dataset, protocol key)."""
    tags = {}
    for (ds, proto), g in summary.groupby(["dataset", "protocol"], sort=False):
        variants = list(dict.fromkeys(g["params"]))
        if len(variants) < 2:
            tags.update({(ds, proto, p): "" for p in variants})
            continue
        parsed = {p: json.loads(p) if p.strip() else {} for p in variants}
        keys = sorted({k for d in parsed.values() for k in d if len({json.dumps(x.get(k)) for x in parsed.values()}) > 1})
        for p, d in parsed.items():
            tags[(ds, proto, p)] = "[" + ", ".join(f"{k}={_fmt_param(d[k])}" for k in keys if k in d) + "]"
    return tags


def _uses_fractions(summary: pd.DataFrame) -> dict[tuple[str, str, str], bool]:
    out = {}
    for (ds, proto, params), g in summary.groupby(["dataset", "protocol", "params"], sort=False):
        cls = _registered(g["protocol_name"].iloc[0])
        fr = set(g["fraction"].astype(float))
        out[(ds, proto, params)] = bool(getattr(cls, "uses_fractions", False)) or len(fr) > 1 or fr != {1.0}
    return out


def add_columns(summary: pd.DataFrame) -> pd.DataFrame:
    """Add ``column`` (``<protocol key>[params]@<fraction>``) naming every cell."""
    s = summary.copy()
    tags, frac = _param_tags(s), _uses_fractions(s)
    s["column"] = [f"{p}{tags[(d, p, pa)]}" + (f"@{float(f):g}" if frac[(d, p, pa)] else "")
                   for d, p, pa, f in zip(s["dataset"], s["protocol"], s["params"], s["fraction"])]
    return s


def _cell_text(r: pd.Series, fmt: str = "{:.3f}") -> str:
    text = fmt.format(r["mean"]) + (f" ± {fmt.format(r['std'])}" if r["n"] > 1 else "")
    if "lo" in r and pd.notna(r.get("lo")):
        text += f" [{fmt.format(r['lo'])}, {fmt.format(r['hi'])}]"
    if r["n"] > 1:
        text += f" ({r['n']} seeds)"
    return ("⚠ " + text) if r.get("degenerate", False) else text


def wide_table(summary: pd.DataFrame, fmt: str = "{:.3f}") -> pd.DataFrame:
    """Methods as rows, ``<column> <metric>`` as columns; cells ``mean ± std [95 % CI] (k seeds)``.

    Raises:
        ValueError: naming the label and column when two cells would land in one (never dropped silently).
    """
    s = summary if "column" in summary.columns else add_columns(summary)
    s = s.copy()
    s["column"] = s["column"] + " " + s["metric"]
    dup = s[s.duplicated(["label", "column"], keep=False)]
    if len(dup):
        r = dup.iloc[0]
        raise ValueError(f"two result cells for label {r['label']!r}, column {r['column']!r}: "
                         "group by every parameter that changes a result")
    s["cell"] = [_cell_text(r, fmt) for _, r in s.iterrows()]
    order = list(dict.fromkeys(s["column"]))
    table = s.pivot(index="label", columns="column", values="cell")
    labels = list(dict.fromkeys(s["label"]))
    return table.loc[labels, order].fillna("—").rename_axis(index="method", columns=None)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    cols = [table.index.name or "method"] + list(table.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row]) + " |")
    return "\n".join(lines) + "\n"


#: at most this many value columns per LaTeX tabular / HTML table; wider tables are split (method column repeated)
MAX_COLUMNS = 6


def split_columns(table: pd.DataFrame, width: int = MAX_COLUMNS) -> list[pd.DataFrame]:
    """``table`` as consecutive column blocks of at most ``width`` columns (one block when it fits)."""
    cols = list(table.columns)
    return [table[cols[i:i + width]] for i in range(0, len(cols), width)] or [table]


def to_latex(table: pd.DataFrame) -> str:
    """Booktabs LaTeX tabulars (split every :data:`MAX_COLUMNS` columns); ``**best**`` is set in bold."""
    def esc(s: Any) -> str:
        parts = re.split(r"\*\*(.+?)\*\*", str(s))  # odd indices: bold spans
        return "".join(r"\textbf{" + _tex(p) + "}" if i % 2 else _tex(p) for i, p in enumerate(parts))

    blocks = []
    for part in split_columns(table):
        cols = [table.index.name or "method"] + list(part.columns)
        lines = [r"\begin{tabular}{l" + "c" * len(part.columns) + "}", r"\toprule",
                 " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
        for idx, row in part.iterrows():
            lines.append(" & ".join([esc(idx)] + [esc(v) for v in row]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _tex(s: str) -> str:
    s = s.replace("\\", r"\textbackslash{}")
    for a, b in (("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("±", r"$\pm$"), ("†", r"$^\dagger$"),
                 ("⚠", r"(!)"), ("Δ", r"$\Delta$")):
        s = s.replace(a, b)
    return s


def definitions(df: pd.DataFrame) -> str:
    """One definition line per cell column (dataset, protocol key, params, fraction, metric), each its own
    (the first unit's sentence when seeds word it differently)."""
    d = add_columns(_fill(df))
    seen = d.drop_duplicates(["dataset", "column", "metric"])
    return "\n".join(f"- **{r.dataset} {r.column} {r.metric}**: {r.definition}" for r in seen.itertuples()) + "\n"


# ----------------------------------------------------------------------------- statistics per cell
class SampleBank:
    """Per-sample arrays of the units of a result file, loaded lazily and aligned by sample id."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self._cache: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}

    def load(self, rel: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if rel not in self._cache:
            self._cache[rel] = self.store.load_samples(rel)
        return self._cache[rel]

    def units(self, cell: pd.Series, order: np.ndarray | None = None) -> list[stats.Unit] | None:
        """``[(recipe, arrays)]`` of a summary cell (aligned to ``order`` of ids), or ``None`` when the
        cell has no stored per-sample outputs or recipe for its metric."""
        rels = json.loads(cell["samples"])
        if not rels:
            return None
        out = []
        for rel in rels:
            arrays, recipes = self.load(rel)
            recipe = recipes.get(cell["metric"])
            if recipe is None:
                return None
            if order is not None and "ids" in arrays:
                aligned = stats.align_samples(arrays, order)
                if aligned is None:
                    raise ValueError(f"{rel}: test sample ids differ from the other units of {cell['label']} "
                                     f"{cell['dataset']} {cell['protocol']}; cannot pair them")
                arrays = aligned
            out.append((recipe, arrays))
        return out

    def ids(self, cell: pd.Series) -> np.ndarray | None:
        rels = json.loads(cell["samples"])
        return self.load(rels[0])[0].get("ids") if rels else None


def add_intervals(summary: pd.DataFrame, bank: SampleBank, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Add ``lo``, ``hi`` (bootstrap 95 % CI of the mean over units), ``n_test`` and ``chance``."""
    s = summary.copy()
    lo, hi, n_test, chance, better = [], [], [], [], []
    for _, r in s.iterrows():
        units = bank.units(r, bank.ids(r))
        if units is None:
            lo.append(np.nan), hi.append(np.nan), n_test.append(np.nan), chance.append(np.nan), better.append(True)
            continue
        ci = stats.cell_interval(units, n_boot, seed)
        lo.append(ci["lo"]), hi.append(ci["hi"]), n_test.append(ci["n"])
        chance.append(np.nan if units[0][0].get("chance") is None else float(units[0][0]["chance"]))
        better.append(bool(units[0][0].get("higher_is_better", True)))
    s["lo"], s["hi"], s["n_test"], s["chance"], s["higher_is_better"] = lo, hi, n_test, chance, better
    return s


def pick_reference(summary: pd.DataFrame, reference: str | None = None) -> str | None:
    """``reference`` if given, else the random-init row, else a label or method named ``clip``."""
    labels = list(dict.fromkeys(summary["label"]))
    if reference:
        if reference not in labels:
            raise ValueError(f"reference {reference!r} is not a label in the results (labels: {labels})")
        return reference
    rand = summary[summary["reference_candidate"]]["label"]
    if len(rand):
        return str(rand.iloc[0])
    return next((lab for lab in labels if lab.lower().startswith("clip")), None)


def compare(summary: pd.DataFrame, bank: SampleBank, reference: str, n_boot: int = 1000,
            seed: int = 0) -> pd.DataFrame:
    """Δ of every label vs ``reference`` per cell: paired bootstrap (CI, p) and, for AUC, DeLong (CI, p).
    Degenerate cells (either side) are not compared."""
    rows = []
    ref = {tuple(r[c] for c in CELL): r for _, r in summary[summary["label"] == reference].iterrows()}
    for _, r in summary[summary["label"] != reference].iterrows():
        rr = ref.get(tuple(r[c] for c in CELL))
        if rr is None or r["degenerate"] or rr["degenerate"]:
            continue
        order = bank.ids(rr)
        ua = bank.units(r, order)
        ub = bank.units(rr, order)
        if ua is None or ub is None:
            continue
        boot = stats.paired_difference(ua, ub, n_boot, seed)
        row = {**{c: r[c] for c in CELL}, "label": r["label"], "reference": reference, "delta": boot["delta"],
               "lo": boot["lo"], "hi": boot["hi"], "p_boot": boot["p"], "p_delong": np.nan}
        if ua[0][0]["kind"] == "macro_auc":
            dl = stats.delong_difference(ua, ub)
            row.update(p_delong=dl["p"], lo_delong=dl["lo"], hi_delong=dl["hi"])
        row["p"] = row["p_delong"] if not np.isnan(row["p_delong"]) else row["p_boot"]
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["p_holm"] = stats.holm(out["p"].to_numpy())
        out["significant"] = out["p_holm"] < ALPHA
    return out


# ----------------------------------------------------------------------------- headline
def saturated(cells: pd.DataFrame) -> bool:
    """Whether one metric's cells (every label, one column) cannot tell methods apart: its chance level is
    the ceiling (e.g. recall@10 among 10 test pairs), or every label scores the same value with a zero-width
    interval (no resample moves it)."""
    if cells.empty:
        return False
    chance = cells["chance"].dropna() if "chance" in cells else pd.Series(dtype=float)
    if len(chance) and float(chance.iloc[0]) >= 1.0 - 1e-9:
        return True
    means = cells["mean"].to_numpy(dtype=float)
    if not np.allclose(means, means[0]):
        return False
    if "lo" in cells and cells["lo"].notna().all():
        return bool(np.allclose(cells["lo"], cells["hi"]))
    return len(cells) > 1 and bool((cells["std"].fillna(0) == 0).all())


def headline_cells(summary: pd.DataFrame) -> pd.DataFrame:
    """One cell per (label, dataset, protocol key, params): the protocol's primary metric at its largest
    fraction, or, when that metric is :func:`saturated` there, the first of its other metrics that is not
    (the definition names the metric, so the column says which one it is)."""
    s = summary if "column" in summary.columns else add_columns(summary)
    keep = []
    for (ds, proto, params), g in s.groupby(["dataset", "protocol", "params"], sort=False):
        cls = _registered(g["protocol_name"].iloc[0])
        metrics = list(dict.fromkeys(g["metric"]))
        primary = getattr(cls, "primary_metric", None)
        frac = g["fraction"].astype(float).max()
        at = g[g["fraction"].astype(float) == frac]
        order = ([primary] if primary in metrics else []) + [m for m in metrics if m != primary]
        metric = next((m for m in order if not saturated(at[at["metric"] == m])), order[0])
        keep.append(at[at["metric"] == metric])
    return pd.concat(keep) if keep else s.iloc[:0]


def headline_table(cells: pd.DataFrame, comparisons: pd.DataFrame, reference: str | None) -> tuple[pd.DataFrame, list[str]]:
    """Rows = labels, columns = ``dataset column metric (N, seeds)``; ``**best**``, ``†`` significant vs
    the reference (Holm-adjusted p < 0.05 within the headline family), ``⚠`` degenerate (withheld)."""
    c = cells.copy()
    c["head"] = [f"{d} {col} {m}" + (f" (N={int(n)})" if pd.notna(n) else "")
                 for d, col, m, n in zip(c["dataset"], c["column"], c["metric"], c.get("n_test", [np.nan] * len(c)))]
    sig = {}
    if len(comparisons):
        for _, r in comparisons.iterrows():
            sig[(r["label"],) + tuple(r[k] for k in CELL)] = bool(r["significant_headline"])
    best = {}
    for head, g in c[~c["degenerate"]].groupby("head", sort=False):
        if len(g) > 1 and saturated(g):
            continue  # every row ties at a ceiling (no metric was left to choose): no best to mark
        hib = bool(g["higher_is_better"].iloc[0]) if "higher_is_better" in g else True
        best[head] = g["mean"].max() if hib else g["mean"].min()
    texts = []
    for _, r in c.iterrows():
        if r["degenerate"]:
            texts.append("⚠ withheld")
            continue
        t = f"{r['mean']:.3f}"
        if pd.notna(r.get("lo", np.nan)):
            t += f" [{r['lo']:.3f}, {r['hi']:.3f}]"
        if r["n"] > 1:
            t += f" ({r['n']} seeds)"
        if np.isclose(r["mean"], best.get(r["head"], np.nan)):
            t = f"**{t}**"
        if sig.get((r["label"],) + tuple(r[k] for k in CELL)):
            t += " †"
        texts.append(t)
    c["text"] = texts
    order = list(dict.fromkeys(c["head"]))
    labels = list(dict.fromkeys(c["label"]))
    table = c.pivot(index="label", columns="head", values="text").loc[labels, order].fillna("—")
    table.index = [f"{lab} (reference)" if lab == reference else lab for lab in table.index]
    table.index.name = "method"
    notes = sorted({f for fl in c["flags"] for f in fl.split(" | ") if f.startswith("degenerate")})
    return table, notes


def comparison_table(comparisons: pd.DataFrame, only: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long table of Δ vs the reference with CIs and p-values."""
    c = comparisons if only is None else comparisons.merge(only[["label"] + CELL], on=["label"] + CELL)
    rows = []
    for _, r in c.iterrows():
        col = f"{r['dataset']} {r['column'] if 'column' in r else r['protocol']} {r['metric']}"
        delong = (f"{r['lo_delong']:+.3f}, {r['hi_delong']:+.3f} / p={r['p_delong']:.3g}"
                  if pd.notna(r.get("p_delong", np.nan)) else "—")
        rows.append({"method": r["label"], "cell": col, "Δ": f"{r['delta']:+.3f}",
                     "95 % CI (paired bootstrap)": f"[{r['lo']:+.3f}, {r['hi']:+.3f}]", "p (bootstrap)": f"{r['p_boot']:.3g}",
                     "DeLong CI / p": delong, "p (Holm)": f"{r['p_holm']:.3g}", "significant": "yes" if r["significant"] else "no"})
    return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()


def per_class_auc(cells: pd.DataFrame, bank: SampleBank) -> list[tuple[str, pd.DataFrame]]:
    """Per-class ROC-AUC (mean over units) of every AUC headline column; ``no pos/neg`` where undefined."""
    out = []
    for head, g in cells.groupby(["dataset", "column", "metric"], sort=False):
        rows = {}
        for _, r in g.iterrows():
            units = bank.units(r, bank.ids(r))
            if not units or units[0][0]["kind"] != "macro_auc":
                continue
            names = [str(n) for n in units[0][1].get("class_names", [])]
            per = []
            for recipe, arrays in units:
                y, sc = np.asarray(arrays[recipe["labels"]], float), np.asarray(arrays[recipe["scores"]], float)
                vals = []
                for k in range(y.shape[1]):
                    ok = ~np.isnan(y[:, k])
                    vals.append(stats.auc_binary(y[ok, k], sc[ok, k]) if len(np.unique(y[ok, k])) == 2 else np.nan)
                per.append(vals)
            mean = np.nanmean(np.array(per, float), axis=0) if not np.isnan(per).all() else np.array(per[0])
            rows[r["label"]] = {(names[k] if k < len(names) else str(k)): ("no pos/neg" if np.isnan(v) else f"{v:.3f}")
                                for k, v in enumerate(mean)}
        if rows:
            out.append((" ".join(head), pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")))
    return out


# ----------------------------------------------------------------------------- plots
def plot(summary: pd.DataFrame, out: Path) -> list[Path]:
    """Per dataset: one panel per headline column (bars = methods, 95 % CI whiskers, chance line);
    per (dataset, protocol) with several metrics at one fraction: grouped bars; per fraction protocol:
    label-fraction curves with CI bands."""
    import matplotlib  # lazy: heavy import (matplotlib), only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: heavy import (matplotlib), only plotting needs it
    import matplotlib.ticker  # lazy: heavy import (matplotlib), only plotting needs it

    s = summary if "column" in summary.columns else add_columns(summary)
    labels = list(dict.fromkeys(s["label"]))
    colors = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
    paths: list[Path] = []

    def err(g: pd.DataFrame) -> np.ndarray | None:
        if "lo" not in g or g["lo"].isna().all():
            return None
        return np.vstack([(g["mean"] - g["lo"]).fillna(0).clip(lower=0), (g["hi"] - g["mean"]).fillna(0).clip(lower=0)])

    def chance_of(g: pd.DataFrame) -> float | None:
        c = g["chance"].dropna() if "chance" in g else pd.Series(dtype=float)
        return float(c.iloc[0]) if len(c) else None

    def save(fig: Any, stem: str) -> None:
        fig.tight_layout()
        path = out / f"{slug(stem)}.png"  # dataset names and protocol keys come from the data: never a path
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    head = headline_cells(s)
    for ds, g in head.groupby("dataset", sort=False):
        cols = list(dict.fromkeys(g["column"] + " " + g["metric"]))
        fig, axes = plt.subplots(1, len(cols), figsize=(max(3.2, 0.45 * len(labels) + 1.2) * len(cols), 3.4), squeeze=False)
        for ax, col in zip(axes[0], cols):
            c = g[(g["column"] + " " + g["metric"]) == col]
            c = c.set_index("label").reindex([lab for lab in labels if lab in set(c["label"])]).reset_index()
            x = np.arange(len(c))
            ax.bar(x, c["mean"], yerr=err(c), capsize=3, color=[colors[lab] for lab in c["label"]],
                   hatch=None, alpha=0.9)
            for xi, deg in zip(x, c["degenerate"]):
                if deg:
                    ax.text(xi, 0, "⚠", ha="center", va="bottom", fontsize=9)
            ch = chance_of(c)
            if ch is not None:
                ax.axhline(ch, color="grey", ls="--", lw=1, label=f"chance {ch:.3g}")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_xticks(x, c["label"], rotation=35, ha="right", fontsize=8)
            ax.set_title(col, fontsize=9)
        fig.suptitle(f"{ds}: headline metrics (bars: mean, whiskers: 95 % bootstrap CI)", fontsize=9)
        save(fig, f"{ds}_headline")

    for (ds, col0, proto), g in s.groupby(["dataset", "column", "protocol"], sort=False):
        metrics = list(dict.fromkeys(g["metric"]))
        if len(metrics) < 2 or len(set(g["fraction"])) > 1:
            continue
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(metrics) * max(1, len(labels)) / 3), 3.4))
        width = 0.8 / len(labels)
        for i, lab in enumerate(labels):
            m = g[g["label"] == lab].set_index("metric").reindex(metrics)
            if m["mean"].isna().all():
                continue
            ax.bar(np.arange(len(metrics)) + i * width - 0.4 + width / 2, m["mean"], width, yerr=err(m.reset_index()),
                   capsize=2, color=colors[lab], label=lab)
        drawn = False
        for j, metric in enumerate(metrics):
            ch = chance_of(g[g["metric"] == metric])
            if ch is not None:
                ax.hlines(ch, j - 0.45, j + 0.45, colors="black", linestyles="--", lw=1)
                drawn = True
        ax.set_xticks(np.arange(len(metrics)), metrics, fontsize=8, rotation=30, ha="right")
        ax.set_title(f"{ds} {col0} ({'dashed: chance, ' if drawn else ''}whiskers: 95 % CI)", fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(labels), 3))
        save(fig, f"{ds}_{col0.replace('@', '_at_')}")

    for (ds, proto, params), g in s.groupby(["dataset", "protocol", "params"], sort=False):
        if len(set(g["fraction"])) < 2:
            continue
        metrics = list(dict.fromkeys(g["metric"]))
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            m = g[g["metric"] == metric]
            for lab, lm in m.groupby("label", sort=False):
                lm = lm.sort_values("fraction")
                fr = lm["fraction"].astype(float)
                ax.plot(fr, lm["mean"], marker="o", color=colors[lab], label=lab)
                if "lo" in lm and lm["lo"].notna().any():
                    ax.fill_between(fr, lm["lo"], lm["hi"], color=colors[lab], alpha=0.15)
                deg = lm[lm["degenerate"]]
                ax.scatter(deg["fraction"].astype(float), deg["mean"], marker="x", color="black", zorder=3)
            ch = chance_of(m)
            if ch is not None:
                ax.axhline(ch, color="grey", ls="--", lw=1)
            ax.set_xscale("log")
            fracs = sorted({float(f) for f in m["fraction"]})
            ax.set_xticks(fracs, [f"{f:g}" for f in fracs], fontsize=8)  # one label per fraction run
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping 2×10⁻¹-style labels
            ax.set_xlabel("label fraction")
            ax.set_title(f"{ds} {m['column'].iloc[0].split('@')[0]} {metric}\n(bands: 95 % CI, x: degenerate)", fontsize=9)
            ax.legend(fontsize=7)
        save(fig, f"{ds}_{proto}_fractions")
    return paths


# ----------------------------------------------------------------------------- HTML
def _inline(text: Any) -> str:
    """Escaped HTML of one line of the report's Markdown, ``**bold**`` as ``<b>``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(str(text)))


def _html_table(table: pd.DataFrame) -> str:
    out = []
    for part in split_columns(table, 2 * MAX_COLUMNS):
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [table.index.name or ""] + list(part.columns))
        body = "".join("<tr><th>" + html.escape(str(i)) + "</th>" + "".join(f"<td>{_inline(v)}</td>" for v in row)
                       + "</tr>" for i, row in part.iterrows())
        out.append(f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
    return "".join(out)


def to_html(sections: list[tuple[str, str, Any]], images: Sequence[Path], title: str) -> str:
    """A self-contained page: ``sections`` are ``(heading, kind, content)`` with kind ``table``
    (DataFrame), ``text`` or ``list``; images are embedded as base64 PNG (no network)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for heading, kind, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if kind == "table":
            parts.append(_html_table(content))
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in content) + "</ul>")
        else:
            parts.append(f"<p>{_inline(content)}</p>")
    if images:
        parts.append("<h2>Figures</h2>")
    for p in images:
        data = base64.b64encode(Path(p).read_bytes()).decode()
        parts.append(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(p.stem)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}thead th{background:#eee}"
             "img{max-width:100%}figcaption{font-size:12px;color:#555}.wide{overflow-x:auto}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


# ----------------------------------------------------------------------------- report
def _notes(summary: pd.DataFrame) -> list[str]:
    out = []
    for _, r in summary.drop_duplicates(["label", "dataset", "column", "flags"]).iterrows():
        for f in r["flags"].split(" | "):
            if f:
                out.append(f"{r['label']} {r['dataset']} {r['column']}: {f}")
    return list(dict.fromkeys(out))


def _claims_section(folder: Path, n_boot: int, seed: int) -> str | None:
    """The experiment's claim outcomes (:mod:`medvlp.benchmarks.suite.experiments`) when ``folder`` holds one."""

    exps = load_experiments(folder)
    if exps is None:
        return None
    outcomes = claim_outcomes(folder, n_boot, seed)
    atomic_write_text(folder / "claims.csv", outcomes.to_csv(index=False))
    return outcomes_markdown(outcomes, exps)


def report(results: str | Path, out: str | Path | None = None, plots: bool = True, paper: bool = False,
           reference: str | None = None, n_boot: int = 1000, ci_seed: int = 0, ci: bool = True) -> str:
    """Write ``table.md``, ``table.tex``, ``summary.csv``, ``comparisons.csv``, ``report.html`` (+ PNG
    plots) next to ``results``; returns the Markdown (headline table first).

    Args:
        reference: label every other row is compared with (default: the random-init row, else CLIP).
        n_boot: bootstrap resamples (CIs and paired differences); ci_seed: their seed.
        ci: ``False`` skips CIs and comparisons (mean ± std only).
    """
    store = ResultStore(results)
    df = store.df
    if df.empty:
        raise ValueError(f"{results} has no result rows")
    out = Path(out) if out else Path(results).parent
    out.mkdir(parents=True, exist_ok=True)
    summary = add_columns(summarize(df))
    bank = SampleBank(store)
    has_samples = ci and (summary["samples"] != "[]").any()
    if has_samples:
        summary = add_intervals(summary, bank, n_boot, ci_seed)
    ref = pick_reference(summary, reference) if has_samples else None
    comparisons = compare(summary, bank, ref, n_boot, ci_seed) if ref else pd.DataFrame()
    if len(comparisons):
        comparisons = comparisons.merge(summary[["label"] + CELL + ["column"]], on=["label"] + CELL, how="left")
    head = headline_cells(summary)
    if len(comparisons):  # Holm within the headline family (one test per method × headline column)
        keys = head[["label"] + CELL]
        hc = comparisons.merge(keys, on=["label"] + CELL, how="inner")
        hc["p_holm_headline"] = stats.holm(hc["p"].to_numpy())
        comparisons = comparisons.merge(hc[["label"] + CELL + ["p_holm_headline"]], on=["label"] + CELL, how="left")
        comparisons["significant_headline"] = comparisons["p_holm_headline"] < ALPHA
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    if len(comparisons):
        atomic_write_text(out / "comparisons.csv", comparisons.to_csv(index=False))
    htable, hnotes = headline_table(head, comparisons, ref)
    method_note = ("Cells: value [95 % CI]: bootstrap over test samples (" + f"{n_boot} seeded resamples, stratified by "
                   "label pattern for AUC; retrieval resamples queries with the gallery fixed) of the mean over seeds; "
                   "(k seeds) when several units were averaged. **Bold**: best per column. † : differs from the "
                   f"reference row ({ref}) with Holm-adjusted p < {ALPHA} over the headline's comparisons (AUC: "
                   "paired DeLong test; other metrics: paired bootstrap, two-sided). ⚠: degenerate cell, not a result."
                   if has_samples else "Cells: mean ± std over seeds (no per-sample outputs stored: no CIs).")
    md = ["## Headline\n", method_note + "\n", to_markdown(htable)]
    claims = _claims_section(Path(results).parent, n_boot, ci_seed) if ci else None
    if claims:
        md = ["## Claims (controlled experiment)\n", claims, *md]
    if hnotes:
        md.append("\n" + "\n".join(f"- ⚠ {n}" for n in hnotes) + "\n")
    ctable = comparison_table(comparisons) if len(comparisons) else pd.DataFrame()
    if len(ctable):
        md.append(f"\n## Differences to {ref}\n\nΔ = method − reference on the same test samples; paired bootstrap "
                  f"({n_boot} resamples) CI and p; DeLong CI and p for AUC; p (Holm) corrects over all "
                  f"{len(ctable)} comparisons in this table.\n\n" + to_markdown(ctable))
    tex_parts, detail = [], []
    for ds, sub in summary.groupby("dataset", sort=False):
        table = wide_table(sub)
        detail.append((ds, table))
        md.append(f"\n### {ds}\n\n" + to_markdown(table))
        tex_parts.append(f"% {ds}\n" + to_latex(table))
    pc = per_class_auc(head, bank) if has_samples else []
    for name, t in pc:
        md.append(f"\n### Per-class AUC: {name}\n\n" + to_markdown(t))
    notes = _notes(summary)
    if notes:
        md.append("\n**Flags** (⚠ degenerate cells are withheld from the headline and comparisons)\n\n"
                  + "\n".join(f"- {n}" for n in notes) + "\n")
    md.append("\n**Metric definitions**\n\n" + definitions(df))

    if "comparability" in df:
        marked = sorted(df.loc[df["comparability"].astype(str).str.contains(LABEL_DERIVED, regex=False), "label"].unique())
        if marked:
            md.append(f"\n**Pretrained on label-derived captions** (template captions written from the ground-truth labels "
                      f"that zero-shot and linear-probe evaluation use; offline demo only, not comparable): "
                      f"{', '.join(marked)}\n")
    if paper:

        ptable = paper_table(df)
        atomic_write_text(out / "paper_table.md", ptable)
        md.append("\n### Paper vs reproduced\n\n" + ptable)
    text = "\n".join(md)
    atomic_write_text(out / "table.md", text)
    atomic_write_text(out / "table.tex", to_latex(htable) + "\n" + "\n".join(tex_parts))
    images = plot(summary, out) if plots else []
    sections: list[tuple[str, str, Any]] = [("Headline", "text", method_note.replace("**", "")), ("", "table", htable)]
    if hnotes:
        sections.append(("Degenerate cells", "list", hnotes))
    if len(ctable):
        sections.append((f"Differences to {ref}", "table", ctable))
    sections += [(f"{ds}: all cells", "table", t) for ds, t in detail]
    sections += [(f"Per-class AUC: {name}", "table", t) for name, t in pc]
    if notes:
        sections.append(("Flags", "list", notes))
    sections.append(("Metric definitions", "list", [line[2:] for line in definitions(df).splitlines() if line]))
    atomic_write_text(out / "report.html", to_html(sections, images, f"medvlp report: {Path(results)}"))
    return text


def headline_only(md: str) -> str:
    """The headline section of a report's Markdown (up to the differences or detailed tables)."""
    start = md.find("## Headline")
    cuts = [i for i in (md.find("\n## Differences"), md.find("\n### ", max(start, 0))) if i >= 0]
    return md[:min(cuts)] if cuts else md
