"""BenchX's fine-tuning classification protocol (``yangzhou12/BenchX`` ``config/classification/*/*.yml``,
``datasets/transforms.py``)."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.benchmarks.kit.head_loop import HeadTrainer, fit, selection_fields, warmup_cosine
from medvlp.benchmarks.protocols.linear_probe import is_one_hot
from medvlp.benchmarks.reference.mgca_linear import labels_of
from medvlp.benchmarks.kit.protocol import (EvalContext, MetricValue, Protocol, ProtocolResult, auc_recipe, label_samples,
                                       macro_auc, mean_recipe)
from medvlp.benchmarks.protocols.segmentation import dice_samples
from medvlp.benchmarks.kit.splits import select_fraction
from medvlp.benchmarks.kit.views import (batch_ids, center_crop, encoder_channels, random_resized_crop_flip, renormalise, resize,
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
    needs_labels = True
    selection = "BenchX selects on validation AUROC"
    defaults = FINETUNE_DEFAULTS
    uses_fractions = True

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

        def scores(split: str, ids: list[str] | None = None) -> tuple[Any, Any]:
            out, ys = [], []
            for batch in subset_loader(dm, split, None, int(p["batch_size"]), False, seed):
                if batch is None:
                    continue
                logits = logits_of(batch, False).float().cpu()
                out.append(torch.softmax(logits, 1) if multiclass else torch.sigmoid(logits))
                ys.append(labels_of(batch))
                if ids is not None:
                    ids.extend(batch_ids(batch, len(ids)))
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
        ids: list[str] = []
        with torch.no_grad():
            s, y = parts["scores"]("test", ids)
        how = (f"BenchX fine-tune: SGD lr {p['lr']:g} momentum {p['momentum']:g}, encoder lr x{p['backbone_lr_mult']:g}, "
               f"warm-up {p['warmup_steps']} + cosine to step {p['total_steps']}, grad clip {p['grad_clip']:g}, batch "
               f"{p['batch_size']}, {result.epochs_run}/{p['max_epochs']} epochs (val AUROC every {p['eval_interval']} "
               f"from {p['eval_start']}, early stop {p['early_stop']}), best-val epoch {result.best_epoch + 1}; "
               f"RandomResizedCrop+flip; {trainer.info['how']}")
        values = [MetricValue("auc", macro_auc(y, s)[0], f"macro ROC-AUC on test (N={len(y)}); {how}")]
        samples, recipes = label_samples(ids, s, y, ctx.datamodule.label_names), {"auc": auc_recipe()}
        if trainer.info["multiclass"]:
            samples["acc_correct"] = (s.argmax(1) == y.argmax(1)).astype(np.float32)
            recipes["acc"] = mean_recipe("acc_correct", chance=1.0 / y.shape[1])
            values.append(MetricValue("acc", float(samples["acc_correct"].mean()),
                                      f"top-1 accuracy on test (N={len(y)}); {how}"))
        del parts["model"]
        comp = {"protocol_variant": self.variant, "fraction_source": p["fraction_source"],
                **selection_fields(result, trainer)}
        return ProtocolResult(values, parts["split_hash"], comp, samples=samples, recipes=recipes)


SEG_DEFAULTS: dict[str, Any] = {
    "lr": 2e-5, "weight_decay": 0.05, "layer_decay": 0.65, "batch_size": 8, "max_iterations": 160000,
    "warmup_iterations": 1500, "eval_interval": 500, "channels": 768, "aux_channels": 256,
    "fraction_source": "file", "fraction_files": {}, "norm": [0.4978, 0.2449],
}


def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    """MMSeg ``ConvModule``: conv (no bias) + BN + ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Feature2Pyramid(nn.Module):
    """MMSeg ``Feature2Pyramid`` (rescales 4, 2, 1, 0.5): two transposed 2×2 convs (with BN + GELU between),
    one transposed 2×2 conv, identity and 2×2 max-pooling on four same-resolution ViT maps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class UPerHead(nn.Module):
    """MMSeg ``UPerHead`` (pool scales 1, 2, 3, 6): a pyramid-pooling module on the coarsest level,
    1×1 laterals, top-down additions, 3×3 FPN convs, all levels upsampled to the finest and fused by a
    3×3 conv; dropout 0.1; 1×1 classifier."""

    def __init__(self, dim: int, channels: int, num_classes: int, pool_scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList([_conv(dim, channels, 1) for _ in pool_scales])
        self.bottleneck = _conv(dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList([_conv(dim, channels, 1) for _ in range(3)])
        self.fpn = nn.ModuleList([_conv(channels, channels, 3) for _ in range(3)])
        self.fuse = _conv(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        up = lambda x, ref: F.interpolate(x, size=ref.shape[2:], mode="bilinear", align_corners=False)  # noqa: E731
        top = feats[3]
        pooled = [up(conv(F.adaptive_avg_pool2d(top, s)), top) for s, conv in zip(self.pool_scales, self.ppm)]
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:3])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(3, 0, -1):
            lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1])
        outs = [self.fpn[i](lat[i]) for i in range(3)] + [lat[3]]
        fused = self.fuse(torch.cat([outs[0]] + [up(o, outs[0]) for o in outs[1:]], 1))
        return self.cls(self.dropout(fused))


class FCNAuxHead(nn.Module):
    """MMSeg ``FCNHead`` as BenchX's auxiliary head: one 3×3 ``ConvModule``, dropout 0.1, 1×1 classifier."""

    def __init__(self, dim: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = _conv(dim, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.dropout(self.conv(x)))


def mmseg_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """MMSeg ``FocalLoss`` (``use_sigmoid=True``): sigmoid focal loss on one-hot targets, mean over
    pixels and classes."""
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    p = torch.sigmoid(logits)
    pt = (1 - p) * onehot + p * (1 - onehot)
    weight = (alpha * onehot + (1 - alpha) * (1 - onehot)) * pt.pow(gamma)
    return (F.binary_cross_entropy_with_logits(logits, onehot, reduction="none") * weight).mean()


def mmseg_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = 0, eps: float = 1e-3) -> torch.Tensor:
    """MMSeg 1.x ``DiceLoss`` (``use_sigmoid=True``, ``naive_dice=False``): sigmoid probabilities, the
    ``ignore_index`` class *channel* dropped, per sample ``1 − 2Σpt / (Σp² + eps + Σt² + eps)``, mean."""
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    p = torch.sigmoid(logits)
    if ignore_index is not None:
        keep = [c for c in range(logits.shape[1]) if c != ignore_index]
        p, onehot = p[:, keep], onehot[:, keep]
    p, t = p.flatten(1), onehot.flatten(1)
    d = 2 * (p * t).sum(1) / ((p * p).sum(1) + eps + (t * t).sum(1) + eps)
    return (1 - d).mean()


def layer_decay_groups(backbone: nn.Module, heads: Sequence[nn.Module], lr: float, weight_decay: float,
                       decay_rate: float) -> list[dict[str, Any]]:
    """MMSeg ``LayerDecayOptimizerConstructor`` for ViTs: layer id 0 for the patch/position embeddings
    and CLS token, ``i + 1`` for block ``i``, ``L + 1`` for everything else (norms after the blocks and
    the heads); lr × ``decay_rate^(L + 1 − id)``; no weight decay on 1-D parameters, biases and the
    position embedding / CLS token."""
    depth = len(getattr(backbone, "blocks", []))
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}

    def layer_id(name: str) -> int:
        if name.startswith(("patch_embed", "pos_embed", "cls_token", "mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    named = [(n, q) for n, q in backbone.named_parameters()] + [(f"head{i}.{n}", q) for i, h in enumerate(heads)
                                                                  for n, q in h.named_parameters()]
    for name, q in named:
        no_decay = q.ndim == 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name
        groups.setdefault((layer_id(name) if not name.startswith("head") else depth + 1, no_decay), []).append(q)
    return [{"params": ps, "lr": lr * decay_rate ** (depth + 1 - lid), "weight_decay": 0.0 if nd else weight_decay,
             "layer_id": lid} for (lid, nd), ps in sorted(groups.items())]


@register_benchmark("benchx_segmentation")
class BenchXSegmentation(Protocol):
    """BenchX segmentation (``benchmarks/mmsegmentation`` ``upernet_mrm-base_fp16-160k_siim-512x512``).

    * model: the encoder fine-tuned (``frozen_exclude: []``) with its four multi-level maps
      (``image_feature_maps``; BenchX ``out_indices`` 3/5/7/11) → :class:`Feature2Pyramid` →
      :class:`UPerHead` (768 channels, pool scales 1/2/3/6) + :class:`FCNAuxHead` on level 2 (256);
    * loss: focal ×1 + Dice ×3 (Dice ignoring class 0) on the decode head, ×0.4 / ×1.2 on the
      auxiliary head (:func:`mmseg_focal_loss`, :func:`mmseg_dice_loss`);
    * optimizer: AdamW(lr 2e-5, betas (0.9, 0.999), weight decay 0.05) with layer-wise lr decay 0.65
      (:func:`layer_decay_groups`); linear warm-up from 1e-6 over 1,500 iterations then poly (power 1)
      to 0 at 160,000; batch 8; horizontal flip p 0.5 on train;
    * selection: validation every 500 iterations on MMSeg's dataset-level Dice of the foreground class
      (``save_best='Dice.front'``); test at the best weights;
    * metrics: ``dice_mmseg_dataset`` (MMSeg ``mDice``, classes incl. background, areas summed over the
      test set) and ``dice_mmseg_dataset_foreground``; label fractions from files (``fraction_files``).

    Deviations: BenchX resizes SIIM to 512 (set the datamodule's ``image_size``); no AMP; the
    encoder's own ``feature_layers`` give the four levels (set them to 3/5/7/11 for BenchX's choice).
    """

    name = "benchx_segmentation"
    variant = "benchx_segmentation"
    selection = "BenchX selects on validation Dice"
    defaults = SEG_DEFAULTS
    uses_fractions = True
    needs_mask = True
    parameters = {
        "lr": "AdamW base learning rate (2e-5)", "weight_decay": "AdamW weight decay (0.05)",
        "layer_decay": "layer-wise lr decay rate (0.65)", "batch_size": "batch size (8)",
        "max_iterations": "training iterations (160000)", "warmup_iterations": "linear warm-up iterations (1500)",
        "eval_interval": "iterations between validations (500)", "channels": "UPerHead channels (768)",
        "aux_channels": "FCN auxiliary head channels (256)", "fraction_source": "file | hash | mgca (file)",
        "fraction_files": "{label percent: subset file} ({})", "norm": "[mean, std] on [0, 1] intensities",
    }

    def applicable(self, ctx: EvalContext) -> str | None:
        if ctx.datamodule.spatial_dims != 2:
            return "BenchX segmentation is 2D"
        return super().applicable(ctx)

    def build(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[HeadTrainer, dict[str, Any]]:
        """The trainer of one (fraction, seed) run and the pieces the test step needs."""
        from medvlp.benchmarks.metrics.dice import dice_score

        p = self.params(ctx)
        dm = ctx.datamodule
        torch.manual_seed(seed)
        ids = split_ids(dm, "train")
        rows, subset_hash, how = select_fraction(ids, fraction, seed, p["fraction_source"], p["fraction_files"])
        model = copy.deepcopy(ctx.model).to(ctx.device)
        backbone = model.image_backbone()
        gen = torch.Generator().manual_seed(seed)
        mean, std = p["norm"]

        def view(x: torch.Tensor) -> torch.Tensor:
            return to_channels(renormalise(x, dm, float(mean), float(std))[0], encoder_channels(model))

        probe = next(b for b in subset_loader(dm, "train", rows[:2], 2, False, seed) if b is not None)
        with torch.no_grad():
            maps = model.eval().image_feature_maps(view(probe["image"]).to(ctx.device))
        if len(maps) < 4:
            raise ValueError(f"{self.name}: the encoder exposes {len(maps)} feature levels; UperNet needs 4")
        dim = maps[0].shape[1]
        k = 2 if len(dm.label_names) <= 1 else len(dm.label_names) + 1
        neck, head, aux = Feature2Pyramid(dim), UPerHead(dim, int(p["channels"]), k), FCNAuxHead(dim, int(p["aux_channels"]), k)
        for m in (neck, head, aux):
            m.to(ctx.device)
        opt = torch.optim.AdamW(layer_decay_groups(backbone, [neck, head, aux], float(p["lr"]), float(p["weight_decay"]),
                                                   float(p["layer_decay"])), betas=(0.9, 0.999))
        total, warm = int(p["max_iterations"]), int(p["warmup_iterations"])

        def factor(it: int) -> float:
            if it < warm:
                return 1e-6 + (1 - 1e-6) * it / max(warm, 1)
            return max(0.0, 1 - (it - warm) / max(total - warm, 1))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        interval = int(p["eval_interval"])

        def logits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feats = neck(model.image_feature_maps(x)[-4:])
            size = x.shape[2:]
            return (F.interpolate(head(feats), size=size, mode="bilinear", align_corners=False),
                    F.interpolate(aux(feats[2]), size=size, mode="bilinear", align_corners=False))

        def step(batch: dict[str, Any]) -> torch.Tensor:
            x, y = view(batch["image"]), batch["mask"][:, 0].long()
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None], y.flip(-1), y)
            out, out_aux = logits(x.to(ctx.device))
            y = y.to(ctx.device)
            return (mmseg_focal_loss(out, y) + 3 * mmseg_dice_loss(out, y)
                    + 0.4 * mmseg_focal_loss(out_aux, y) + 1.2 * mmseg_dice_loss(out_aux, y))

        def batches(block: int) -> Any:
            done = 0
            while done < interval:
                for batch in subset_loader(dm, "train", rows, int(p["batch_size"]), True, seed * 1000 + block + done):
                    if batch is None:
                        continue
                    yield batch
                    done += 1
                    if done >= interval:
                        return

        def predict(split: str, ids: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            preds, targets = [], []
            for batch in subset_loader(dm, split, None, int(p["batch_size"]), False, seed):
                if batch is None:
                    continue
                preds.append(logits(view(batch["image"]).to(ctx.device))[0].argmax(1, keepdim=True).cpu())
                targets.append(batch["mask"].long())
                if ids is not None:
                    ids.extend(batch_ids(batch, len(ids)))
            return torch.cat(preds), torch.cat(targets)

        def validate() -> dict[str, float]:
            pred, target = predict("val")
            return {"val_dice_front": dice_score(pred, target, k, "mmseg_dataset_foreground")}

        trainer = HeadTrainer(
            modules=[backbone, neck, head, aux], optimizer=opt, scheduler=sched, train_batches=batches,
            train_step=step, validate=validate, monitor="val_dice_front", mode="max",
            max_epochs=max(1, total // interval), patience=None, info={"rows": rows, "how": how, "k": k})
        return trainer, {"predict": predict, "model": model, "split_hash": subset_hash, "heads": (neck, head, aux)}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        from medvlp.benchmarks.metrics.dice import DEFINITIONS, dice_score

        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        p = self.params(ctx)
        ids: list[str] = []
        with torch.no_grad():
            pred, target = parts["predict"]("test", ids)
        how = (f"BenchX UperNet fine-tune: AdamW lr {p['lr']:g} wd {p['weight_decay']:g} layer decay {p['layer_decay']:g}, "
               f"warm-up {p['warmup_iterations']} + poly, {result.steps} iterations, best val Dice.front at validation "
               f"{result.best_epoch + 1}; {trainer.info['how']}; N_test={len(pred)}")
        values = [MetricValue(f"dice_{d}", dice_score(pred, target, trainer.info["k"], d), f"{DEFINITIONS[d]}; {how}")
                  for d in ("mmseg_dataset", "mmseg_dataset_foreground")]
        del parts["model"]
        samples, recipes = dice_samples(pred, target, trainer.info["k"], {v.metric: v.metric[len("dice_"):] for v in values}, ids)
        return ProtocolResult(values, parts["split_hash"], {"protocol_variant": self.variant,
                                                            "fraction_source": p["fraction_source"],
                                                            **selection_fields(result, trainer)},
                              samples=samples, recipes=recipes)
