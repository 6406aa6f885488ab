"""BenchX's fine-tuning classification protocol (``yangzhou12/BenchX`` ``config/classification/*/*.yml``,
``datasets/transforms.py``)."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.benchmarks.head_loop import HeadTrainer, fit, warmup_cosine
from medvlp.benchmarks.linear_probe import is_one_hot
from medvlp.benchmarks.mgca_linear import labels_of
from medvlp.benchmarks.protocol import EvalContext, MetricValue, Protocol, ProtocolResult, macro_auc
from medvlp.benchmarks.splits import select_fraction
from medvlp.benchmarks.views import (center_crop, encoder_channels, random_resized_crop_flip, renormalise, resize,
                                     split_ids, subset_loader, to_channels)
from medvlp.registry import register_benchmark

FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 1e-2, "momentum": 0.9, "backbone_lr_mult": 0.1, "weight_decay": 0.0, "batch_size": 64,
    "grad_clip": 1.0, "warmup_steps": 50, "total_steps": 3000, "max_epochs": 200, "early_stop": 10,
    "eval_start": 10, "eval_interval": 5, "crop": 224, "norm": [0.4978, 0.2449],
    "fraction_source": "file", "fraction_files": {},
}


class FCNormClassifier(nn.Module):
    """BenchX ``Classifier`` with ``use_fc_norm: True``: LayerNorm on the pooled feature, then a linear
    layer (truncated-normal weights, std 0.02 — medvlp's choice for ``trunc_init``; zero bias)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


@register_benchmark("benchx_finetune")
class BenchXFinetune(Protocol):
    """BenchX end-to-end fine-tuning for classification (NIH, CheXpert, RSNA, COVIDx, …).

    From BenchX's ``config/classification/<dataset>/<model>.yml`` and ``NIHTransforms``:

    * model: a copy of the encoder (the evaluated checkpoint is untouched), its global feature (CLS,
      ``global_pool: token``) → :class:`FCNormClassifier`; the whole encoder trains;
    * optimizer: SGD(lr 1e-2, momentum 0.9, no weight decay), the visual encoder at lr × 0.1
      (``lr_multiplier_ve``); ``WarmupCosineScheduler`` with 50 warm-up steps and ``t_total`` 3000
      steps (per step; the factor stays 0 after ``t_total``); gradient norm clipped to 1.0; batch 64;
    * loss: BCE-with-logits (multi-label), cross-entropy for one-hot sets;
    * selection: validation macro AUROC every 5 epochs from epoch 10, early stop after 10 validations
      without improvement, at most 200 epochs; test at the best-validation weights;
    * images: train ``RandomResizedCrop(224)`` (scale 0.08–1, ratio 3/4–4/3) + horizontal flip; val/test
      resize + center crop 224; normalised with BenchX's ``(0.4978, 0.2449)``; grey replicated to the
      encoder's channels;
    * label fractions: ``fraction_source: file`` with BenchX's shipped ``train_1.txt``/``train_10.txt``
      (``fraction_files: {1: train_1.txt, 10: train_10.txt}``, keys = label percentages; 100 % = the
      whole train split); seeds as the suite lists
      (BenchX's configs use 42).

    Deviations: BenchX trains with AMP; medvlp in the method's precision. ``trunc_init`` is read as
    std 0.02. The resize before the center crop is a no-op on the datamodule's square images.
    """

    parameters = {
        "lr": "SGD learning rate of the head (1e-2)", "momentum": "SGD momentum (0.9)",
        "backbone_lr_mult": "encoder lr multiplier (0.1)", "weight_decay": "SGD weight decay (0)",
        "batch_size": "batch size (64)", "grad_clip": "max gradient norm (1.0)",
        "warmup_steps": "linear warm-up steps (50)", "total_steps": "cosine schedule length in steps (3000)",
        "max_epochs": "epoch budget (200)", "early_stop": "validations without improvement before stopping (10)",
        "eval_start": "first validated epoch (10)", "eval_interval": "validate every N epochs (5)",
        "crop": "RandomResizedCrop / center-crop side (224)", "norm": "[mean, std] on [0, 1] intensities ([0.4978, 0.2449])",
        "fraction_source": "file | hash | mgca (file)", "fraction_files": "{label percent: BenchX subset file} ({})",
    }

    name = "benchx_finetune"
    variant = "benchx_finetune"
    uses_fractions = True

    def applicable(self, ctx: EvalContext) -> str | None:
        if not ctx.datamodule.label_names:
            return "dataset has no labels"
        if len(ctx.datamodule.dataset("val", augment=False)) == 0:
            return "dataset has no validation split (BenchX selects on validation AUROC)"
        return None

    def params(self, ctx: EvalContext) -> dict[str, Any]:
        """Protocol defaults overridden by the suite's params."""
        unknown = set(ctx.params) - set(FINETUNE_DEFAULTS) - {"fractions", "seeds"}
        if unknown:
            raise ValueError(f"{self.name}: unknown params {sorted(unknown)}; known: {sorted(FINETUNE_DEFAULTS)}")
        return {**FINETUNE_DEFAULTS, **ctx.params}

    def view(self, ctx: EvalContext, x: torch.Tensor, train: bool, generator: torch.Generator) -> torch.Tensor:
        """BenchX's view of a datamodule batch."""
        p = self.params(ctx)
        mean, std = p["norm"]
        x, _ = renormalise(x, ctx.datamodule, float(mean), float(std))
        crop = int(p["crop"])
        if train:
            x = random_resized_crop_flip(x, crop, generator)
        else:
            side = min(x.shape[-2:])
            x = center_crop(resize(center_crop(x, side), crop), crop) if side != crop else center_crop(x, crop)
        return to_channels(x, encoder_channels(ctx.model))

    def build(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[HeadTrainer, dict[str, Any]]:
        """The trainer of one (fraction, seed) run and the pieces the test step needs."""
        p = self.params(ctx)
        dm = ctx.datamodule
        torch.manual_seed(seed)
        ids = split_ids(dm, "train")
        rows, subset_hash, how = select_fraction(ids, fraction, seed, p["fraction_source"], p["fraction_files"])
        gen = torch.Generator().manual_seed(seed)
        model = copy.deepcopy(ctx.model).to(ctx.device)
        for q in model.image_backbone().parameters():
            q.requires_grad_(True)
        probe = next(b for b in subset_loader(dm, "train", rows[:2], 2, False, seed) if b is not None)
        with torch.no_grad():
            dim = model.eval().image_representation(self.view(ctx, probe["image"], False, gen).to(ctx.device)).shape[-1]
        multiclass = len(dm.label_names) > 1 and is_one_hot(labels_of(probe).numpy())
        head = FCNormClassifier(dim, len(dm.label_names)).to(ctx.device)
        backbone = model.image_backbone()
        opt = torch.optim.SGD([{"params": list(head.parameters()), "lr": float(p["lr"]), "name": "head"},
                               {"params": list(backbone.parameters()), "lr": float(p["lr"]) * float(p["backbone_lr_mult"]),
                                "name": "visual_encoder"}],
                              lr=float(p["lr"]), momentum=float(p["momentum"]), weight_decay=float(p["weight_decay"]))
        sched = warmup_cosine(opt, int(p["total_steps"]), int(p["warmup_steps"]))

        def logits_of(batch: dict[str, Any], train: bool) -> torch.Tensor:
            return head(model.image_representation(self.view(ctx, batch["image"], train, gen).to(ctx.device)))

        def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            y = y.to(logits.device)
            if multiclass:
                return F.cross_entropy(logits.float(), y.argmax(1))
            known = ~torch.isnan(y)
            return F.binary_cross_entropy_with_logits(logits.float()[known], y[known])

        def scores(split: str) -> tuple[Any, Any]:
            out, ys = [], []
            for batch in subset_loader(dm, split, None, int(p["batch_size"]), False, seed):
                if batch is None:
                    continue
                logits = logits_of(batch, False).float().cpu()
                out.append(torch.softmax(logits, 1) if multiclass else torch.sigmoid(logits))
                ys.append(labels_of(batch))
            return torch.cat(out).numpy(), torch.cat(ys).numpy()

        def validate() -> dict[str, float]:
            s, y = scores("val")
            return {"val_auc": macro_auc(y, s)[0]}

        trainer = HeadTrainer(
            modules=[head, backbone], optimizer=opt, scheduler=sched, grad_clip=float(p["grad_clip"]),
            train_batches=lambda epoch: (b for b in subset_loader(dm, "train", rows, int(p["batch_size"]), True,
                                                                  seed * 1000 + epoch) if b is not None),
            train_step=lambda batch: loss_of(logits_of(batch, True), labels_of(batch)),
            validate=validate, monitor="val_auc", mode="max", max_epochs=int(p["max_epochs"]),
            patience=int(p["early_stop"]), eval_start=int(p["eval_start"]), eval_interval=int(p["eval_interval"]),
            info={"rows": rows, "how": how, "multiclass": multiclass})
        return trainer, {"head": head, "model": model, "scores": scores, "split_hash": subset_hash, "loss_of": loss_of}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        p = self.params(ctx)
        with torch.no_grad():
            s, y = parts["scores"]("test")
        how = (f"BenchX fine-tune: SGD lr {p['lr']:g} momentum {p['momentum']:g}, encoder lr x{p['backbone_lr_mult']:g}, "
               f"warm-up {p['warmup_steps']} + cosine to step {p['total_steps']}, grad clip {p['grad_clip']:g}, batch "
               f"{p['batch_size']}, {result.epochs_run}/{p['max_epochs']} epochs (val AUROC every {p['eval_interval']} "
               f"from {p['eval_start']}, early stop {p['early_stop']}), best-val epoch {result.best_epoch + 1}; "
               f"RandomResizedCrop+flip; {trainer.info['how']}")
        values = [MetricValue("auc", macro_auc(y, s)[0], f"macro ROC-AUC on test (N={len(y)}); {how}")]
        if trainer.info["multiclass"]:
            values.append(MetricValue("acc", float((s.argmax(1) == y.argmax(1)).mean()),
                                      f"top-1 accuracy on test (N={len(y)}); {how}"))
        del parts["model"]
        comp = {"protocol_variant": self.variant, "fraction_source": p["fraction_source"], "best_epoch": result.best_epoch}
        return ProtocolResult(values, parts["split_hash"], comp)
