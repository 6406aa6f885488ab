"""2D and 3D segmentation on ``image_feature_maps``: frozen encoder (cached maps) or full fine-tune.

The decoder is dimension-agnostic (``spatial_dims`` picks Conv2d/Conv3d, MONAI style): the encoder's
multi-level maps (UNETR/SETR take ViT blocks 3/6/9/12; Swin gives its stage maps, resized to the finest)
are concatenated, fused by a 1×1 conv, and
upsampled ×2 per stage with conv-norm-ReLU blocks to the input size (SETR-PUP-like). Loss: MONAI
DiceCE. Full fine-tuning uses MONAI sliding-window inference for volumes at test time.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from medvlp.benchmarks.metrics.dice import DEFINITIONS, dice_score
from medvlp.benchmarks.metrics.voi import variation_of_information
from medvlp.benchmarks.kit.head_loop import HeadTrainer, fit, selection_fields, selection_text
from medvlp.benchmarks.kit.protocol import EvalContext, MetricValue, Protocol, ProtocolResult, mean_recipe, random_batches
from medvlp.benchmarks.kit.splits import fraction_rows
from medvlp.registry import register_benchmark

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ProgressiveDecoder(nn.Module):
    """Fuse same-resolution encoder maps and upsample to the image size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each input map (summed after concatenation).
        num_classes: output classes (background included).
        width: decoder width.
        max_stages: at most this many ×2 conv stages; the logits are then interpolated to the input
            size (SETR-naive style beyond that; keeps 3D decoding affordable on CPU).
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, width: int = 64,
                 max_stages: int = 2) -> None:
        super().__init__()
        conv, norm = CONV[spatial_dims], NORM[spatial_dims]
        self.spatial_dims = spatial_dims
        self.fuse = nn.Sequential(conv(in_channels, width, 1), norm(width), nn.ReLU(inplace=True))
        self.refine = nn.Sequential(conv(width, width, 3, padding=1), norm(width), nn.ReLU(inplace=True))
        self.head = conv(width, num_classes, 1)
        self.max_stages = max_stages

    def forward(self, maps: list[torch.Tensor], size: tuple[int, ...]) -> torch.Tensor:
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        finest = max((m.shape[2:] for m in maps), key=lambda s: torch.Size(s).numel())
        maps = [m if m.shape[2:] == finest else F.interpolate(m, size=finest, mode=mode, align_corners=False)
                for m in maps]
        x = self.fuse(torch.cat(maps, 1))
        stages = 0
        while stages < self.max_stages and any(s * 2 <= t for s, t in zip(x.shape[2:], size)):
            stages += 1
            x = F.interpolate(x, scale_factor=[2 if s * 2 <= t else 1 for s, t in zip(x.shape[2:], size)],
                              mode=mode, align_corners=False)
            x = self.refine(x)
        return self.head(F.interpolate(x, size=size, mode=mode, align_corners=False))


def _collect_images(ctx: EvalContext, split: str) -> tuple[list[torch.Tensor], torch.Tensor, list[str], torch.Tensor | None]:
    """Images (full fine-tuning), with masks, ids and (EM) instance labels, for a split."""
    xs, masks, ids, instances = [], [], [], []
    for batch in ctx.datamodule.eval_dataloader(split, 16):
        if batch is None:
            continue
        img = batch["image"]
        xs.extend([img[i] for i in range(img.shape[0])])
        masks.append(batch["mask"].long())
        if "instances" in batch:
            instances.append(batch["instances"].long())
        if "meta" in batch:
            ids.extend(str(m["id"]) for m in batch["meta"])
        else:
            ids.extend(str(len(ids) + i) for i in range(img.shape[0]))
    return xs, torch.cat(masks), ids, (torch.cat(instances) if instances else None)


def _collect(ctx: EvalContext, split: str, frozen: bool) -> tuple[Any, torch.Tensor, list[str], torch.Tensor | None]:
    """Frozen: the split's feature maps from the feature cache (one backbone pass per weights, dataset and
    split, reused by every fraction × seed; memory-mapped when the cache has a folder). Full: images."""
    if frozen:
        with torch.random.fork_rng(devices=[]):  # a cache miss must not move the protocol's RNG stream
            maps = ctx.features.maps(ctx.model, ctx.datamodule, split, ctx.device)
        # the stream as when the protocol iterated the split itself (one seed draw per DataLoader
        # iteration), so cached, uncached and earlier runs train the same decoder
        torch.empty((), dtype=torch.int64).random_()
        return maps, maps.masks, maps.ids, maps.instances
    return _collect_images(ctx, split)


@register_benchmark("segmentation")
class Segmentation(Protocol):
    """Segmentation Dice on the test split (see :mod:`medvlp.benchmarks.metrics.dice` for definitions).

    Selection: after every epoch the decoder (and the encoder copy in ``full`` mode) predicts the
    validation split (the cached val maps in ``frozen`` mode) and the weights of the epoch with the best
    validation Dice under the headline definition ``dice`` are kept (the mean validation DiceCE loss when
    that Dice is undefined on the validation split); the test split is predicted with them. The result
    records ``selection: best_val``, the monitored quantity and the chosen epoch.

    Params:
        mode: ``frozen`` (default; encoder maps computed once and cached, MGCA's protocol) or ``full``
            (encoder fine-tuned with lr × ``backbone_lr_mult``).
        epochs: decoder training epochs (default 30); ``patience``: stop after this many epochs
            without validation improvement (default: none, every epoch runs).
        lr: decoder learning rate (default 1e-3); ``backbone_lr_mult`` (default 0.1).
        width: decoder width (default 64). max_stages: ×2 conv upsampling stages before the logits
            are interpolated to the input size (default 2).
        batch_size: default 16. ``dice``: definition name (default ``foreground``); every definition
            listed in ``extra_dice`` is reported too (default ``[mgca_per_image]``).
        roi_size: sliding-window ROI for full fine-tuning of volumes (default: training size).
    """

    parameters = {
        "mode": "frozen | full encoder (frozen)",
        "width": "decoder width (64)",
        "max_stages": "decoder stages (2)",
        "lr": "decoder learning rate (1e-3)",
        "backbone_lr_mult": "backbone lr = lr × this in mode full (0.1)",
        "batch_size": "batch size (16)",
        "epochs": "training epochs (30)",
        "roi_size": "sliding-window ROI for 3D inference (the training size)",
        "dice": "headline Dice definition (foreground)",
        "extra_dice": "further Dice definitions reported ([mgca_per_image])",
        "patience": "stop after this many epochs without validation improvement (none: run every epoch)",
    }

    name = "segmentation"
    primary_metric = "dice"
    uses_fractions = True
    needs_mask = True
    selection = "selects the epoch with the best validation Dice"

    def build(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[HeadTrainer, dict[str, Any]]:
        """The trainer of one (fraction, seed) run (validation on the cached val maps in ``frozen`` mode)
        and the pieces the test step needs (``predict(xs)`` → ``(pred, prob)`` with the current weights)."""
        p = ctx.params
        frozen = p.get("mode", "frozen") == "frozen"
        if not frozen and p.get("mode") != "full":
            raise ValueError(f"segmentation mode must be frozen|full, got {p.get('mode')!r}")
        torch.manual_seed(seed)
        train_x, train_y, train_ids, _ = _collect(ctx, "train", frozen)
        test_x, test_y, test_ids, test_inst = _collect(ctx, "test", frozen)
        with torch.random.fork_rng(devices=[]):  # the validation split leaves the training stream as before
            val_x, val_y, _, _ = _collect(ctx, "val", frozen)
        if not len(val_y):
            raise ValueError(f"{self.name}: the validation split yielded no samples ({self.selection})")
        rows, subset_hash = fraction_rows(train_ids, fraction, ctx.subset_seed_for(seed))
        num_classes = int(max(int(train_y.max()), int(test_y.max()), int(val_y.max()), 1)) + 1
        sd = train_y.ndim - 2
        size = tuple(train_y.shape[2:])
        # full fine-tuning trains a copy: the evaluated checkpoint stays untouched for later protocols
        model = ctx.model.to(ctx.device) if frozen else copy.deepcopy(ctx.model).to(ctx.device)
        if frozen:
            in_ch = sum(level.shape[1] for level in train_x.levels)
        else:
            with torch.no_grad():
                in_ch = sum(m.shape[1] for m in model.eval().image_feature_maps(train_x[0][None].to(ctx.device)))
        decoder = ProgressiveDecoder(sd, in_ch, num_classes, int(p.get("width", 64)),
                                     int(p.get("max_stages", 2))).to(ctx.device)
        params = [{"params": decoder.parameters(), "lr": float(p.get("lr", 1e-3))}]
        modules: list[nn.Module] = [decoder]
        if not frozen:
            model.train()
            modules.insert(0, model.image_backbone())
            params.append({"params": model.image_backbone().parameters(),
                           "lr": float(p.get("lr", 1e-3)) * float(p.get("backbone_lr_mult", 0.1))})
        opt = torch.optim.AdamW(params, weight_decay=1e-4)
        # foreground-only Dice term: lesions cover <1 % of a volume and a background Dice term swamps them
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
        bs = int(p.get("batch_size", 16))
        epochs = int(p.get("epochs", 30))
        per_epoch = max(1, math.ceil(len(rows) / bs))
        batches = list(random_batches(rows, bs, epochs, seed))

        def step(idx: list[int]) -> torch.Tensor:
            return loss_fn(decoder(self._maps(model, train_x, idx, frozen, ctx.device), size), train_y[idx].to(ctx.device))

        def predict_batches(xs: Any) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
            """``(rows, pred, prob)`` per batch of ``xs`` with the current weights (nothing kept between batches)."""
            model.eval()
            with torch.no_grad():
                for start in range(0, len(xs), bs):
                    idx = list(range(start, min(start + bs, len(xs))))
                    if frozen or sd == 2:
                        logits = decoder(self._maps(model, xs, idx, frozen, ctx.device), size)
                    else:
                        roi = tuple(p.get("roi_size", size))
                        imgs = torch.stack([xs[i] for i in idx]).to(ctx.device)
                        logits = sliding_window_inference(
                            imgs, roi, 2, lambda x: decoder(model.image_feature_maps(x), tuple(x.shape[2:])))
                    yield idx, logits.argmax(1, keepdim=True).cpu(), torch.softmax(logits, 1).cpu()

        def predict(xs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            preds, probs = [], []
            for _, pred, prob in predict_batches(xs):
                preds.append(pred)
                probs.append(prob)
            return torch.cat(preds), torch.cat(probs)

        # selection on the headline Dice of the validation split; on the mean validation loss when that Dice is
        # undefined there (e.g. no validation image with foreground under ``foreground``)
        definition = p.get("dice", "foreground")
        try:
            dice_score(val_y, val_y, num_classes, definition)
            monitor = "val_dice"
        except ValueError:
            monitor = "val_loss"

        def validate() -> dict[str, float]:
            pred, prob = predict(val_x)
            if monitor == "val_dice":
                return {"val_dice": dice_score(pred, val_y, num_classes, definition)}
            loss = sum(float(loss_fn(torch.log(prob[i:i + bs].clamp_min(1e-8)), val_y[i:i + bs])) * len(prob[i:i + bs])
                       for i in range(0, len(prob), bs))
            return {"val_loss": loss / len(prob)}

        trainer = HeadTrainer(
            modules=modules, optimizer=opt, train_batches=lambda e: batches[e * per_epoch:(e + 1) * per_epoch],
            train_step=step, validate=validate, monitor=monitor, mode="max" if monitor == "val_dice" else "min",
            max_epochs=epochs, patience=None if p.get("patience") is None else int(p["patience"]),
            set_train_mode=None if frozen else model.train,
            info={"rows": rows, "split_hash": subset_hash, "num_classes": num_classes, "n_val": len(val_y),
                  "mode": "frozen encoder" if frozen else "full fine-tune"})
        return trainer, {"predict": predict, "predict_batches": predict_batches, "decoder": decoder, "model": model, "test_x": test_x, "test_y": test_y,
                         "test_ids": test_ids, "test_instances": test_inst}

    def fit_predict(self, ctx: EvalContext, fraction: float, seed: int) -> dict[str, Any]:
        """Train the decoder (and, in ``full`` mode, a copy of the encoder), keep the best validation epoch's
        weights and predict the test split with them."""
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        pred, prob = parts["predict"](parts["test_x"])
        info = trainer.info
        return {"pred": pred, "prob": prob, "target": parts["test_y"], "instances": parts["test_instances"],
                "num_classes": info["num_classes"], "split_hash": info["split_hash"], "ids": parts["test_ids"],
                "selection": selection_fields(result, trainer), "how": _how(trainer, result, len(pred))}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        out = self.fit_predict(ctx, fraction, seed)
        p = ctx.params
        main = p.get("dice", "foreground")
        names = [main] + [d for d in p.get("extra_dice", ["mgca_per_image"]) if d != main]
        values = [MetricValue(f"dice_{d}" if d != "foreground" else "dice",
                              dice_score(out["pred"], out["target"], out["num_classes"], d),
                              f"{DEFINITIONS[d]}; {out['how']}") for d in names]
        samples, recipes = dice_samples(out["pred"], out["target"], out["num_classes"],
                                        {v.metric: d for v, d in zip(values, names)}, out["ids"])
        flags = ([] if bool((out["pred"] > 0).any()) else
                 ["degenerate: the decoder predicted background everywhere on every test image"])
        return ProtocolResult(values, out["split_hash"], out.get("selection", {}), samples=samples, recipes=recipes,
                              flags=flags)

    @staticmethod
    def _maps(model: Any, xs: list[Any], idx: list[int], frozen: bool, device: Any) -> list[torch.Tensor]:
        if frozen:
            return xs.rows(idx, device)
        return model.image_feature_maps(torch.stack([xs[i] for i in idx]).to(device))


def _how(trainer: HeadTrainer, result: Any, n_test: int) -> str:
    """The run's description in each metric's definition (mode, epochs, selection, split sizes)."""
    info = trainer.info
    return (f"{info['mode']}, {result.epochs_run} epochs on {len(info['rows'])} train images, "
            f"{selection_text(result, trainer)} on {info['n_val']} validation images, N_test={n_test}")


def dice_samples(pred: torch.Tensor, target: torch.Tensor, num_classes: int, metrics: dict[str, str],
                 ids: Sequence[Any]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Per-image arrays and recipes from which each Dice ``metric → definition`` is recomputed exactly:
    dataset-level definitions (``mmseg_dataset*``) store per-image areas (``ratio``: summed, then divided),
    the others per-image Dice (``mean``)."""
    samples, recipes = {"ids": np.asarray([str(i) for i in ids])}, {}
    for metric, d in metrics.items():
        if d.startswith("mmseg_dataset"):  # dataset-level: per-image areas, summed when recomputed
            samples[f"{metric}_num"], samples[f"{metric}_den"] = dice_areas(pred, target, num_classes,
                                                                            background=d == "mmseg_dataset")
            recipes[metric] = {"kind": "ratio", "num": f"{metric}_num", "den": f"{metric}_den", "chance": None,
                               "higher_is_better": True}
        else:
            samples[metric], recipes[metric] = per_image_dice(pred, target, num_classes, d), mean_recipe(metric)
    return samples, recipes


def per_image_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int, definition: str) -> np.ndarray:
    """Per-image Dice whose :func:`~medvlp.benchmarks.metrics.stats` ``mean`` recipe (NaN-mean over images, then
    mean over classes) reproduces :func:`dice_score`: ``(N, C)`` with NaN where an image does not count
    (MONAI ``ignore_empty``), or ``(N,)`` for ``mgca_per_image``."""
    if definition == "mgca_per_image":
        p, t = (pred > 0).flatten(1).float(), (target > 0).flatten(1).float()
        denom = p.sum(1) + t.sum(1)
        return torch.where(denom == 0, torch.ones_like(denom), 2 * (p * t).sum(1) / denom.clamp_min(1e-8)).numpy()
    from monai.metrics import DiceMetric

    one_hot = lambda x: F.one_hot(x[:, 0].long(), num_classes).movedim(-1, 1).float()  # noqa: E731
    metric = DiceMetric(include_background=definition == "with_background", reduction="none", ignore_empty=True)
    return metric(one_hot(pred), one_hot(target)).cpu().numpy().astype(np.float32)


def dice_areas(pred: torch.Tensor, target: torch.Tensor, num_classes: int, background: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per image and class, ``2·|P∩T|`` and ``|P| + |T|`` (``(N, C)`` each): their dataset sums give
    :func:`~medvlp.benchmarks.metrics.dice.mmseg_dataset_dice`."""
    p, t = pred.flatten(1).long(), target.flatten(1).long()
    classes = range(0 if background else 1, num_classes)
    num = torch.stack([2 * ((p == c) & (t == c)).sum(1) for c in classes], 1)
    den = torch.stack([(p == c).sum(1) + (t == c).sum(1) for c in classes], 1)
    return num.numpy().astype(np.float64), den.numpy().astype(np.float64)


def voi(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Variation of information (split, merge) in nats between two instance labelings (0 = ignored in
    target): :func:`~medvlp.benchmarks.metrics.voi.variation_of_information` with base e."""
    return variation_of_information(pred, target, base=math.e)


def degenerate_voi_flags(value: float, single_instance: float, tolerance: float = 0.01) -> list[str]:
    """``degenerate`` when the mean VOI is within ``tolerance`` (relative) of the single-instance baseline
    (every volume one segment, i.e. a decoder that predicts (almost) no boundary)."""
    if abs(value - single_instance) <= tolerance * max(single_instance, 1e-12):
        return [f"degenerate: VOI {value:.3f} is within {tolerance:.0%} of the single-instance baseline "
                f"{single_instance:.3f} (the decoder predicts (almost) no boundary)"]
    return []


def instances_from_boundaries(boundary_prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Instance labels = connected components (6-connectivity) of voxels predicted as non-boundary."""
    from scipy import ndimage

    labels, _ = ndimage.label(boundary_prob < threshold)
    return labels


@register_benchmark("instance_voi")
class InstanceVOI(Segmentation):
    """EM neuron segmentation quality on instance-labelled data (CREMI/SNEMI): the segmentation protocol
    predicts cell boundaries; instances are connected components of non-boundary voxels; metric =
    variation of information ``VOI = split + merge`` (natural log; lower is better) against the ground
    truth ids (0 = unlabeled, ignored), mean over test volumes."""

    name = "instance_voi"
    primary_metric = "voi"

    def applicable(self, ctx: EvalContext) -> str | None:
        sample = ctx.datamodule.dataset("test", augment=False)[0]
        return super().applicable(ctx) if sample is not None and "instances" in sample else "dataset has no instance labels"

    def fit_stream(self, ctx: EvalContext, fraction: float, seed: int) -> dict[str, Any]:
        """Train as :meth:`fit_predict`, but return the test predictions as a stream: ``batches`` yields
        ``(rows, pred, prob)`` per test batch (computed when iterated), beside ``instances``, ``ids``,
        ``split_hash``, ``selection`` and ``how``."""
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        return {"batches": parts["predict_batches"](parts["test_x"]), "instances": parts["test_instances"],
                "ids": parts["test_ids"], "split_hash": trainer.info["split_hash"],
                "selection": selection_fields(result, trainer), "how": _how(trainer, result, len(parts["test_ids"]))}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        # streamed: each test batch's boundary probabilities become instances and VOI terms, then are dropped
        # (never the whole test split's probabilities, nor its instance volumes, in memory at once)
        out = self.fit_stream(ctx, fraction, seed)
        instances = out["instances"]
        splits, merges, trivial = [], [], []
        for idx, _, prob in out["batches"]:
            for row, i in enumerate(idx):
                inst = np.asarray(instances[i][0])
                pred = instances_from_boundaries(prob[row, 1].numpy())
                trivial.append(sum(voi(np.ones_like(inst), inst)))
                s, m = voi(pred, inst)
                splits.append(s)
                merges.append(m)
        d = f"variation of information (nats) vs ground-truth ids, mean over test volumes; {out['how']}"
        split, merge = np.asarray(splits, np.float64), np.asarray(merges, np.float64)
        samples = {"ids": np.asarray([str(i) for i in out["ids"]]), "voi": split + merge, "voi_split": split,
                   "voi_merge": merge}
        recipes = {k: mean_recipe(k, higher_is_better=False) for k in ("voi", "voi_split", "voi_merge")}
        flags = degenerate_voi_flags(float(np.mean(split + merge)), float(np.mean(trivial)))
        return ProtocolResult([MetricValue("voi", float(np.mean(splits) + np.mean(merges)), d),
                               MetricValue("voi_split", float(np.mean(splits)), d),
                               MetricValue("voi_merge", float(np.mean(merges)), d)], out["split_hash"],
                              out.get("selection", {}), samples=samples, recipes=recipes, flags=flags)
