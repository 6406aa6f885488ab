"""Fine-tune classification: backbone + linear head trained end to end (BenchX-style backbone lr multiplier)."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from medvlp.benchmarks.protocol import (EvalContext, MetricValue, Protocol, ProtocolResult, auc_recipe, constant_class_flags,
                                       label_samples, macro_auc, random_batches)
from medvlp.benchmarks.splits import fraction_rows
from medvlp.progress import track
from medvlp.registry import register_benchmark


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


@register_benchmark("finetune")
class Finetune(Protocol):
    """Multi-label classification with the whole image encoder trainable.

    A copy of the model is fine-tuned (the evaluated checkpoint is never modified): a linear head on
    ``image_representation``; AdamW with head lr ``lr`` and backbone lr ``lr × backbone_lr_mult``
    (BenchX: 0.1); cosine decay; masked BCE (NaN labels ignored); training subset by
    :func:`fraction_ids`; macro ROC-AUC on the test split after ``epochs``.

    Params: ``epochs`` (default 5), ``lr`` (1e-3), ``backbone_lr_mult`` (0.1), ``batch_size`` (16),
    ``weight_decay`` (0.05).
    """

    parameters = {
        "lr": "head learning rate (1e-3)",
        "backbone_lr_mult": "backbone lr = lr × this (0.1)",
        "weight_decay": "AdamW weight decay (0.05)",
        "batch_size": "batch size (16)",
        "epochs": "epochs over the labelled subset (5)",
    }

    name = "finetune"
    uses_fractions = True
    needs_labels = True

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        p = ctx.params
        torch.manual_seed(seed)
        dm = ctx.datamodule
        x_all, y_all, rows, subset_hash = load_fraction(dm, fraction, ctx.subset_seed_for(seed))
        model = copy.deepcopy(ctx.model).to(ctx.device).train()
        with torch.no_grad():
            dim = model.image_representation(x_all[:2].to(ctx.device)).shape[-1]
        head = nn.Linear(dim, y_all.shape[1]).to(ctx.device)
        lr = float(p.get("lr", 1e-3))
        opt = torch.optim.AdamW([{"params": head.parameters(), "lr": lr},
                                 {"params": model.image_backbone().parameters(),
                                  "lr": lr * float(p.get("backbone_lr_mult", 0.1))}],
                                weight_decay=float(p.get("weight_decay", 0.05)))
        bs, epochs = int(p.get("batch_size", 16)), int(p.get("epochs", 5))
        batches = list(random_batches(rows, bs, epochs, seed))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, len(batches))
        for idx in track(batches, len(batches), f"{self.name} f={fraction:g} s={seed}"):
            y = y_all[idx].to(ctx.device)
            logits = head(model.image_representation(x_all[idx].to(ctx.device)))
            known = ~torch.isnan(y)
            loss = F.binary_cross_entropy_with_logits(logits[known], y[known])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        scores, targets, test_ids = [], [], []
        with torch.no_grad():
            for batch in dm.eval_dataloader("test", 64):
                if batch is None:
                    continue
                test_ids.extend(_ids(batch, len(test_ids)))
                scores.append(torch.sigmoid(head(model.image_representation(batch["image"].to(ctx.device)))).cpu())
                targets.append(batch["labels"].float())
        y_test, s_test = torch.cat(targets).numpy(), torch.cat(scores).numpy()
        auc, _ = macro_auc(y_test, s_test)
        d = (f"macro ROC-AUC on test; encoder + linear head fine-tuned {epochs} epochs (AdamW, backbone lr x "
             f"{p.get('backbone_lr_mult', 0.1)}) on {len(rows)} train samples ({fraction:g}, seed {seed})")
        del model
        from medvlp.benchmarks.linear_probe import probe_flags

        names = list(dm.label_names)
        flags = probe_flags(y_all[rows].numpy(), names) + constant_class_flags(y_test, names, "the test split")
        return ProtocolResult([MetricValue("auc", float(auc), d)], subset_hash,
                              samples=label_samples(test_ids, s_test, y_test, names), recipes={"auc": auc_recipe()},
                              flags=flags)
