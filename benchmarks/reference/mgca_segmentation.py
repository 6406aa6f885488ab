"""MGCA's segmentation protocol (``mgca/models/mgca/mgca_segmenter.py``, ``ssl_segmenter.py``,
``backbones/transformer_seg.py``, ``utils/segmentation_loss.py``, ``datasets/segmentation_dataset.py``)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.benchmarks.metrics.dice import DEFINITIONS, dice_score
from medvlp.benchmarks.kit.head_loop import HeadTrainer, fit, selection_fields
from medvlp.benchmarks.kit.protocol import EvalContext, MetricValue, Protocol, ProtocolResult
from medvlp.benchmarks.protocols.segmentation import dice_samples
from medvlp.benchmarks.kit.splits import select_fraction, split_hash, write_split_file
from medvlp.benchmarks.kit.views import (batch_ids, encoder_channels, renormalise, shift_scale_rotate, split_ids, subset_loader,
                                     to_channels)
from medvlp.registry import register_benchmark

log = logging.getLogger(__name__)
DEFAULTS: dict[str, Any] = {"lr": 2e-4, "weight_decay": 0.05, "batch_size": 8, "max_epochs": 50, "patience": 10,
                            "image_size": 224, "features": [512, 256, 128, 64], "balance": None,
                            "fraction_source": "mgca", "fraction_files": {}, "dice": "mgca_per_image",
                            "extra_dice": ["foreground", "mmseg_dataset_foreground"]}


def mgca_mixed_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 10.0, gamma: float = 2.0) -> torch.Tensor:
    """MGCA ``MixedLoss``: ``alpha · focal(logits, target; gamma) − log(soft Dice)``.

    Focal term: the numerically stable BCE-with-logits weighted by ``exp(gamma · logsigmoid(−x·(2t−1)))``
    (= ``(1 − p_t)^gamma``), mean over pixels; soft Dice: ``(2·Σ p·t + 1) / (Σ p + Σ t + 1)`` over the
    whole batch with ``p = sigmoid(logits)``.
    """
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    focal = (torch.exp(gamma * F.logsigmoid(-logits * (t * 2.0 - 1.0))) * bce).mean()
    p = torch.sigmoid(logits)
    soft_dice = (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    return alpha * focal - torch.log(soft_dice)


class SETRDecoder(nn.Module):
    """SETR-naive head of MGCA's ``SETRModel`` on frozen last-layer patch tokens.

    ``final_dense`` maps every token to ``(patch/16)²`` sub-tokens of width D (identity-sized for
    patch 16), reshaped to a ``(D, grid·patch/16)`` map; four stages of conv3×3–BN–ReLU–×2 bilinear
    upsampling (``align_corners=True``) with ``features`` channels; a conv3×3 to one logit channel.

    Deviation: for a patch size that is not a multiple of 16 one sub-token per token is used and the
    logits are interpolated to the image size.
    """

    def __init__(self, dim: int, patch: int, features: Sequence[int] = (512, 256, 128, 64), out_channels: int = 1) -> None:
        super().__init__()
        self.sub = patch // 16 if patch % 16 == 0 else 1
        self.dim = dim
        self.final_dense = nn.Linear(dim, dim * self.sub ** 2)
        stages, prev = [], dim
        for f in features:
            stages += [nn.Conv2d(prev, f, 3, padding=1), nn.BatchNorm2d(f), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)]
            prev = f
        self.decoder = nn.Sequential(*stages)
        self.final_out = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, tokens: torch.Tensor, grid: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        b, (h, w), s = tokens.shape[0], grid, self.sub
        x = self.final_dense(tokens).reshape(b, h, w, s, s, self.dim)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(b, self.dim, h * s, w * s)
        x = self.final_out(self.decoder(x))
        return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                          align_corners=False)


def last_tokens(model: Any, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Last-layer patch tokens ``(B, N, D)`` (after the final norm, as MGCA's ViT forward) and their grid;
    hierarchical encoders give their last stage map flattened."""
    feats = model.image_features(image)
    if "tokens" in feats and "grid" in feats:
        return feats["tokens"], tuple(feats["grid"])
    last = model.image_feature_maps(image)[-1]
    return last.flatten(2).transpose(1, 2), tuple(last.shape[2:])


@register_benchmark("mgca_segmentation")
class MGCASegmentation(Protocol):
    """MGCA/ASG 2D segmentation (SIIM pneumothorax, RSNA pneumonia boxes) with a frozen ViT.

    * model: the encoder frozen (no gradient; eval mode), :class:`SETRDecoder` (512/256/128/64) on its
      last-layer patch tokens, one sigmoid output channel;
    * loss: :func:`mgca_mixed_loss` (focal α=10, γ=2 − log soft Dice);
    * optimizer: AdamW(lr 2e-4, betas (0.9, 0.999), weight decay 0.05), no schedule; batch 8;
      ≤50 epochs; early stop on validation loss (patience 10); test at the best-val-loss weights;
    * images: the datamodule's 224 resize-and-pad (set ``image_size: 224``), ``(v−0.5)/0.5``, grey
      replicated to the encoder's channels; training only: ``ShiftScaleRotate(shift 0, scale ±0.1,
      rotate ±10°, p 0.5, constant border)`` on image and mask;
    * training set: ``balance: 1`` keeps every positive image and as many negatives drawn with
      ``RandomState(42).choice`` (MGCA's SIIM loader); label fraction ``fraction_source: mgca`` =
      the next ``RandomState(42).choice(ids, int(N·fraction))`` of the same stream (MGCA's SIIM and
      RSNA loaders), materialised as an id file;
    * metric: ``dice: mgca_per_image`` (MGCA ``get_dice``: prediction ``sigmoid > 0.5``; empty GT with
      empty prediction = 1), plus ``extra_dice`` definitions on the same predictions.

    Deviations: MGCA draws from numpy's global stream seeded by ``seed_everything(42)`` over its own CSV
    row order; medvlp uses a fresh ``RandomState(42)`` over the datamodule's record order, so the
    subsets are drawn the same way but are not the same files. MGCA averages ``get_dice`` per batch
    then over batches; medvlp averages over all test images. MGCA resizes the (square) SIIM image
    without padding; medvlp pads non-square images.
    """

    parameters = {
        "lr": "AdamW learning rate of the decoder (2e-4)", "weight_decay": "AdamW weight decay (0.05)",
        "batch_size": "batch size (8)", "max_epochs": "epoch budget (50)",
        "patience": "early-stopping patience in epochs on validation loss (10)",
        "image_size": "image side the datamodule must deliver (224)",
        "features": "decoder stage widths ([512, 256, 128, 64])",
        "balance": "negatives per positive training image, MGCA's SIIM: 1 (none = no balancing)",
        "fraction_source": "mgca | hash | file (mgca)", "fraction_files": "{label percent: id file} ({})",
        "dice": "reported Dice definition (mgca_per_image)", "extra_dice": "further Dice definitions reported",
    }

    name = "mgca_segmentation"
    variant = "mgca_segmentation"
    selection = "MGCA selects on validation loss"
    defaults = DEFAULTS
    uses_fractions = True
    needs_mask = True

    def applicable(self, ctx: EvalContext) -> str | None:
        if ctx.datamodule.spatial_dims != 2:
            return "MGCA's segmentation protocol is 2D"
        return super().applicable(ctx)

    def train_rows(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[list[int], str, str]:
        """Training rows after MGCA's 1:negatives balancing and label-fraction draw; hash; description."""
        p = self.params(ctx)
        dm = ctx.datamodule
        ids = split_ids(dm, "train")
        rows = list(range(len(ids)))
        rng = np.random.RandomState(42)
        how = []
        if p["balance"] is not None:
            positive = self._positive(dm, rows)
            pos = [r for r in rows if positive[r]]
            neg = [r for r in rows if not positive[r]]
            n_neg = min(len(neg), int(round(float(p["balance"]) * len(pos))))
            if n_neg < int(round(float(p["balance"]) * len(pos))):
                log.warning("%s: only %d negative training images for %d positives; keeping all (MGCA's draw "
                            "would fail)", self.name, len(neg), len(pos))
            chosen = set(rng.choice(len(neg), size=n_neg, replace=False).tolist()) if n_neg else set()
            rows = pos + [r for i, r in enumerate(neg) if i in chosen]
            how.append(f"balanced {len(pos)} positive + {n_neg} negative images")
        if p["fraction_source"] == "mgca":
            if fraction < 1:
                pick = rng.choice(len(rows), size=max(1, int(len(rows) * fraction)), replace=False)
                rows = [rows[i] for i in sorted(pick.tolist())]
            how.append(f"MGCA RandomState(42).choice fraction {fraction:g}: {len(rows)} images")
            chosen_ids = [ids[r] for r in rows]
            h = split_hash(chosen_ids)
            if ctx.work_dir:
                folder = Path(ctx.work_dir) / "splits" / f"{type(dm).__name__}_{dm.dataset_version}".replace("/", "_").replace(":", "_")
                write_split_file(folder / f"mgca_seg_{fraction:g}_s{seed}.txt", chosen_ids)
        else:
            sub_ids = [ids[r] for r in rows]
            sub_rows, h, desc = select_fraction(sub_ids, fraction, seed, p["fraction_source"], p["fraction_files"])
            rows = [rows[r] for r in sub_rows]
            how.append(desc)
        return rows, h, "; ".join(how)

    @staticmethod
    def _positive(dm: Any, rows: list[int]) -> list[bool]:
        ds = dm.dataset("train", augment=False)
        records = getattr(ds, "records", None)
        if records is not None and all("labels" in r for r in records):
            return [bool(np.nansum(r["labels"]) > 0) for r in records]
        out = []
        for r in rows:
            sample = ds[r]
            out.append(bool(sample is not None and int(sample["mask"].sum()) > 0))
        return out

    def build(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[HeadTrainer, dict[str, Any]]:
        """The trainer of one (fraction, seed) run and the pieces the test step needs."""
        p = self.params(ctx)
        dm, model = ctx.datamodule, ctx.model.to(ctx.device).eval()
        torch.manual_seed(seed)
        rows, subset_hash, how = self.train_rows(ctx, fraction, seed)
        gen = torch.Generator().manual_seed(seed)
        size = int(p["image_size"])
        black = (0.0 - 0.5) / 0.5 if getattr(dm, "intensity_norm", None) else 0.0  # zero intensity, renormalised

        def view(batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
            x, mask = batch["image"], batch["mask"]
            if tuple(x.shape[-2:]) != (size, size):
                raise ValueError(f"{self.name}: images are {tuple(x.shape[-2:])}; set the datamodule's image_size "
                                 f"to {size} (or the protocol's image_size)")
            x, _ = renormalise(x, dm)
            if train:
                x, mask = shift_scale_rotate(x, mask, gen, fill=black)
            return to_channels(x, encoder_channels(model)), (mask > 0).float()

        probe = next(b for b in subset_loader(dm, "train", rows[:2], 2, False, seed) if b is not None)
        with torch.no_grad():
            tokens, grid = last_tokens(model, view(probe, False)[0].to(ctx.device))
        patch = size // grid[0]
        decoder = SETRDecoder(tokens.shape[-1], patch, tuple(p["features"])).to(ctx.device)
        opt = torch.optim.AdamW(decoder.parameters(), lr=float(p["lr"]), betas=(0.9, 0.999),
                                weight_decay=float(p["weight_decay"]))

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                tok, g = last_tokens(model, x.to(ctx.device))
            return decoder(tok, g, x.shape[-2:])[:, 0]

        def step(batch: dict[str, Any]) -> torch.Tensor:
            x, y = view(batch, True)
            return mgca_mixed_loss(logits_of(x), y[:, 0].to(ctx.device))

        def validate() -> dict[str, float]:
            total, n = 0.0, 0
            for batch in subset_loader(dm, "val", None, int(p["batch_size"]), False, seed):
                if batch is None:
                    continue
                x, y = view(batch, False)
                total += float(mgca_mixed_loss(logits_of(x), y[:, 0].to(ctx.device))) * len(x)
                n += len(x)
            if n == 0:
                raise ValueError(f"{self.name}: the validation split yielded no samples")
            return {"val_loss": total / n}

        trainer = HeadTrainer(
            modules=[decoder], optimizer=opt,
            train_batches=lambda epoch: (b for b in subset_loader(dm, "train", rows, int(p["batch_size"]), True,
                                                                  seed * 1000 + epoch) if b is not None),
            train_step=step, validate=validate, monitor="val_loss", mode="min", max_epochs=int(p["max_epochs"]),
            patience=int(p["patience"]), set_train_mode=lambda: model.eval(), info={"rows": rows, "how": how})
        return trainer, {"decoder": decoder, "view": view, "logits_of": logits_of, "split_hash": subset_hash}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        p = self.params(ctx)
        preds, targets, ids = [], [], []
        with torch.no_grad():
            for batch in subset_loader(ctx.datamodule, "test", None, int(p["batch_size"]), False, seed):
                if batch is None:
                    continue
                x, y = parts["view"](batch, False)
                preds.append((torch.sigmoid(parts["logits_of"](x)) > 0.5).long().cpu()[:, None])
                targets.append(y.long())
                ids.extend(batch_ids(batch, len(ids)))
        pred, target = torch.cat(preds), torch.cat(targets)
        how = (f"MGCA segmentation protocol: frozen encoder, SETR decoder {list(p['features'])}, focal(α=10)+Dice loss, "
               f"AdamW lr {p['lr']:g} wd {p['weight_decay']:g}, batch {p['batch_size']}, {result.epochs_run}/"
               f"{p['max_epochs']} epochs (early stop on val loss, patience {p['patience']}), best-val epoch "
               f"{result.best_epoch}; ShiftScaleRotate on train; {trainer.info['how']}; N_test={len(pred)}")
        values = [MetricValue(f"dice_{p['dice']}" if p["dice"] != "foreground" else "dice",
                              dice_score(pred, target, 2, p["dice"]), f"{DEFINITIONS[p['dice']]}; {how}")]
        for d in [d for d in p["extra_dice"] if d != p["dice"]]:
            try:
                values.append(MetricValue(f"dice_{d}" if d != "foreground" else "dice", dice_score(pred, target, 2, d),
                                          f"{DEFINITIONS[d]}; {how}"))
            except ValueError as exc:  # e.g. no positive test image: that definition is undefined
                log.warning("%s: extra Dice %s not reported: %s", self.name, d, exc)
        comp = {"protocol_variant": self.variant, "fraction_source": p["fraction_source"],
                **selection_fields(result, trainer)}
        definition = {f"dice_{d}" if d != "foreground" else "dice": d for d in [p["dice"], *p["extra_dice"]]}
        samples, recipes = dice_samples(pred, target, 2, {v.metric: definition[v.metric] for v in values}, ids)
        return ProtocolResult(values, parts["split_hash"], comp, samples=samples, recipes=recipes)
