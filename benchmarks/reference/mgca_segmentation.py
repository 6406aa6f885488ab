"""MGCA's segmentation protocol (``HKU-MedAI/MGCA`` @ 680fe4a: ``mgca/models/mgca/mgca_segmenter.py``,
``ssl_segmenter.py``, ``backbones/transformer_seg.py``, ``utils/segmentation_loss.py``,
``datasets/segmentation_dataset.py``, ``run_seg_finetune.sh``)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.benchmarks.kit.fidelity import Element, documented, fidelity
from medvlp.benchmarks.kit.head_loop import HeadTrainer, fit
from medvlp.benchmarks.kit.head_parts import epoch_batches, probe_batch, row_comparability, splits_folder
from medvlp.benchmarks.kit.protocol import EvalContext, MetricValue, Protocol, ProtocolResult
from medvlp.benchmarks.kit.splits import select_fraction, split_hash, write_split_file
from medvlp.benchmarks.kit.views import (batch_ids, encoder_channels, renormalise, shift_scale_rotate, split_ids, subset_loader,
                                         to_channels)
from medvlp.benchmarks.metrics.dice import DEFINITIONS, dice_score
from medvlp.benchmarks.protocols.segmentation import dice_samples
from medvlp.registry import register_benchmark

log = logging.getLogger(__name__)
MGCA = "HKU-MedAI/MGCA @ 680fe4a"
#: run_seg_finetune.sh / README: lr 5e-4 everywhere; batch 16 on RSNA (8, the argparse default, on SIIM)
RUN_BATCH = {"rsna_pneumonia": 16}
DEFAULTS: dict[str, Any] = {"lr": 5e-4, "weight_decay": 0.05, "batch_size": None, "max_epochs": 50, "patience": 10,
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


def _elements() -> list[Element]:
    seg, ssl, ds = "mgca/models/mgca/mgca_segmenter.py", "mgca/models/ssl_segmenter.py", "mgca/datasets/segmentation_dataset.py"
    return [
        Element("encoder", "frozen ViT (SETR)", f"{MGCA} {seg} L61-73", "frozen, eval mode"),
        Element("decoder", "SETR naive head 512/256/128/64, 1 output", f"{seg} L61-70", "SETRDecoder, the same",
                param="features", value=[512, 256, 128, 64]),
        Element("loss", "MixedLoss(alpha=10): 10·focal − log soft Dice", f"{ssl} L26", "mgca_mixed_loss"),
        Element("optimizer", "AdamW(all decoder parameters), betas (0.9, 0.999), wd 0.05", f"{ssl} L124-129", "the same",
                param="weight_decay", value=0.05),
        Element("learning rate", "5e-4 (run_seg_finetune.sh, README; argparse default 2e-4 unused by the launchers)",
                "run_seg_finetune.sh L1-6; README L80-83", "5e-4", param="lr", value=5e-4),
        Element("batch", "RSNA 16, SIIM 8", "run_seg_finetune.sh L1-6", "16 on RSNA, 8 otherwise"),
        Element("epochs / selection", "max_epochs 50; EarlyStopping + ModelCheckpoint on val_loss (patience 10); test best",
                f"{seg} L44, L105-111, L126", "the same", param="patience", value=10),
        Element("loaders", "train shuffle + drop_last=True; val drop_last=True", "mgca/datasets/data_module.py L26-51",
                "the same"),
        Element("val loss", "epoch mean of per-batch losses", f"{ssl} validation_step (Lightning on_epoch mean)",
                "mean of the batch losses over the full val batches"),
        Element("mask resampling", "cv2.resize INTER_AREA to 224 (soft mask for the loss; Dice thresholds truth at 0.5)",
                f"mgca/datasets/utils.py L28-74; {ssl} L107", "the datamodule's mask, binarised",
                "medvlp's datamodules deliver masks resampled to a binary label map, so the loss sees hard edges "
                "where MGCA's sees fractional ones (the Dice is the same: truth > 0.5)"),
        Element("augmentation", "ShiftScaleRotate(shift 0, scale 0.1, rotate 10, p 0.5, constant border)", f"{ds} L136-159",
                "shift_scale_rotate, the same"),
        Element("normalisation", "Normalize(0.5, 0.5)", f"{ds} L136-159", "(v − 0.5)/0.5"),
        Element("balancing (SIIM)", "all positives + as many negatives (np.random.choice, global RNG seeded 42)",
                f"{ds} L42-53", "balance: 1 with RandomState(42)", "MGCA's global stream vs a fresh RandomState(42): "
                "drawn the same way over medvlp's record order, not the same files"),
        Element("label fractions", "np.random.choice(ids, int(N·pct), replace=False)", f"{ds} L56-61, L184-188",
                "the next draw of the same RandomState(42)", param="fraction_source", value="mgca"),
        Element("metric", "get_dice per image (empty GT & empty prediction = 1), mean of per-batch means",
                f"{ssl} L81-121", "dice_mgca_per_image, mean over all test images",
                "MGCA averages batch means (equal to the image mean only when every batch is full)"),
    ]


@register_benchmark("mgca_segmentation")
@documented(_elements)
class MGCASegmentation(Protocol):
    """MGCA/ASG 2D segmentation (SIIM pneumothorax, RSNA pneumonia boxes) with a frozen ViT: a
    :class:`SETRDecoder` on the last-layer patch tokens, one sigmoid output channel, trained as MGCA's
    launchers run it (``run_seg_finetune.sh``: lr 5e-4; batch 16 on RSNA, 8 on SIIM); images are the
    datamodule's 224 resize-and-pad (``image_size: 224``). ``dice: mgca_per_image`` is the reported
    number, ``extra_dice`` further definitions on the same predictions.
    """

    parameters = {
        "lr": "AdamW learning rate of the decoder (5e-4)", "weight_decay": "AdamW weight decay (0.05)",
        "batch_size": "batch size (16 on RSNA, 8 otherwise)", "max_epochs": "epoch budget (50)",
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
            folder = splits_folder(ctx)
            if folder is not None:
                write_split_file(folder / f"mgca_seg_{fraction:g}_s{seed}.txt", chosen_ids)
        else:
            sub_ids = [ids[r] for r in rows]
            sub_rows, h, desc = select_fraction(sub_ids, fraction, ctx.subset_seed_for(seed), p["fraction_source"],
                                                p["fraction_files"])
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

    def batch_size(self, ctx: EvalContext) -> tuple[int, list[str]]:
        """The launcher's batch for this datamodule, and a deviation when the suite set another."""
        official = RUN_BATCH.get(getattr(ctx.datamodule, "name", ""), 8)
        given = self.params(ctx)["batch_size"]
        if given is None or int(given) == official:
            return official, []
        return int(given), [f"batch_size={given} (MGCA's launcher: {official})"]

    def build(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[HeadTrainer, dict[str, Any]]:
        """The trainer of one (fraction, seed) run and the pieces the test step needs."""
        p = self.params(ctx)
        dm, model = ctx.datamodule, ctx.model.to(ctx.device).eval()
        torch.manual_seed(seed)
        rows, subset_hash, how = self.train_rows(ctx, fraction, seed)
        bs, extra = self.batch_size(ctx)
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

        probe = probe_batch(dm, rows, seed)
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

        n_val = len(dm.dataset("val", augment=False))

        def validate() -> dict[str, float]:
            losses = []
            for batch in subset_loader(dm, "val", None, bs, False, seed, drop_last=n_val >= bs):
                if batch is not None:
                    x, y = view(batch, False)
                    losses.append(float(mgca_mixed_loss(logits_of(x), y[:, 0].to(ctx.device))))
            if not losses:
                raise ValueError(f"{self.name}: the validation split yielded no sample")
            return {"val_loss": sum(losses) / len(losses)}

        if len(rows) < bs:
            extra.append("train batches keep the tail: the subset is smaller than one batch")
        if n_val < bs:
            extra.append("val keeps the tail: the split is smaller than one batch")
        trainer = HeadTrainer(
            modules=[decoder], optimizer=opt, train_batches=epoch_batches(dm, rows, bs, seed, drop_last=len(rows) >= bs),
            train_step=step, validate=validate, monitor="val_loss", mode="min", max_epochs=int(p["max_epochs"]),
            patience=int(p["patience"]), set_train_mode=lambda: model.eval(),
            info={"rows": rows, "how": how, "batch_size": bs, "extra": extra})
        return trainer, {"decoder": decoder, "view": view, "logits_of": logits_of, "split_hash": subset_hash}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        p, bs = self.params(ctx), trainer.info["batch_size"]
        preds, targets, ids = [], [], []
        with torch.no_grad():
            for batch in subset_loader(ctx.datamodule, "test", None, bs, False, seed):
                if batch is None:
                    continue
                x, y = parts["view"](batch, False)
                preds.append((torch.sigmoid(parts["logits_of"](x)) > 0.5).long().cpu()[:, None])
                targets.append(y.long())
                ids.extend(batch_ids(batch, len(ids)))
        pred, target = torch.cat(preds), torch.cat(targets)
        how = (f"MGCA segmentation protocol: frozen encoder, SETR decoder {list(p['features'])}, focal(α=10)+Dice loss, "
               f"AdamW lr {p['lr']:g} wd {p['weight_decay']:g}, batch {bs} (train/val drop_last), {result.epochs_run}/"
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
        comp = row_comparability(self.variant, p["fraction_source"], result, trainer,
                                 fidelity(self.fidelity_elements, ctx.params, trainer.info["extra"]))
        definition = {f"dice_{d}" if d != "foreground" else "dice": d for d in [p["dice"], *p["extra_dice"]]}
        samples, recipes = dice_samples(pred, target, 2, {v.metric: definition[v.metric] for v in values}, ids)
        return ProtocolResult(values, parts["split_hash"], comp, samples=samples, recipes=recipes)
