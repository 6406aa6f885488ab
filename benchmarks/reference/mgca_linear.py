"""MGCA's linear classification protocol (``mgca/models/mgca/mgca_finetuner.py`` + ``ssl_finetuner.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.benchmarks.kit.head_loop import HeadTrainer, fit, selection_fields
from medvlp.benchmarks.protocols.linear_probe import is_one_hot
from medvlp.benchmarks.kit.protocol import (EvalContext, MetricValue, Protocol, ProtocolResult, auc_recipe, label_samples,
                                       macro_auc, mean_recipe)
from medvlp.benchmarks.kit.splits import select_fraction
from medvlp.benchmarks.kit.views import (batch_ids, center_crop, encoder_channels, random_crop, renormalise, split_ids,
                                     subset_loader, to_channels)
from medvlp.registry import register_benchmark

DEFAULTS: dict[str, Any] = {"lr": 5e-4, "weight_decay": 1e-6, "batch_size": 48, "max_epochs": 50, "patience": 10,
                            "resize": 256, "crop": 224, "fraction_source": "mgca", "fraction_files": {}}


def labels_of(batch: dict[str, Any]) -> torch.Tensor:
    """``batch["labels"]`` as float, with a clear error when the datamodule has none."""
    if "labels" not in batch:
        raise KeyError("batch has no 'labels': a classification protocol needs a labelled datamodule")
    return batch["labels"].float()


@register_benchmark("mgca_linear")
class MGCALinear(Protocol):
    """MGCA/ASG linear classification: a frozen image encoder and one trained ``nn.Linear``.

    As ``SSLFineTuner`` with ``hidden_dim=None`` (``mgca_finetuner.py`` sets the rest):

    * feature: the encoder's global feature (``image_representation``: the ViT CLS token), computed
      under ``no_grad`` with the encoder in eval mode every step;
    * head: ``nn.Linear(D, K)`` (dropout 0); AdamW(lr 5e-4, betas (0.9, 0.999), weight decay 1e-6),
      no schedule; batch 48; at most 50 epochs;
    * loss: BCE-with-logits for multi-label sets (CheXpert, RSNA), cross-entropy for one-hot
      multi-class sets (COVIDx);
    * selection: validation loss every epoch, early stop with patience 10, test at the best-val-loss
      weights (``ModelCheckpoint(monitor="val_loss")`` + ``trainer.test(ckpt_path="best")``);
    * images: resized (longest side) and zero-padded to 256 by the datamodule (set its
      ``image_size: 256``; MGCA ``resize_img``), then a random 224 crop per sample and epoch for
      training and the central 224 crop for validation and test (``DataTransforms``); normalised
      ``(v − 0.5)/0.5``; the grey channel replicated to the encoder's input channels (3 for MGCA's
      RGB ViT weights);
    * label fractions: ``fraction_source: mgca`` (default) = ``df.sample(frac, random_state=42)`` on the
      train table, one subset for every seed, written as an id file under ``<output>/splits``;
      ``hash`` and ``file`` (id or BenchX subset files) as :func:`~medvlp.benchmarks.kit.splits.select_fraction`;
    * metrics: macro ROC-AUC over classes (multi-label; torchmetrics ``AUROC``), top-1 accuracy for
      one-hot sets.

    Deviations: CheXpert training in MGCA uses ``Moco2Transform`` (colour jitter, grey-scale, blur,
    flip on top of the random crop); this protocol applies the random crop only, for every dataset.
    The encoder's weights are never changed (features under ``no_grad``; only the head is in the
    optimizer) and the model object is shared with later protocols. Missing (NaN) labels are masked out of BCE where MGCA fills
    them with 0 (our CheXpert datamodule already maps blanks to 0 under ``uncertainty: mgca``).

    Params: the keys of ``DEFAULTS`` (``lr``, ``weight_decay``, ``batch_size``, ``max_epochs``,
    ``patience``, ``resize``, ``crop``, ``fraction_source``, ``fraction_files``).
    """

    parameters = {
        "lr": "AdamW learning rate of the head (5e-4)", "weight_decay": "AdamW weight decay (1e-6)",
        "batch_size": "batch size (48)", "max_epochs": "epoch budget (50)",
        "patience": "early-stopping patience in epochs on validation loss (10)",
        "resize": "padded image side the datamodule must deliver (256)", "crop": "random/center crop side (224)",
        "fraction_source": "mgca | hash | file (mgca)", "fraction_files": "{label percent: id or BenchX subset file} ({})",
    }

    name = "mgca_linear"
    variant = "mgca_linear"
    needs_labels = True
    selection = "MGCA selects on validation loss"
    defaults = DEFAULTS
    uses_fractions = True

    def view(self, ctx: EvalContext, x: torch.Tensor, train: bool, generator: torch.Generator) -> torch.Tensor:
        """The MGCA view of a datamodule batch: renormalised, cropped, channel-replicated."""
        p = self.params(ctx)
        if tuple(x.shape[-2:]) != (int(p["resize"]), int(p["resize"])):
            raise ValueError(f"{self.name}: images are {tuple(x.shape[-2:])}, the protocol pads to "
                             f"{p['resize']}: set the datamodule's image_size to {p['resize']} (or the protocol's resize)")
        x, _ = renormalise(x, ctx.datamodule)
        x = random_crop(x, int(p["crop"]), generator) if train else center_crop(x, int(p["crop"]))
        return to_channels(x, encoder_channels(ctx.model))

    def build(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[HeadTrainer, dict[str, Any]]:
        """The trainer of one (fraction, seed) run and the pieces the test step needs."""
        p = self.params(ctx)
        dm, model = ctx.datamodule, ctx.model.to(ctx.device).eval()
        torch.manual_seed(seed)
        ids = split_ids(dm, "train")
        materialise = Path(ctx.work_dir) / "splits" / f"{type(dm).__name__}_{dm.dataset_version}".replace("/", "_").replace(":", "_") \
            if ctx.work_dir else None
        rows, subset_hash, how = select_fraction(ids, fraction, seed, p["fraction_source"], p["fraction_files"], materialise)
        n_classes = len(dm.label_names)
        gen = torch.Generator().manual_seed(seed)
        probe = next(b for b in subset_loader(dm, "train", rows[:2], 2, False, seed) if b is not None)
        with torch.no_grad():
            dim = model.image_representation(self.view(ctx, probe["image"], False, gen).to(ctx.device)).shape[-1]
        multiclass = n_classes > 1 and is_one_hot(labels_of(probe).numpy())
        head = nn.Linear(dim, n_classes).to(ctx.device)
        opt = torch.optim.AdamW(head.parameters(), lr=float(p["lr"]), betas=(0.9, 0.999),
                                weight_decay=float(p["weight_decay"]))

        def logits_of(batch: dict[str, Any], train: bool) -> torch.Tensor:
            with torch.no_grad():
                feats = model.image_representation(self.view(ctx, batch["image"], train, gen).to(ctx.device))
            return head(feats.flatten(1))

        def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            y = y.to(logits.device)
            if multiclass:
                return F.cross_entropy(logits.float(), y.argmax(1))
            known = ~torch.isnan(y)
            return F.binary_cross_entropy_with_logits(logits.float()[known], y[known])

        def validate() -> dict[str, float]:
            total, n = 0.0, 0
            for batch in subset_loader(dm, "val", None, int(p["batch_size"]), False, seed):
                if batch is None:
                    continue
                y = labels_of(batch)
                total += float(loss_of(logits_of(batch, False), y)) * len(y)
                n += len(y)
            if n == 0:
                raise ValueError(f"{self.name}: the validation split yielded no samples")
            return {"val_loss": total / n}

        trainer = HeadTrainer(
            modules=[head], optimizer=opt,
            train_batches=lambda epoch: (b for b in subset_loader(dm, "train", rows, int(p["batch_size"]), True,
                                                                  seed * 1000 + epoch) if b is not None),
            train_step=lambda batch: loss_of(logits_of(batch, True), labels_of(batch)),
            validate=validate, monitor="val_loss", mode="min", max_epochs=int(p["max_epochs"]),
            patience=int(p["patience"]), set_train_mode=lambda: model.eval(),
            info={"rows": rows, "how": how, "multiclass": multiclass})
        return trainer, {"head": head, "logits_of": logits_of, "loss_of": loss_of, "split_hash": subset_hash}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        p = self.params(ctx)
        scores, targets, ids = [], [], []
        with torch.no_grad():
            for batch in subset_loader(ctx.datamodule, "test", None, int(p["batch_size"]), False, seed):
                if batch is None:
                    continue
                logits = parts["logits_of"](batch, False).float().cpu()
                scores.append(torch.softmax(logits, 1) if trainer.info["multiclass"] else torch.sigmoid(logits))
                targets.append(labels_of(batch))
                ids.extend(batch_ids(batch, len(ids)))
        s, y = torch.cat(scores).numpy(), torch.cat(targets).numpy()
        how = (f"MGCA linear protocol: frozen encoder CLS feature, nn.Linear, AdamW lr {p['lr']:g} wd "
               f"{p['weight_decay']:g}, batch {p['batch_size']}, {result.epochs_run}/{p['max_epochs']} epochs "
               f"(early stop on val loss, patience {p['patience']}), best-val epoch {result.best_epoch}; "
               f"{p['resize']} pad, {p['crop']} random/center crop; {trainer.info['how']}")
        values, samples = [], label_samples(ids, s, y, ctx.datamodule.label_names)
        recipes = {"auc": auc_recipe()}
        if trainer.info["multiclass"]:
            samples["acc_correct"] = (s.argmax(1) == y.argmax(1)).astype(np.float32)
            recipes["acc"] = mean_recipe("acc_correct", chance=1.0 / y.shape[1])
            values.append(MetricValue("acc", float(samples["acc_correct"].mean()),
                                      f"top-1 accuracy on test (N={len(y)}); cross-entropy head; {how}"))
        auc, _ = macro_auc(y, s)
        values.append(MetricValue("auc", auc, f"macro ROC-AUC on test (N={len(y)}); {how}"))
        comp = {"protocol_variant": self.variant, "fraction_source": p["fraction_source"],
                **selection_fields(result, trainer)}
        return ProtocolResult(values, parts["split_hash"], comp, samples=samples, recipes=recipes)

