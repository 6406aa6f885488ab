"""Instance-segmentation agreement: variation of information (split, merge) and the adapted Rand error,
over voxels whose ground-truth id is not 0 (unlabelled). The one implementation behind ``instance_voi``
(nats) and ``em_cremi`` (bits, as CREMI); tested against scikit-image's ``variation_of_information`` and
``adapted_rand_error``, which GTGM's NeuronSeg evaluation calls."""
from __future__ import annotations

import math

import numpy as np


def contingency(seg: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Overlap counts ``n_ij`` of segment ``i`` and ground-truth id ``j`` over voxels with ``gt > 0``."""
    ok = gt.ravel() > 0
    _, si = np.unique(seg.ravel()[ok], return_inverse=True)
    _, gi = np.unique(gt.ravel()[ok], return_inverse=True)
    table = np.zeros((si.max() + 1 if si.size else 0, gi.max() + 1 if gi.size else 0))
    np.add.at(table, (si, gi), 1)
    return table


def variation_of_information(seg: np.ndarray, gt: np.ndarray, base: float = 2.0) -> tuple[float, float]:
    """``(split, merge)`` = ``(H(seg | gt), H(gt | seg))`` in log-``base`` units (2: bits, CREMI's
    ``voi`` and scikit-image's ``variation_of_information(gt, seg, ignore_labels=[0])``; e: nats,
    ``instance_voi``).

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
    scale = 1.0 / math.log(base)
    split = float(-(p[nz] * np.log(p[nz] / pg[cols])).sum()) * scale
    merge = float(-(p[nz] * np.log(p[nz] / ps[rows])).sum()) * scale
    return split + 0.0, merge + 0.0


def adapted_rand_error(seg: np.ndarray, gt: np.ndarray, pairs: bool = True) -> float:
    """Adapted Rand error ``1 − F``, ``F = 2·S / (A + B)`` with ``S = Σ n_ij²``, ``A = Σ a_i²`` (segment
    sizes), ``B = Σ b_j²`` (ground-truth sizes), over voxels with ``gt > 0``.

    ``pairs=True`` (default) counts pairs of distinct voxels (each sum minus the voxel count N), as
    scikit-image's ``adapted_rand_error(gt, seg)[0]``, which GTGM's NeuronSeg evaluation calls;
    ``pairs=False`` is the SNEMI3D/CREMI form without the subtraction.

    Raises:
        ValueError: when the ground truth has no labelled voxel.
    """
    n = contingency(seg, gt)
    total = float(n.sum())
    if total == 0:
        raise ValueError("adapted Rand undefined: the ground truth has no labelled voxel")
    off = total if pairs else 0.0
    s = float((n ** 2).sum()) - off
    a = float((n.sum(1) ** 2).sum()) - off
    b = float((n.sum(0) ** 2).sum()) - off
    if a + b == 0:
        return 0.0  # every voxel its own segment in both labelings: no pair to disagree on
    return 1.0 - 2.0 * s / (a + b)
