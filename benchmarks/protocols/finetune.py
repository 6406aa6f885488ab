"""Fine-tune classification: backbone + linear head trained end to end (BenchX-style backbone lr multiplier)."""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from medvlp.benchmarks.kit.head_loop import HeadTrainer, fit, selection_fields, selection_text
from medvlp.benchmarks.kit.protocol import (EvalContext, MetricValue, Protocol, ProtocolResult, auc_recipe, constant_class_flags,
                                       label_samples, macro_auc, random_batches)
from medvlp.benchmarks.kit.splits import fraction_rows
from medvlp.registry import register_benchmark
from medvlp.benchmarks.protocols.linear_probe import probe_flags


def _ids(batch: dict, start: int) -> list[str]:
    return [str(m["id"]) for m in batch["meta"]] if "meta" in batch else [str(start + i) for i in range(len(batch["image"]))]


def load_fraction(dm: Any, fraction: float, seed: int, batch_size: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor, list[int], str]:
    """Images and labels of the fraction's training rows only: ``(x, y, rows into x, subset hash)``.

    The subset is chosen by :func:`fraction_rows` over the split's ids read from the dataset's records (no
    image decoded); only those rows are loaded (through the datamodule's workers and pinned memory). A
    dataset without records (streamed shards) is read whole and subset afterwards. Rows whose sample is
    skipped under the datamodule's policy are dropped from the subset.
    """
    ds = dm.dataset("train", augment=False)
    records = getattr(ds, "records", None)
    if records is None:
        images, labels, ids = [], [], []
        for batch in dm.eval_dataloader("train", batch_size):
            if batch is None:
                continue
            ids.extend(_ids(batch, len(ids)))
            images.append(batch["image"])
            labels.append(batch["labels"].float())
        rows, subset_hash = fraction_rows(ids, fraction, seed)
        return torch.cat(images), torch.cat(labels), rows, subset_hash
    rows, subset_hash = fraction_rows([str(r["id"]) for r in records], fraction, seed)
    loader = DataLoader(Subset(ds, rows), batch_size=batch_size, shuffle=False, collate_fn=dm.collate_fn,
                        num_workers=dm.num_workers, pin_memory=dm.pin_memory)
    images, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images.append(batch["image"])
        labels.append(batch["labels"].float())
    x, y = torch.cat(images), torch.cat(labels)
    return x, y, list(range(len(x))), subset_hash


def load_split(dm: Any, split: str, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image and label of a split, in memory: ``(x, y, ids)`` (skipped samples left out)."""
    images, labels, ids = [], [], []
    for batch in dm.eval_dataloader(split, batch_size):
        if batch is None:
            continue
        ids.extend(_ids(batch, len(ids)))
        images.append(batch["image"])
        labels.append(batch["labels"].float())
    if not images:
        return torch.empty(0), torch.empty(0, len(dm.label_names)), []
    return torch.cat(images), torch.cat(labels), ids


@register_benchmark("finetune")
class Finetune(Protocol):
    """Multi-label classification with the whole image encoder trainable, selected on the validation split.

    A copy of the model is fine-tuned (the evaluated checkpoint is never modified): a linear head on
    ``image_representation``; AdamW with head lr ``lr`` and backbone lr ``lr × backbone_lr_mult``
    (BenchX: 0.1); cosine decay over all steps; masked BCE (NaN labels ignored); training subset by
    :func:`fraction_rows`. After every epoch the encoder + head are scored on the validation split
    (macro ROC-AUC; the mean masked BCE when no validation class has both labels) and the best epoch's
    weights are kept (``selection: best_val``, as BenchX's ``ModelCheckpoint`` on validation AUROC);
    macro ROC-AUC on the test split at those weights. ``patience`` (default none) stops early after that
    many epochs without improvement.

    Params: ``epochs`` (default 5), ``lr`` (1e-3), ``backbone_lr_mult`` (0.1), ``batch_size`` (16),
    ``weight_decay`` (0.05), ``patience`` (none).
    """

    parameters = {
        "lr": "head learning rate (1e-3)",
        "backbone_lr_mult": "backbone lr = lr × this (0.1)",
        "weight_decay": "AdamW weight decay (0.05)",
        "batch_size": "batch size (16)",
        "epochs": "epoch budget over the labelled subset; the best validation epoch is tested (5)",
        "patience": "stop after this many epochs without validation improvement (none: run every epoch)",
    }

    name = "finetune"
    uses_fractions = True
    needs_labels = True
    selection = "selects the epoch with the best validation macro AUROC"

    def build(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[HeadTrainer, dict[str, Any]]:
        """The trainer of one (fraction, seed) run and the pieces the test step needs (``test()`` →
        ``(ids, scores, labels)`` with the modules' current weights)."""
        p = ctx.params
        torch.manual_seed(seed)
        dm = ctx.datamodule
        x_all, y_all, rows, subset_hash = load_fraction(dm, fraction, ctx.subset_seed_for(seed))
        with torch.random.fork_rng(devices=[]):  # loading the validation split leaves the training stream as before
            x_val, y_val, _ = load_split(dm, "val")
        if not len(x_val):
            raise ValueError(f"{self.name}: the validation split yielded no samples ({self.selection})")
        model = copy.deepcopy(ctx.model).to(ctx.device).train()
        with torch.no_grad():
            dim = model.image_representation(x_all[:2].to(ctx.device)).shape[-1]
        head = nn.Linear(dim, y_all.shape[1]).to(ctx.device)
        lr = float(p.get("lr", 1e-3))
        backbone = model.image_backbone()
        opt = torch.optim.AdamW([{"params": head.parameters(), "lr": lr},
                                 {"params": backbone.parameters(), "lr": lr * float(p.get("backbone_lr_mult", 0.1))}],
                                weight_decay=float(p.get("weight_decay", 0.05)))
        bs, epochs = int(p.get("batch_size", 16)), int(p.get("epochs", 5))
        batches = list(random_batches(rows, bs, epochs, seed))
        per_epoch = max(1, math.ceil(len(rows) / bs))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(batches))

        def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            known = ~torch.isnan(y)
            return F.binary_cross_entropy_with_logits(logits[known], y[known])

        def step(idx: list[int]) -> torch.Tensor:
            return loss_of(head(model.image_representation(x_all[idx].to(ctx.device))), y_all[idx].to(ctx.device))

        def scores_of(x: torch.Tensor) -> torch.Tensor:
            model.eval()
            return torch.cat([head(model.image_representation(x[i:i + 64].to(ctx.device))).float().cpu()
                              for i in range(0, len(x), 64)])

        # selection on validation macro AUROC; on the mean BCE when no validation class has both labels
        by_auc = any(len(np.unique(c[~np.isnan(c)])) == 2 for c in y_val.numpy().T)

        def validate() -> dict[str, float]:
            logits = scores_of(x_val)
            out = {"val_loss": float(loss_of(logits, y_val))}
            if by_auc:
                out["val_auc"] = macro_auc(y_val.numpy(), torch.sigmoid(logits).numpy())[0]
            return out

        def test() -> tuple[list[str], np.ndarray, np.ndarray]:
            model.eval()
            scores, targets, ids = [], [], []
            with torch.no_grad():
                for batch in dm.eval_dataloader("test", 64):
                    if batch is None:
                        continue
                    ids.extend(_ids(batch, len(ids)))
                    scores.append(torch.sigmoid(head(model.image_representation(batch["image"].to(ctx.device)))).cpu())
                    targets.append(batch["labels"].float())
            return ids, torch.cat(scores).numpy(), torch.cat(targets).numpy()

        patience = p.get("patience")
        trainer = HeadTrainer(
            modules=[backbone, head], optimizer=opt, train_batches=lambda e: batches[e * per_epoch:(e + 1) * per_epoch],
            train_step=step, validate=validate, monitor="val_auc" if by_auc else "val_loss",
            mode="max" if by_auc else "min", max_epochs=epochs, patience=None if patience is None else int(patience),
            scheduler=sched, set_train_mode=model.train,
            info={"rows": rows, "split_hash": subset_hash, "n_val": len(x_val), "train_labels": y_all[rows].numpy()})
        return trainer, {"model": model, "head": head, "test": test}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        parts["model"].eval()
        test_ids, s_test, y_test = parts["test"]()
        auc, _ = macro_auc(y_test, s_test)
        p, rows = ctx.params, trainer.info["rows"]
        d = (f"macro ROC-AUC on test; encoder + linear head fine-tuned (AdamW, backbone lr x "
             f"{p.get('backbone_lr_mult', 0.1)}) on {len(rows)} train samples ({fraction:g}, seed {seed}); "
             f"{selection_text(result, trainer)} on {trainer.info['n_val']} validation samples")
        del parts

        names = list(ctx.datamodule.label_names)
        flags = probe_flags(trainer.info["train_labels"], names) + constant_class_flags(y_test, names, "the test split")
        return ProtocolResult([MetricValue("auc", float(auc), d)], trainer.info["split_hash"],
                              comparability=selection_fields(result, trainer),
                              samples=label_samples(test_ids, s_test, y_test, names), recipes={"auc": auc_recipe()},
                              flags=flags)
