"""Pieces that the trainable-head reference protocols share: batch labels, losses, epoch and
iteration batch streams, a probe batch, cached evaluation features, classification result assembly and
the comparability fields of a row. (Reference protocols must not import each other; they import these.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medvlp.benchmarks.kit.head_loop import FitResult, HeadTrainer, selection_fields
from medvlp.benchmarks.kit.protocol import EvalContext, MetricValue, auc_recipe, label_samples, macro_auc, mean_recipe
from medvlp.benchmarks.kit.views import batch_ids, subset_loader


def labels_of(batch: dict[str, Any]) -> torch.Tensor:
    """``batch["labels"]`` as float, with a clear error when the datamodule has none."""
    if "labels" not in batch:
        raise KeyError("batch has no 'labels': a classification protocol needs a labelled datamodule")
    return batch["labels"].float()


def classification_loss(multiclass: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on the arg-max of one-hot targets (``multiclass``), else BCE-with-logits over the
    known (non-NaN) labels, mean over batch × classes."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.to(logits.device)
        if multiclass:
            return F.cross_entropy(logits.float(), y.argmax(1))
        known = ~torch.isnan(y)
        return F.binary_cross_entropy_with_logits(logits.float()[known], y[known])

    return loss


def splits_folder(ctx: EvalContext) -> Path | None:
    """``<work_dir>/splits/<datamodule>_<version>`` where protocols write the id files of their subsets."""
    if not ctx.work_dir:
        return None
    dm = ctx.datamodule
    return Path(ctx.work_dir) / "splits" / f"{type(dm).__name__}_{dm.dataset_version}".replace("/", "_").replace(":", "_")


def probe_batch(dm: Any, rows: Sequence[int], seed: int) -> dict[str, Any]:
    """The first readable batch of (up to) two training rows: shapes for building heads."""
    return next(b for b in subset_loader(dm, "train", list(rows)[:2], 2, False, seed) if b is not None)


def epoch_batches(dm: Any, rows: Sequence[int], batch_size: int, seed: int,
                  drop_last: bool = False) -> Callable[[int], Iterator[dict[str, Any]]]:
    """``epoch → batches`` of the training rows, reshuffled per epoch (seed ``seed·1000 + epoch``)."""

    def batches(epoch: int) -> Iterator[dict[str, Any]]:
        loader = subset_loader(dm, "train", rows, batch_size, True, seed * 1000 + epoch, drop_last=drop_last)
        return (b for b in loader if b is not None)

    return batches


def iteration_blocks(loader_for: Callable[[int], Iterable[Any]], interval: int) -> Callable[[int], Iterator[Any]]:
    """``block → interval batches``: iteration-based training cut into validation intervals (the
    loop's "epoch" is one block); ``loader_for(k)`` gives the k-th pass over the training set."""

    def batches(block: int) -> Iterator[Any]:
        done, passes = 0, 0
        while done < interval:
            got = False
            for batch in loader_for(block * 1000 + passes):
                if batch is None:
                    continue
                got = True
                yield batch
                done += 1
                if done >= interval:
                    return
            passes += 1
            if not got:
                raise ValueError("the training split yielded no batch")

    return batches


def scored_split(dm: Any, split: str, batch_size: int, seed: int, logits_of: Callable[[dict[str, Any]], torch.Tensor],
                 multiclass: bool, ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax (``multiclass``) or sigmoid scores and labels of a whole split, optionally collecting ids."""
    out, ys = [], []
    for batch in subset_loader(dm, split, None, batch_size, False, seed):
        if batch is None:
            continue
        logits = logits_of(batch).float().cpu()
        out.append(torch.softmax(logits, 1) if multiclass else torch.sigmoid(logits))
        ys.append(labels_of(batch))
        if ids is not None:
            ids.extend(batch_ids(batch, len(ids)))
    return torch.cat(out).numpy(), torch.cat(ys).numpy()


def classification_values(ids: Sequence[str], s: np.ndarray, y: np.ndarray, names: Sequence[str], multiclass: bool,
                          how: str) -> tuple[list[MetricValue], dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """``auc`` (and ``acc`` for one-hot sets) on test, with their per-sample arrays and recipes."""
    values = [MetricValue("auc", macro_auc(y, s)[0], f"macro ROC-AUC on test (N={len(y)}); {how}")]
    samples, recipes = label_samples(ids, s, y, names), {"auc": auc_recipe()}
    if multiclass:
        samples["acc_correct"] = (s.argmax(1) == y.argmax(1)).astype(np.float32)
        recipes["acc"] = mean_recipe("acc_correct", chance=1.0 / y.shape[1])
        values.append(MetricValue("acc", float(samples["acc_correct"].mean()), f"top-1 accuracy on test (N={len(y)}); {how}"))
    return values, samples, recipes


def row_comparability(variant: str, fraction_source: str, result: FitResult, trainer: HeadTrainer, fidelity: str,
                      **extra: Any) -> dict[str, Any]:
    """A reference row's comparability fields: variant, fraction source, selection and fidelity."""
    return {"protocol_variant": variant, "fraction_source": fraction_source, **selection_fields(result, trainer),
            "fidelity": fidelity, **extra}


class ForwardCounter:
    """Counts encoder forward passes (images through the encoder), for comparing a protocol's cost."""

    def __init__(self) -> None:
        self.images = 0
        self.calls = 0

    def add(self, n: int) -> None:
        """Record one forward of ``n`` images."""
        self.images += int(n)
        self.calls += 1
