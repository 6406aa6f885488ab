"""Does a method's report-guided slice selection pick the lesion slices? (UniMedI §3.2, 3D selection)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medvlp.benchmarks.kit.protocol import EvalContext, MetricValue, Protocol, ProtocolResult, mean_recipe
from medvlp.registry import register_benchmark

HOOK = "selected_slices"


def lesion_slices(findings: Sequence[Mapping[str, Any]] | None) -> set[int]:
    """Slice indices inside any finding's ``slices`` range (``[first, last]``, inclusive)."""
    out: set[int] = set()
    for f in findings or ():
        rng = f.get("slices") if isinstance(f, Mapping) else None
        if rng:
            lo, hi = int(rng[0]), int(rng[1])
            if hi < lo:
                raise ValueError(f"finding {f.get('label')!r}: slice range {list(rng)} ends before it starts")
            out.update(range(lo, hi + 1))
    return out


def slab_hits(slabs: Sequence[int], patch_depth: int, lesion: set[int]) -> list[bool]:
    """Whether slab ``s`` (slices ``[s·p, s·p + p − 1]``) contains any lesion slice."""
    return [any(z in lesion for z in range(int(s) * patch_depth, (int(s) + 1) * patch_depth)) for s in slabs]


def volume_scores(selection: Mapping[str, Any], row: int, lesion: set[int]) -> dict[str, float]:
    """Precision of one volume's selection and its chance levels at slice and at slab resolution.

    ``slice_precision``: share of the selected slices (the slices the method feeds on) inside a lesion
    range; chance = share of the candidate slices inside one (expected precision of ``k`` slices drawn
    uniformly without replacement from the candidates). ``slab_precision``: share of the selected slabs
    that contain a lesion slice; chance = share of all slabs that do.
    """
    slices = [int(z) for z in selection["slices"][row].tolist()]
    cand = [int(z) for z in selection["candidates"].tolist()]
    p = int(selection["patch_depth"])
    all_slabs = range(len(cand))
    return {
        "slice_precision": float(np.mean([z in lesion for z in slices])),
        "slice_chance": float(np.mean([z in lesion for z in cand])),
        "slab_precision": float(np.mean(slab_hits(selection["slabs"][row].tolist(), p, lesion))),
        "slab_chance": float(np.mean(slab_hits(list(all_slabs), p, lesion))),
    }


@register_benchmark("slice_selection")
class SliceSelection(Protocol):
    """Precision of a method's text-guided slice selection against the known lesion slice ranges.

    For each test volume that has at least one finding with a slice range (``meta["findings"][i]["slices"]``,
    ``[first, last]``; the phantom CT's nodules, effusions and consolidations), the method's hook
    ``selected_slices(volume, texts)`` runs on the volume and its report. The hook (UniMedI:
    :meth:`~medvlp.methods.unimedi.UniMedI.selected_slices`, the exact selection code of training) returns
    ``slices`` ``(B, k)`` (the slices the method feeds on), ``slabs`` ``(B, k)``, ``patch_depth`` and the
    ``candidates`` (every slice it could return).

    Resolution: the selection scores depth slabs of ``patch_depth`` slices (the 3D patch depth); each slab is
    represented by its middle slice (``s·p + p // 2``), which is the slice UniMedI feeds as a pseudo 2D image.
    ``slice_precision`` (primary) counts a selected slice as correct when that slice lies in a lesion range;
    ``slab_precision`` counts a selected slab as correct when any of its ``p`` slices does (a lesion thinner
    than a slab can be hit by the slab and missed by its middle slice).

    Metrics are means over volumes (per-volume values stored, ``mean`` recipes, so ``medvlp report``
    bootstraps CIs over volumes); ``*_lift`` = precision − chance per volume (chance 0). Chance per volume =
    lesion candidates / candidates (uniform draw of ``k`` candidates); the recipes' chance is its mean.
    Volumes without a slice-range finding are not scored (their count is in the definition).

    Params: ``batch_size`` (volumes per hook call, default 8).
    """

    name = "slice_selection"
    needs_text = True
    primary_metric = "slice_precision"
    parameters = {"batch_size": "volumes per hook call (8)"}
    defaults = {"batch_size": 8}

    def applicable(self, ctx: EvalContext) -> str | None:
        if not callable(getattr(ctx.model, HOOK, None)):
            return f"method has no {HOOK}(volume, texts) hook (no text-guided slice selection)"
        if ctx.datamodule.spatial_dims != 3:
            return "dataset is not 3D"
        ds = ctx.datamodule.dataset("test", augment=False)
        if len(ds) == 0 or "findings" not in (ds[0].get("meta") or {}):
            return "dataset records no lesion slice ranges (meta.findings[*].slices)"
        return super().applicable(ctx)

    @torch.no_grad()
    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        batch_size = int(self.params(ctx)["batch_size"])
        ds = ctx.datamodule.dataset("test", augment=False)
        hook = getattr(ctx.model, HOOK)
        ids: list[str] = []
        rows: dict[str, list[float]] = {}
        selected: list[list[int]] = []
        pending: list[tuple[dict[str, Any], set[int]]] = []

        def flush() -> None:
            volume = torch.stack([s["image"] for s, _ in pending]).to(ctx.device)
            sel = hook(volume, [s["text"] for s, _ in pending])
            sel = {key: (v.cpu() if torch.is_tensor(v) else v) for key, v in sel.items()}
            if tuple(sel["slices"].shape[:1]) != (len(pending),):
                raise ValueError(f"{HOOK} returned slices of shape {tuple(sel['slices'].shape)} for {len(pending)} volumes")
            for row, (s, lesion) in enumerate(pending):
                for key, v in volume_scores(sel, row, lesion).items():
                    rows.setdefault(key, []).append(v)
                ids.append(str((s.get("meta") or {}).get("id", len(ids))))
                selected.append([int(z) for z in sel["slices"][row].tolist()])
            pending.clear()

        for i in range(len(ds)):
            sample = ds[i]
            lesion = lesion_slices((sample.get("meta") or {}).get("findings"))
            if lesion:
                pending.append((sample, lesion))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        if not ids:
            raise ValueError(f"slice_selection: no test volume of {ctx.datamodule.dataset_version} has a finding "
                             "with a slice range (meta.findings[*].slices)")
        k = len(selected[0])
        arr = {key: np.asarray(v, np.float64) for key, v in rows.items()}
        arr["slice_lift"] = arr["slice_precision"] - arr["slice_chance"]
        arr["slab_lift"] = arr["slab_precision"] - arr["slab_chance"]
        n, n_all = len(ids), len(ds)
        where = (f"over the N={n} of {n_all} test volumes with a lesion slice range; k={k} selected per volume by "
                 f"the method's {HOOK} (its training selection) given the volume and its report")
        chance = {m: float(arr[f"{m}_chance"].mean()) for m in ("slice", "slab")}
        values = [
            MetricValue("slice_precision", float(arr["slice_precision"].mean()),
                        f"mean share of selected slices (each slab's middle slice) inside a lesion slice range, {where}; "
                        f"chance (uniform k of the candidate slices) {chance['slice']:.3f}"),
            MetricValue("slab_precision", float(arr["slab_precision"].mean()),
                        f"mean share of selected depth slabs containing a lesion slice, {where}; chance {chance['slab']:.3f}"),
            MetricValue("slice_lift", float(arr["slice_lift"].mean()),
                        f"mean per-volume slice_precision minus its chance level, {where}"),
            MetricValue("slab_lift", float(arr["slab_lift"].mean()),
                        f"mean per-volume slab_precision minus its chance level, {where}"),
            MetricValue("slice_chance", chance["slice"],
                        f"mean per-volume chance precision of k uniformly drawn candidate slices "
                        f"(lesion candidates / candidates), {where}"),
        ]
        samples = {"ids": np.asarray(ids), "selected": np.asarray(selected, np.int64),
                   **{key: v.astype(np.float32) for key, v in arr.items()}}
        recipes = {"slice_precision": mean_recipe("slice_precision", chance["slice"]),
                   "slab_precision": mean_recipe("slab_precision", chance["slab"]),
                   "slice_lift": mean_recipe("slice_lift", 0.0), "slab_lift": mean_recipe("slab_lift", 0.0),
                   "slice_chance": mean_recipe("slice_chance")}
        return ProtocolResult(values, comparability={"selection_k": k}, samples=samples, recipes=recipes)
