"""EM neuron segmentation evaluated as the CREMI challenge reports it: whole test volumes, an
agglomeration step, VOI split/merge (bits) and the adapted Rand error."""
from __future__ import annotations

from collections import defaultdict
import numpy as np
from scipy import ndimage

from medvlp.benchmarks.kit.protocol import EvalContext, MetricValue, ProtocolResult, mean_recipe
from medvlp.benchmarks.protocols.segmentation import Segmentation
from medvlp.registry import register_benchmark


def contingency(seg: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Overlap counts ``n_ij`` of segment ``i`` and ground-truth id ``j`` over voxels with ``gt > 0``."""
    ok = gt.ravel() > 0
    _, si = np.unique(seg.ravel()[ok], return_inverse=True)
    _, gi = np.unique(gt.ravel()[ok], return_inverse=True)
    table = np.zeros((si.max() + 1 if si.size else 0, gi.max() + 1 if gi.size else 0))
    np.add.at(table, (si, gi), 1)
    return table


def cremi_voi(seg: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Variation of information ``(split, merge)`` in bits, CREMI's ``voi`` (gala ``split_vi``):
    split = H(seg | gt) (over-segmentation), merge = H(gt | seg); ground-truth id 0 is ignored.

    Raises:
        ValueError: when the ground truth has no labelled voxel.
    """
    n = contingency(seg, gt)
    total = n.sum()
    if total == 0:
        raise ValueError("VOI undefined: the ground truth has no labelled voxel")
    p = n / total
    ps, pg = p.sum(1), p.sum(0)
    nz = p > 0
    rows, cols = np.nonzero(nz)
    split = float(-(p[nz] * np.log2(p[nz] / pg[cols])).sum())
    merge = float(-(p[nz] * np.log2(p[nz] / ps[rows])).sum())
    return split, merge


def adapted_rand_error(seg: np.ndarray, gt: np.ndarray) -> float:
    """SNEMI3D/CREMI adapted Rand error ``1 − F`` of Rand precision ``Σn_ij² / Σ_i a_i²`` and recall
    ``Σn_ij² / Σ_j b_j²`` (``a``: segment sizes, ``b``: ground-truth sizes, over ``gt > 0``)."""
    n = contingency(seg, gt)
    if n.sum() == 0:
        raise ValueError("adapted Rand undefined: the ground truth has no labelled voxel")
    sum_ab = float((n ** 2).sum())
    precision = sum_ab / float((n.sum(1) ** 2).sum())
    recall = sum_ab / float((n.sum(0) ** 2).sum())
    return 1.0 - 2.0 * precision * recall / (precision + recall)


def watershed_agglomeration(boundary: np.ndarray, seed_threshold: float = 0.3, min_seed_size: int = 1) -> np.ndarray:
    """Instances from a boundary-probability volume: seeds are the 6-connected components of voxels with
    ``boundary < seed_threshold`` (components under ``min_seed_size`` voxels dropped), then a watershed
    on the boundary map (``scipy.ndimage.watershed_ift`` on 8-bit levels) floods every voxel from the
    seeds, so boundary voxels join a neighbouring cell. Returns ``int32`` labels ≥ 1 (0 only if no seed)."""
    seeds, n = ndimage.label(boundary < seed_threshold)
    if min_seed_size > 1 and n:
        sizes = np.bincount(seeds.ravel())
        small = np.flatnonzero(sizes < min_seed_size)
        seeds[np.isin(seeds, small[small > 0])] = 0
    if seeds.max() == 0:
        return seeds.astype(np.int32)
    levels = np.clip(np.round(boundary * 255), 0, 255).astype(np.uint8)
    return ndimage.watershed_ift(levels, seeds.astype(np.int32))


@register_benchmark("em_cremi")
class EMCremi(Segmentation):
    """EM neuron segmentation as CREMI reports it (and GTGM's README table, VOI on CREMI A/B/C).

    The fast segmentation protocol's decoder predicts cell boundaries on the datamodule's sub-volumes;
    the test sub-volumes of each source volume are stitched back to the whole test region (its
    contiguous last z-blocks); instances come from :func:`watershed_agglomeration` on the stitched
    boundary probabilities; metrics over the whole region: ``voi_split``, ``voi_merge`` and ``voi`` (bits,
    :func:`cremi_voi`) and ``arand`` (:func:`adapted_rand_error`), ground-truth id 0 (unlabelled)
    ignored; reported per protocol run as the mean over source volumes (one CREMI sample each).

    Selection as the segmentation protocol: the epoch with the best validation Dice of the boundary class
    (no validation VOI, which would need an agglomeration per epoch).

    Deviations: CREMI's official test labels are withheld; the test region here is held out from the
    training volumes. GTGM's NeuronSeg pipeline (affinities + waterz agglomeration) is not reproduced;
    the agglomeration here is a seeded watershed on boundaries. Params: those of ``segmentation``
    plus ``seed_threshold`` (0.3) and ``min_seed_size`` (1).
    """

    name = "em_cremi"
    variant = "em_cremi"
    parameters = {
        "epochs": "decoder training epochs (30)", "lr": "decoder learning rate (1e-3)",
        "width": "decoder width (64)", "max_stages": "x2 upsampling stages (2)", "batch_size": "batch size (16)",
        "mode": "frozen | full (frozen)", "backbone_lr_mult": "encoder lr multiplier in full mode (0.1)",
        "seed_threshold": "boundary probability below which voxels seed cells (0.3)",
        "min_seed_size": "smallest seed component kept, voxels (1)",
        "patience": "stop after this many epochs without validation improvement (none)",
    }

    def applicable(self, ctx: EvalContext) -> str | None:
        ds = ctx.datamodule.dataset("test", augment=False)
        records = getattr(ds, "records", None)
        if not records or not all("box" in r and r.get("lab") for r in records):
            return "dataset has no instance-labelled test sub-volumes with positions (CREMI/SNEMI layout)"
        sample = ds[0]
        return super().applicable(ctx) if sample is not None and "instances" in sample else "dataset has no instance labels"

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        out = self.fit_predict(ctx, fraction, seed)
        dm = ctx.datamodule
        records = dm.dataset("test", augment=False).records
        if len(records) != len(out["prob"]):
            raise ValueError(f"{self.name}: {len(out['prob'])} predictions for {len(records)} test records "
                             "(a skipped sample would misplace the stitching)")
        by_volume: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            by_volume[r["raw"]].append(i)
        d, h, w = dm.volume_size
        splits, merges, arands = [], [], []
        for raw, idx in by_volume.items():
            gt_full = dm._array(records[idx[0]]["lab"])
            z0 = min(records[i]["box"][0] for i in idx)
            z1 = min(max(records[i]["box"][0] for i in idx) + d, gt_full.shape[0])
            region = (slice(z0, z1), slice(0, gt_full.shape[1]), slice(0, gt_full.shape[2]))
            prob = np.zeros([z1 - z0, gt_full.shape[1], gt_full.shape[2]], np.float32)
            covered = np.zeros(prob.shape, bool)
            for i in idx:
                z, y, x = records[i]["box"]
                block = out["prob"][i][1].numpy()
                dz, dy, dx = (min(d, z1 - z), min(h, prob.shape[1] - y), min(w, prob.shape[2] - x))
                prob[z - z0:z - z0 + dz, y:y + dy, x:x + dx] = block[:dz, :dy, :dx]
                covered[z - z0:z - z0 + dz, y:y + dy, x:x + dx] = True
            gt = np.where(covered, gt_full[region], 0)  # voxels outside every test block are not scored
            seg = watershed_agglomeration(prob, float(ctx.params.get("seed_threshold", 0.3)),
                                          int(ctx.params.get("min_seed_size", 1)))
            s, m = cremi_voi(seg, gt)
            splits.append(s)
            merges.append(m)
            arands.append(adapted_rand_error(seg, gt))
        how = (f"whole test regions of {len(by_volume)} volume(s) stitched from {len(records)} sub-volumes, seeded "
               f"watershed on predicted boundaries; ground-truth id 0 ignored; mean over volumes; {out['how']}")
        values = [MetricValue("voi", float(np.mean(splits) + np.mean(merges)), f"CREMI VOI split + merge (bits); {how}"),
                  MetricValue("voi_split", float(np.mean(splits)), f"CREMI VOI split H(seg|gt) (bits); {how}"),
                  MetricValue("voi_merge", float(np.mean(merges)), f"CREMI VOI merge H(gt|seg) (bits); {how}"),
                  MetricValue("arand", float(np.mean(arands)), f"adapted Rand error (SNEMI3D/CREMI); {how}")]
        split, merge = np.asarray(splits, np.float64), np.asarray(merges, np.float64)
        samples = {"ids": np.asarray([str(v) for v in by_volume]), "voi": split + merge, "voi_split": split,
                   "voi_merge": merge, "arand": np.asarray(arands, np.float64)}  # one CREMI sample per volume
        recipes = {k: mean_recipe(k, higher_is_better=False) for k in ("voi", "voi_split", "voi_merge", "arand")}
        return ProtocolResult(values, out["split_hash"], {"protocol_variant": self.variant, **out.get("selection", {})},
                              samples=samples, recipes=recipes)


__all__ = ["EMCremi", "adapted_rand_error", "cremi_voi", "watershed_agglomeration"]
