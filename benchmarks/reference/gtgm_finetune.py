"""GTGM's 3D segmentation fine-tuning protocols: the original GTGM launchers (``ydchen0806/GTGM`` @ e92b287,
``finetune/run/run_task*.sh`` → ``finetune/task1.py``) and GTGM+'s ``finetune/train.py`` (@ c67004a), named."""
from __future__ import annotations

import copy
import random
from typing import Any, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader, Dataset

from medvlp.benchmarks.kit.fidelity import Element, documented, fidelity
from medvlp.benchmarks.kit.head_loop import HeadTrainer, fit
from medvlp.benchmarks.kit.head_parts import iteration_blocks, row_comparability
from medvlp.benchmarks.kit.protocol import EvalContext, MetricValue, Protocol, ProtocolResult, mean_recipe
from medvlp.benchmarks.kit.splits import split_hash
from medvlp.benchmarks.metrics.dice import DEFINITIONS, dice_score, monai_mean_dice
from medvlp.benchmarks.protocols.segmentation import ProgressiveDecoder, per_image_dice
from medvlp.registry import register_benchmark

GTGM = "ydchen0806/GTGM @ e92b287"
GTGM_PLUS = "ydchen0806/GTGM @ c67004a (GTGM+)"
#: the two named recipes: GTGM's launchers (task1.py) and GTGM+'s train.py
RECIPES: dict[str, dict[str, Any]] = {
    "task1": {"lr": 1e-5, "weight_decay": 1e-5, "batch_size": 2, "max_iterations": 40000, "eval_interval": 1000},
    "gtgm_plus": {"lr": 1e-4, "weight_decay": 1e-5, "batch_size": 8, "max_iterations": 25000, "eval_interval": 500},
}
DEFAULTS: dict[str, Any] = {"recipe": "task1", "lr": None, "weight_decay": None, "batch_size": None,
                            "max_iterations": None, "eval_interval": None, "roi_size": None, "width": 64, "max_stages": 2}


class _Rows(Dataset):
    """Samples addressed as ``(split, index)`` of a datamodule's non-augmented datasets."""

    def __init__(self, dm: Any, refs: Sequence[tuple[str, int]]) -> None:
        self.dm, self.refs = dm, list(refs)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> Any:
        split, idx = self.refs[i]
        return self.dm.dataset(split, augment=False)[idx]


def gtgm_task1_split(ordered_ids: Sequence[str], fraction: float, shuffle_seed: int = 42) -> tuple[list[int], list[int]]:
    """GTGM ``finetune/task1.py`` L179-185: ``random.seed(42)``; ``random.shuffle(datalist)``; train =
    the first ``int(N · train_rate)`` of the shuffled list, val = the shuffled list from ``int(N · 0.8)`` on.
    task1.py has no label-ratio argument: medvlp's fraction ``f`` sets ``train_rate = 0.8 · f`` (at
    ``f = 1`` the launchers' 80/20 split). Returns positions in ``ordered_ids``."""
    order = list(range(len(ordered_ids)))
    random.Random(shuffle_seed).shuffle(order)
    n = len(order)
    return order[: int(n * 0.8 * fraction)], order[int(n * 0.8):]


def gtgm_split(ordered_ids: Sequence[str], ratio: float) -> tuple[list[int], list[int]]:
    """GTGM+ ``finetune/train.py`` (c67004a, ``main()`` "Prepare data splits"): train = the first
    ``int(0.9 · N · ratio)`` entries (no shuffle), val = the entries from ``int(0.9 · N)`` on (the last
    10 %). Returns positions in ``ordered_ids``."""
    n = len(ordered_ids)
    return list(range(int(n * 0.9 * ratio))), list(range(int(n * 0.9), n))


def random_crop_flip(x: torch.Tensor, y: torch.Tensor, roi: Sequence[int], generator: torch.Generator,
                     flip_p: float = 0.1, rot_p: float = 0.1, shift: float = 0.1, shift_p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """GTGM's training augmentation on ``(B, C, D, H, W)`` batches: a random ``roi`` crop
    (``RandSpatialCropd``), flips along each axis with p 0.1, a random 90° rotation in the last two axes
    with p 0.1 (``RandRotate90d``, k ∈ 1..3) and an intensity offset U(−0.1, 0.1) with p 0.5
    (``RandShiftIntensityd``; offsets in the datamodule's normalised units)."""
    xs, ys = [], []
    for xi, yi in zip(x, y):
        sl = []
        for s, r in zip(xi.shape[1:], roi):
            start = int(torch.randint(max(s - r, 0) + 1, (1,), generator=generator))
            sl.append(slice(start, start + min(r, s)))
        xi, yi = xi[(slice(None), *sl)], yi[(slice(None), *sl)]
        for ax in (1, 2, 3):
            if float(torch.rand(1, generator=generator)) < flip_p:
                xi, yi = xi.flip(ax), yi.flip(ax)
        if float(torch.rand(1, generator=generator)) < rot_p and xi.shape[2] == xi.shape[3]:
            k = int(torch.randint(1, 4, (1,), generator=generator))
            xi, yi = xi.rot90(k, (2, 3)), yi.rot90(k, (2, 3))
        if float(torch.rand(1, generator=generator)) < shift_p:
            xi = xi + float(torch.empty(1).uniform_(-shift, shift, generator=generator))
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def _elements() -> list[Element]:
    t1 = "finetune/task1.py"
    return [
        Element("recipe", "run_task{1..10}.sh all run task1.py (batch 2, lr 1e-5); train.py is run by no launcher",
                f"{GTGM} finetune/run/run_task*.sh L1-5", "recipe: task1 (default); gtgm_plus = GTGM+ train.py @ c67004a "
                "(then every task1 setting below is replaced by train.py's)", param="recipe", value="task1"),
        Element("split", "random.seed(42) shuffle of dataset.json training, first int(0.8·N) train, last 20 % val",
                f"{t1} L179-185", "the same over the volumes left after medvlp's test hold-out",
                "the suite holds out a test split first (GTGM has none); fractions map to train_rate = 0.8·f "
                "(task1.py has no ratio argument)"),
        Element("optimizer", "AdamW(all parameters) lr 1e-5, wd 1e-5, no schedule", f"{t1} L46-64, L231", "the same",
                param="lr", value=1e-5),
        Element("batch", "2", f"{t1} L46-64 (run_task*.sh --batch_size=2)", "2", param="batch_size", value=2),
        Element("iterations", "max_iterations 40000", f"{t1} L46-64", "40000", param="max_iterations", value=40000),
        Element("validation", "every 1000 iterations, sliding_window_inference(patch, 4)", f"{t1} L233-248, L325-326",
                "the same", param="eval_interval", value=1000),
        Element("loss", "DiceCELoss(to_onehot_y, softmax)", f"{t1} L229", "the same"),
        Element("metric", "DiceMetric(include_background=True, reduction='mean'): per image mean over present "
                "classes, then over images; best validation value kept", f"{t1} L297-300, L318",
                "monai_mean_dice at each validation; dice_with_background_bestval = the best"),
        Element("model", "ResUNet (3D ResNet-50 encoder + residual U-Net decoder)", f"{t1} L223-226",
                "the method's encoder + medvlp's ProgressiveDecoder", "medvlp's methods have no 3D ResNet; the "
                "row's backbone says which encoder ran"),
        Element("augmentation", "RandSpatialCropd(patch), RandFlipd ×3 p 0.1, RandRotate90d p 0.1, RandShiftIntensityd 0.1 p 0.5",
                f"{t1} L88-151", "random_crop_flip, the same (roi_size = the nnU-Net patch when set)"),
        Element("preprocessing", "Orientation RAS, Spacing from nnUNetPlans.json, ScaleIntensityRanged(−175, 250) for every task",
                f"{t1} L70-151", "the datamodule's", "set by the datamodule (spacing, intensity window), not by the "
                "nnU-Net plans file"),
        Element("seed", "no torch/numpy seeding (only the split shuffle)", f"{t1}", "the suite's seeds"),
    ]


@register_benchmark("gtgm_finetune")
@documented(_elements)
class GTGMFinetune(Protocol):
    """GTGM 3D segmentation fine-tuning (MSD tasks, BTCV), whole model trained, best validation Dice.

    ``recipe: task1`` (default) is what GTGM's launchers run (:func:`gtgm_task1_split`, AdamW 1e-5, batch
    2, 40k iterations, validation every 1k); ``recipe: gtgm_plus`` is GTGM+'s ``finetune/train.py`` at
    c67004a (first ``int(0.9·N·ratio)`` volumes train, last 10 % validate (:func:`gtgm_split`), AdamW
    1e-4, batch 8, 25k iterations, validation every 500), the recipe behind the GTGM+ README's tables.
    The reported ``dice_with_background_bestval`` is MONAI ``DiceMetric(include_background=True,
    reduction="mean")`` (:func:`~medvlp.benchmarks.metrics.dice.monai_mean_dice`) at the best validation;
    at those weights the datamodule's held-out test split is scored too.

    A row's ``split_convention`` / ``fraction_source`` say what ran: ``<recipe>_after_test_holdout`` when
    the datamodule held out a test split first (``<recipe>_dataset_json`` otherwise) and
    ``gtgm_task1_train_rate`` / ``gtgm_plus_head``. ``subset_seeds`` do not apply (GTGM's split is fixed)
    and are rejected when they differ from the training seed.
    """

    name = "gtgm_finetune"
    variant = "gtgm_finetune"
    defaults = DEFAULTS
    uses_fractions = True
    needs_mask = True
    parameters = {
        "recipe": "task1 (GTGM's launchers) | gtgm_plus (GTGM+ train.py) (task1)",
        "lr": "AdamW learning rate, all parameters (task1 1e-5, gtgm_plus 1e-4)",
        "weight_decay": "AdamW weight decay (1e-5)", "batch_size": "batch size (task1 2, gtgm_plus 8)",
        "max_iterations": "training iterations (task1 40000, gtgm_plus 25000)",
        "eval_interval": "iterations between validations (task1 1000, gtgm_plus 500)",
        "roi_size": "training crop and sliding-window ROI (the datamodule's volume size)",
        "width": "decoder width (64)", "max_stages": "decoder x2 stages (2)",
    }

    def applicable(self, ctx: EvalContext) -> str | None:
        if ctx.datamodule.spatial_dims != 3:
            return "GTGM fine-tuning is 3D"
        return super().applicable(ctx)

    @staticmethod
    def ordered_refs(dm: Any) -> list[tuple[str, str, int]]:
        """``(id, split, index)`` of the train and val volumes in the datamodule's record order
        (``dataset.json`` order for MSD)."""
        pos = {}
        for split in ("train", "val"):
            for i, r in enumerate(dm.records(split)):
                pos[r["id"]] = (split, i)
        order = [r["id"] for r in getattr(dm, "_records", None) or []] or sorted(pos)
        return [(i, *pos[i]) for i in order if i in pos]

    def settings(self, ctx: EvalContext) -> tuple[dict[str, Any], list[str]]:
        """Params with the recipe's values filled in, and deviations from the recipe."""
        p = self.params(ctx)
        if p["recipe"] not in RECIPES:
            raise ValueError(f"{self.name}: recipe must be one of {sorted(RECIPES)}, got {p['recipe']!r}")
        extra = []
        for key, value in RECIPES[p["recipe"]].items():
            if p[key] is None:
                p[key] = value
            elif float(p[key]) != float(value):
                extra.append(f"{key}={p[key]!r} ({p['recipe']}: {value!r})")
        return p, extra

    def build(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[HeadTrainer, dict[str, Any]]:
        """The trainer of one (fraction, seed) run and the pieces the test step needs."""
        if ctx.subset_seed is not None and int(ctx.subset_seed) != int(seed):
            raise ValueError(f"{self.name}: GTGM's split is fixed (no subset seed); remove subset_seeds from the suite")
        p, extra = self.settings(ctx)
        dm = ctx.datamodule
        torch.manual_seed(seed)
        refs = self.ordered_refs(dm)
        split = gtgm_task1_split if p["recipe"] == "task1" else gtgm_split
        train_pos, val_pos = split([r[0] for r in refs], fraction)
        if not train_pos or not val_pos:
            raise ValueError(f"{self.name}: GTGM's {p['recipe']} split of {len(refs)} volumes at fraction {fraction:g} "
                             f"leaves {len(train_pos)} train / {len(val_pos)} val volumes")
        train_refs = [refs[i][1:] for i in train_pos]
        val_refs = [refs[i][1:] for i in val_pos]
        model = copy.deepcopy(ctx.model).to(ctx.device)
        first = _Rows(dm, train_refs[:1])[0]
        size = tuple(first["image"].shape[1:])
        roi = tuple(p["roi_size"] or size)
        num_classes = max(len(getattr(dm, "segmentation_classes", lambda: [])()), int(first["mask"].max()) + 1, 2)
        with torch.no_grad():
            in_ch = sum(m.shape[1] for m in model.eval().image_feature_maps(first["image"][None].to(ctx.device)))
        decoder = ProgressiveDecoder(3, in_ch, num_classes, int(p["width"]), int(p["max_stages"])).to(ctx.device)
        backbone = model.image_backbone()
        opt = torch.optim.AdamW(list(backbone.parameters()) + list(decoder.parameters()), lr=float(p["lr"]),
                                weight_decay=float(p["weight_decay"]))
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        gen = torch.Generator().manual_seed(seed)
        bs, interval = int(p["batch_size"]), int(p["eval_interval"])

        def forward(x: torch.Tensor) -> torch.Tensor:
            return decoder(model.image_feature_maps(x), tuple(x.shape[2:]))

        def loader_for(n: int) -> DataLoader:
            return DataLoader(_Rows(dm, train_refs), batch_size=min(bs, len(train_refs)), shuffle=True,
                              collate_fn=dm.collate_fn, generator=torch.Generator().manual_seed(seed * 1000 + n))

        def step(batch: dict[str, Any]) -> torch.Tensor:
            x, y = random_crop_flip(batch["image"], batch["mask"], roi, gen)
            return loss_fn(forward(x.to(ctx.device)), y.to(ctx.device))

        def predict(refs_: Sequence[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
            preds, targets, ids = [], [], []
            loader = DataLoader(_Rows(dm, refs_), batch_size=1, shuffle=False, collate_fn=dm.collate_fn)
            for batch in loader:
                if batch is None:
                    continue
                logits = sliding_window_inference(batch["image"].to(ctx.device), roi, 4, forward)
                preds.append(logits.argmax(1, keepdim=True).cpu())
                targets.append(batch["mask"].long())
                ids.append(str((batch.get("meta") or [{}])[0].get("id", len(ids))))
            return torch.cat(preds), torch.cat(targets), ids

        def validate() -> dict[str, float]:
            pred, target, _ = predict(val_refs)
            return {"val_dice_bg": monai_mean_dice(pred, target, num_classes)}

        held_out = len(dm.dataset("test", augment=False)) > 0
        trainer = HeadTrainer(
            modules=[backbone, decoder], optimizer=opt, train_batches=iteration_blocks(loader_for, interval),
            train_step=step, validate=validate, monitor="val_dice_bg", mode="max",
            max_epochs=max(1, int(p["max_iterations"]) // interval), patience=None,
            info={"train": len(train_refs), "val": len(val_refs), "num_classes": num_classes, "params": p,
                  "extra": extra, "held_out": held_out, "split_hash": split_hash([refs[i][0] for i in train_pos])})
        return trainer, {"predict": predict, "decoder": decoder, "model": model}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        p = trainer.info["params"]
        test_refs = [("test", i) for i in range(len(ctx.datamodule.dataset("test", augment=False)))]
        with torch.no_grad():
            pred, target, test_ids = parts["predict"](test_refs) if test_refs else (None, None, [])
        k = trainer.info["num_classes"]
        how = (f"GTGM fine-tune ({p['recipe']}): encoder + decoder, AdamW lr {p['lr']:g} wd {p['weight_decay']:g}, "
               f"DiceCE, batch {p['batch_size']}, {result.steps} iterations, validation every {p['eval_interval']} "
               f"(best at validation {result.best_epoch + 1}); {p['recipe']} split {trainer.info['train']} train / "
               f"{trainer.info['val']} val volumes (fraction {fraction:g})")
        values = [MetricValue("dice_with_background_bestval", result.best_value,
                              "best validation MONAI DiceMetric(include_background=True, reduction='mean'): per volume the "
                              f"mean over classes present in its ground truth, then over volumes (GTGM's number); {how}")]
        samples: dict[str, np.ndarray] = {"ids": np.asarray(test_ids)}
        recipes: dict[str, dict[str, Any]] = {}
        if pred is not None:
            # per test volume, so the report can bootstrap the test metrics (the best-validation number is a
            # validation statistic: no per-sample test outputs)
            values.append(MetricValue("dice_with_background", dice_score(pred, target, k, "with_background"),
                                      f"test split (N={len(pred)}), {DEFINITIONS['with_background']}; {how}"))
            samples["dice_with_background"] = per_image_dice(pred, target, k, "with_background")
            recipes["dice_with_background"] = mean_recipe("dice_with_background")
            try:
                values.append(MetricValue("dice", dice_score(pred, target, k, "foreground"),
                                          f"test split (N={len(pred)}), {DEFINITIONS['foreground']}; {how}"))
                samples["dice"], recipes["dice"] = per_image_dice(pred, target, k, "foreground"), mean_recipe("dice")
            except ValueError:
                pass  # no test volume with foreground: the foreground Dice is undefined and not reported
        del parts["model"]
        where = "after_test_holdout" if trainer.info["held_out"] else "dataset_json"
        extra = trainer.info["extra"] + (["split after medvlp's test hold-out"] if trainer.info["held_out"] else [])
        comp = row_comparability(f"gtgm_{p['recipe']}" if p["recipe"] == "task1" else "gtgm_plus_train",
                                 "gtgm_task1_train_rate" if p["recipe"] == "task1" else "gtgm_plus_head", result, trainer,
                                 fidelity(self.fidelity_elements, ctx.params, extra),
                                 split_convention=f"gtgm_{p['recipe'].replace('gtgm_', '')}_{where}")
        return ProtocolResult(values, trainer.info["split_hash"], comp, samples=samples, recipes=recipes)
