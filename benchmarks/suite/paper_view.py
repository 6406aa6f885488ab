"""Comparability fields of result rows and the paper view of ``medvlp report paper=true``.

Every result row records, as JSON in its ``comparability`` column, what makes its number comparable
with a published one (:data:`FIELDS`): the protocol variant, split convention, fraction source, Dice or
metric definition (the metric name), the dataset class, the backbone and method class read from the
model itself (not the suite label) and the pretraining data. A paper number in
``benchmarks/paper_numbers.yaml`` states the same fields; the paper view puts a reproduced number next
to it only when every field matches, and otherwise leaves the cell empty and says which field differs.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any, Mapping

import numpy as np
import pandas as pd
from medvlp.datamodules.volume.captions import uses_label_derived_captions
import yaml

#: the fields a paper row and a result row must share to be set side by side
FIELDS = ("protocol_variant", "split_convention", "fraction_source", "dataset_class", "method_class", "backbone",
          "pretrain_data")


def backbone_signature(model: Any) -> str:
    """A short name of the image backbone from its modules: ``ViT-B/16``-style for ViTs
    (width/depth/patch), else the class name with its width."""
    enc = model.image_backbone()
    cls = type(enc).__name__
    depth = len(getattr(enc, "blocks", []))
    width = getattr(enc, "embed_dim", None)
    if hasattr(enc, "patch_size") and depth and width:
        dims = [d for d in getattr(enc, "spatial_dims", (2,))]
        patch = enc.patch_size(2 if 2 in dims else dims[0])
        size = {(192, 12): "Ti", (384, 12): "S", (768, 12): "B", (1024, 24): "L"}.get((int(width), depth))
        name = f"ViT-{size}" if size else f"ViT(d{width},L{depth})"
        return f"{name}/{patch[-1]}"
    return f"{cls}(d{width})" if width else cls


#: marks pretraining on label-derived template captions (offline demo only) in ``pretrain_data``
LABEL_DERIVED = "[label-derived captions]"


def model_fields(model: Any, pretrain_data: str) -> dict[str, str]:
    """Comparability fields that come from the evaluated model."""
    return {"method_class": type(model).__name__, "backbone": backbone_signature(model), "pretrain_data": pretrain_data}


def pretrain_data_of(entry: Mapping[str, Any], cfg_data: Mapping[str, Any] | None, ckpt: str) -> str:
    """The pretraining data of a suite method entry: ``none`` for random init, the entry's
    ``pretrain_data`` when given (external checkpoints), else the training datamodule's name."""
    if entry.get("pretrain_data"):
        return str(entry["pretrain_data"])
    if ckpt == "random-init":
        return "none"
    if cfg_data:

        name = cfg_data.get("name", "unknown")
        sub = (cfg_data.get("init_args") or {}).get("datamodules")
        out = f"{name}({'+'.join(sorted(sub))})" if isinstance(sub, Mapping) else str(name)
        return out + (f" {LABEL_DERIVED}" if uses_label_derived_captions(cfg_data) else "")
    return "unknown"


def row_fields(proto: Any, params: Mapping[str, Any], datamodule: Any, result: Any) -> dict[str, Any]:
    """Comparability fields of one protocol run on one datamodule."""
    out = {
        "protocol_variant": getattr(proto, "variant", "fast"),
        "split_convention": str(getattr(datamodule, "split_convention", "builtin")),
        "fraction_source": str(params.get("fraction_source", "hash")) if getattr(proto, "uses_fractions", False) else "n/a",
        "dataset_class": type(datamodule).__name__ + (f"[{datamodule.test_set}]" if getattr(datamodule, "test_set", "valid")
                                                      not in ("valid", None) else ""),
    }
    out.update(getattr(result, "comparability", {}) or {})
    return out


def paper_numbers() -> list[dict[str, Any]]:
    """Rows of the packaged ``paper_numbers.yaml``."""

    return yaml.safe_load(resources.files("medvlp.benchmarks").joinpath("paper_numbers.yaml").read_text())


def _parse(cell: Any) -> dict[str, Any]:
    if isinstance(cell, dict):
        return cell
    if not isinstance(cell, str) or not cell.strip():
        return {}
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return {}


def mismatch(paper: Mapping[str, Any], fields: Mapping[str, Any]) -> list[str]:
    """The comparability fields on which a result row differs from a paper row (``[]`` = comparable)."""
    out = []
    for key in FIELDS:
        want = paper.get(key)
        if want is None:
            continue
        have = fields.get(key)
        if have is None:
            out.append(f"{key} not recorded (want {want})")
        elif str(have) != str(want):
            out.append(f"{key} {have} ≠ {want}")
    return out


def paper_table(df: pd.DataFrame, rows: list[dict[str, Any]] | None = None) -> str:
    """Markdown: each paper number, the reproduced mean ± std (×100) of comparable result rows, a
    ``comparable`` column and the reason when nothing comparable was run.

    Result rows are candidates for a paper row when they share its metric and fraction and either its
    method (label or method name) or its dataset key; among them only rows whose comparability fields
    all match fill the cell.
    """
    rows = paper_numbers() if rows is None else rows
    df = df.copy()
    df["cmpfields"] = [_parse(c) for c in (df["comparability"] if "comparability" in df else [""] * len(df))]
    lines = ["| method | dataset | metric | fraction | paper | reproduced | comparable | source |", "|" + "---|" * 8]
    for r in rows:
        if r.get("unavailable"):
            lines += _unavailable_lines(df, r)
            continue
        for frac, val in r["values"].items():
            cand = df[(df["metric"] == r["metric"]) & (df["fraction"].astype(float) == float(frac)) &
                      ((df["label"] == r["method"]) | (df["method"] == r["method"]) | (df["dataset"] == r["dataset"]))]
            ok_rows, reasons = [], []
            for row in cand.itertuples():
                miss = mismatch(r, row.cmpfields)
                (reasons.append(f"{row.label}/{row.dataset}: " + "; ".join(miss)) if miss else ok_rows.append(row))
            if ok_rows:
                v = np.array([float(x.value) for x in ok_rows])
                labels = sorted({x.label for x in ok_rows})
                sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                rep, comp = f"{100 * v.mean():.1f} ± {100 * sd:.1f} (n={len(v)}, {', '.join(labels)})", "yes"
            else:
                rep = "—"
                comp = "no: " + (reasons[0] if reasons else "no result row with this metric, fraction and method or dataset")
                if len(reasons) > 1:
                    comp += f" (+{len(reasons) - 1} more)"
            lines.append(f"| {r['method']} ({r.get('backbone', '?')}) | {r['dataset']} | {r['metric']} | {float(frac):g} | "
                         f"{val} | {rep} | {comp} | {r['source']} |")
    return "\n".join(lines) + "\n"


def _unavailable_lines(df: pd.DataFrame, r: Mapping[str, Any]) -> list[str]:
    """Lines for a protocol whose source publishes no citable number offline (``unavailable`` rows of
    ``paper_numbers.yaml``): medvlp's rows of that protocol variant beside "not available offline"."""
    variant = r["protocol_variant"]
    mine = df[[c.get("protocol_variant") == variant for c in df["cmpfields"]]] if len(df) else df
    paper = f"n/a: {r['unavailable']}"
    if not len(mine):
        return [f"| {r.get('method', 'any')} | {r.get('dataset', 'any')} | — | — | {paper} | — | no paper number "
                f"({variant}) | {r['source']} |"]
    out = []
    for (label, dataset, metric, frac), g in mine.groupby(["label", "dataset", "metric", "fraction"], sort=True):
        v = g["value"].astype(float).to_numpy()
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        out.append(f"| {label} | {dataset} | {metric} | {float(frac):g} | {paper} | {100 * v.mean():.1f} ± {100 * sd:.1f} "
                   f"(n={len(v)}) | no paper number ({variant}) | {r['source']} |")
    return out
