"""Render result rows as side-by-side tables (mean ± std over seeds) and plots."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from medvlp.benchmarks.results import ResultStore
from medvlp.io import atomic_write_text

GROUP = ["label", "dataset", "protocol", "fraction", "metric"]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1; 0 for one seed) and count over seeds per (label, dataset, protocol, fraction, metric)."""
    g = df.groupby(GROUP, sort=False)["value"]
    out = g.agg(mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, n="count").reset_index()
    return out


def _column(row: pd.Series) -> str:
    frac = f"@{float(row['fraction']):g}" if row["protocol"] in ("linear_probe", "finetune", "segmentation") else ""
    return f"{row['dataset']} {row['protocol']}{frac} {row['metric']}"


def wide_table(summary: pd.DataFrame, fmt: str = "{:.3f}") -> pd.DataFrame:
    """Methods as rows, (dataset, protocol, fraction, metric) as columns; cells ``mean ± std (n)``."""
    s = summary.copy()
    s["column"] = s.apply(_column, axis=1)
    s["cell"] = [
        (fmt.format(m) + (f" ± {fmt.format(sd)}" if n > 1 else "")) for m, sd, n in zip(s["mean"], s["std"], s["n"])
    ]
    order = list(dict.fromkeys(s["column"]))
    table = s.pivot_table(index="label", columns="column", values="cell", aggfunc="first", sort=False)
    return table[order].fillna("—")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    cols = [table.index.name or "method"] + list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row]) + " |")
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs LaTeX tabular."""
    esc = lambda s: str(s).replace("_", r"\_").replace("±", r"$\pm$").replace("@", r"@").replace("%", r"\%")  # noqa: E731
    cols = ["method"] + list(table.columns)
    lines = [r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule",
             " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    for idx, row in table.iterrows():
        lines.append(" & ".join([esc(idx)] + [esc(v) for v in row]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def definitions(df: pd.DataFrame) -> str:
    """One definition line per (dataset, protocol, metric)."""
    seen = df.drop_duplicates(["dataset", "protocol", "metric"])
    return "\n".join(f"- **{r.dataset} {r.protocol} {r.metric}**: {r.definition}" for r in seen.itertuples()) + "\n"


def plot(summary: pd.DataFrame, out: Path) -> list[Path]:
    """Bar charts per (dataset, protocol, metric) and fraction curves for fraction protocols."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (ds, proto), sub in summary.groupby(["dataset", "protocol"], sort=False):
        metrics = list(dict.fromkeys(sub["metric"]))
        fractions = sorted(sub["fraction"].astype(float).unique())
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            m = sub[sub["metric"] == metric]
            if len(fractions) > 1:
                for label, lm in m.groupby("label", sort=False):
                    lm = lm.sort_values("fraction")
                    ax.errorbar(lm["fraction"].astype(float), lm["mean"], yerr=lm["std"], marker="o", capsize=3, label=label)
                ax.set_xscale("log")
                ax.set_xlabel("label fraction")
                ax.legend(fontsize=7)
            else:
                ax.bar(m["label"], m["mean"], yerr=m["std"], capsize=3, color="tab:blue")
                ax.tick_params(axis="x", rotation=45, labelsize=7)
            ax.set_title(f"{ds} {proto}\n{metric}", fontsize=9)
        fig.tight_layout()
        path = out / f"{ds}_{proto}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def report(results: str | Path, out: str | Path | None = None, plots: bool = True, paper: bool = False) -> str:
    """Write ``table.md``, ``table.tex``, ``summary.csv`` (+ PNG plots) next to ``results``; returns Markdown."""
    df = ResultStore(results).df
    if df.empty:
        raise ValueError(f"{results} has no result rows")
    out = Path(out) if out else Path(results).parent
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    md_parts, tex_parts = [], []
    for ds, sub in summary.groupby("dataset", sort=False):
        table = wide_table(sub)
        md_parts.append(f"### {ds}\n\n" + to_markdown(table))
        tex_parts.append(f"% {ds}\n" + to_latex(table))
    md = "\n".join(md_parts) + "\n**Metric definitions**\n\n" + definitions(df)
    if paper:
        from medvlp.benchmarks.paper_view import paper_table

        ptable = paper_table(df)
        atomic_write_text(out / "paper_table.md", ptable)
        md += "\n### Paper vs reproduced\n\n" + ptable
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.tex", "\n".join(tex_parts))
    if plots:
        plot(summary, out)
    return md


def report_command(args: Sequence[str]) -> int:
    """``medvlp report results=PATH [out=DIR] [plots=false] [paper=true]``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.from_dotlist(list(args))
    if "results" not in cfg:
        raise ValueError("report needs results=PATH")
    print(report(str(cfg.results), cfg.get("out"), bool(cfg.get("plots", True)), bool(cfg.get("paper", False))))
    return 0
