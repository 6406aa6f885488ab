"""Dice definitions used in the literature, named so every number says which one it is.

* ``foreground`` (default): MONAI ``DiceMetric(include_background=False, ignore_empty=True)``: Dice
  of the foreground class(es) per image, averaged over images whose ground truth is non-empty (images
  with an empty ground truth are excluded), then over classes. A per-image mean: *not* MMSeg's
  number (MMSeg sums areas over the whole dataset first; see ``mmseg_dataset``).
* ``mgca_per_image``: MGCA's ``get_dice``: per-image binary Dice where an image with empty ground
  truth and empty prediction scores 1 (and empty GT with a non-empty prediction scores 0), averaged
  over all images. Inflated on datasets with many negatives; kept for comparison.
* ``with_background``: MONAI ``include_background=True`` (GTGM's finetune code); inflated.
* ``mmseg_dataset``: MMSeg's ``mDice`` (``IoUMetric``/``total_area_to_metrics``, used by BenchX):
  per class, intersection and the predicted and true areas are summed over the *whole dataset*, Dice
  = 2·ΣI / (ΣP + ΣT), then the mean over all classes, background included (NaN classes skipped).
* ``mmseg_dataset_foreground``: the same dataset-level Dice, mean over foreground classes only (the
  per-class "Dice" MMSeg prints for the lesion class of a binary task such as BenchX's SIIM).
"""
from __future__ import annotations

import torch
from monai.metrics import DiceMetric

DEFINITIONS = {
    "foreground": "Dice of foreground classes per image (MONAI include_background=False, ignore_empty=True: "
                  "images with empty ground truth excluded), mean over images then classes",
    "mgca_per_image": "MGCA per-image binary Dice; empty GT & empty prediction = 1, mean over all images",
    "with_background": "MONAI Dice with include_background=True (background counted), mean over images",
    "mmseg_dataset": "MMSeg mDice: per class 2·ΣI/(ΣP+ΣT) with areas summed over the whole test set, "
                     "mean over all classes incl. background",
    "mmseg_dataset_foreground": "dataset-level Dice (areas summed over the whole test set, as MMSeg) of the "
                                "foreground classes, mean over foreground classes",
}


def dice_score(pred: torch.Tensor, target: torch.Tensor, num_classes: int, definition: str = "foreground") -> float:
    """Dice of integer label maps ``pred`` and ``target`` shaped ``(B, 1, *spatial)``.

    Raises:
        ValueError: for an unknown definition, or when no image qualifies under ``foreground``.
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown Dice definition {definition!r}; known: {sorted(DEFINITIONS)}")
    if definition == "mgca_per_image":
        p = (pred > 0).flatten(1).float()
        t = (target > 0).flatten(1).float()
        inter = (p * t).sum(1)
        denom = p.sum(1) + t.sum(1)
        per = torch.where(denom == 0, torch.ones_like(denom), 2 * inter / denom.clamp_min(1e-8))
        return float(per.mean())
    if definition.startswith("mmseg_dataset"):
        return mmseg_dataset_dice(pred, target, num_classes, background=definition == "mmseg_dataset")
    one_hot = lambda x: torch.nn.functional.one_hot(x[:, 0].long(), num_classes).movedim(-1, 1).float()  # noqa: E731
    metric = DiceMetric(include_background=definition == "with_background", reduction="mean_batch",
                        ignore_empty=True)
    metric(one_hot(pred), one_hot(target))
    per_class = metric.aggregate()
    valid = per_class[~torch.isnan(per_class)]
    if valid.numel() == 0:
        raise ValueError("Dice undefined: no test image has a non-empty ground truth")
    return float(valid.mean())


def mmseg_dataset_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int, background: bool = True) -> float:
    """Dataset-level Dice as MMSeg's ``total_area_to_metrics``: areas summed over every image first.

    Raises:
        ValueError: when no counted class occurs in the prediction or the ground truth.
    """
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    scores = []
    for c in range(0 if background else 1, num_classes):
        pc, tc = p == c, t == c
        denom = int(pc.sum() + tc.sum())
        if denom:
            scores.append(2 * float((pc & tc).sum()) / denom)
    if not scores:
        raise ValueError("Dice undefined: no counted class occurs in prediction or ground truth")
    return float(sum(scores) / len(scores))


def monai_mean_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int, include_background: bool = True) -> float:
    """MONAI ``DiceMetric(include_background, reduction="mean")`` as GTGM's ``task1.py`` L318 and
    ``train.py`` aggregate it: per image the mean over its classes with a non-empty ground truth, then the
    mean over images (not the per-class mean of :func:`dice_score`'s ``with_background``).

    Raises:
        ValueError: when no image has a non-empty class.
    """
    one_hot = lambda x: torch.nn.functional.one_hot(x[:, 0].long(), num_classes).movedim(-1, 1).float()  # noqa: E731
    metric = DiceMetric(include_background=include_background, reduction="mean", ignore_empty=True)
    metric(one_hot(pred), one_hot(target))
    per = metric.get_buffer()  # (images, classes), NaN where the ground truth lacks the class
    if per is None or torch.isnan(per).all():
        raise ValueError("Dice undefined: no image has a non-empty class")
    return float(metric.aggregate())
