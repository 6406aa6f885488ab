"""BenchX's fine-tuning protocols (``yangzhou12/BenchX`` @ b874fa6, branch ``release``): classification
(``configs/classification/<dataset>/<model>.yml``, ``unifier/``) and segmentation
(``preprocess/mmsegmentation/configs/benchmark/<dataset>/upernet_vit.py``)."""
from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.benchmarks.kit.fidelity import Element, differs, documented, fidelity
from medvlp.benchmarks.kit.head_loop import HeadTrainer, benchx_warmup_cosine, fit
from medvlp.benchmarks.kit.head_parts import (classification_values, epoch_batches, iteration_blocks, labels_of,
                                              probe_batch, row_comparability, scored_split)
from medvlp.benchmarks.kit.protocol import EvalContext, MetricValue, Protocol, ProtocolResult, macro_auc
from medvlp.benchmarks.kit.splits import select_fraction
from medvlp.benchmarks.kit.views import (batch_ids, center_crop, encoder_channels, random_resized_crop_flip, renormalise,
                                         resize, split_ids, subset_loader, to_channels)
from medvlp.benchmarks.metrics.dice import DEFINITIONS, dice_score
from medvlp.benchmarks.protocols.segmentation import dice_samples
from medvlp.registry import register_benchmark
import yaml

BENCHX = "yangzhou12/BenchX @ b874fa6"
#: medvlp datamodule name → BenchX classification config folder (``benchmarks/benchx_configs.yaml`` keys)
BENCHX_DATASETS = {"nih_chestxray14": "nih", "rsna_pneumonia": "rsna", "siim_pneumothorax": "siim", "covidx": "covidx",
                   "vindr_cxr": "vindr", "chexpert": "chexpert"}


@lru_cache(maxsize=1)
def benchx_configs() -> dict[str, dict[str, dict[str, Any]]]:
    """BenchX's per-dataset, per-backbone classification settings (packaged ``benchx_configs.yaml``)."""

    return yaml.safe_load(resources.files("medvlp.benchmarks").joinpath("benchx_configs.yaml").read_text())


def benchx_config(dataset: str, model: str) -> dict[str, Any]:
    """One BenchX classification config.

    Raises:
        KeyError: naming the known datasets / backbones.
    """
    table = benchx_configs()
    if dataset not in table:
        raise KeyError(f"benchx_finetune: no BenchX classification config for dataset {dataset!r}; known: {sorted(table)}")
    if model not in table[dataset]:
        raise KeyError(f"benchx_finetune: no BenchX config {dataset}/{model}.yml; known: {sorted(table[dataset])}")
    return dict(table[dataset][model])


#: settings that come from the per-dataset config when the suite leaves them unset (``None``)
CONFIG_KEYS = ("optimizer", "lr", "backbone_lr_mult", "batch_size", "warmup_steps", "total_steps")

FINETUNE_DEFAULTS: dict[str, Any] = {
    "benchx_dataset": None, "benchx_model": "mgca_vit", "optimizer": None, "lr": None, "momentum": 0.9,
    "backbone_lr_mult": None, "weight_decay": 0.0, "batch_size": None, "grad_clip": 1.0, "warmup_steps": None,
    "total_steps": None, "max_epochs": 201, "early_stop": 10, "eval_start": 10, "eval_interval": 5, "crop": 224,
    "norm": [0.4978, 0.2449], "fraction_source": "file", "fraction_files": {},
}


class FCNormClassifier(nn.Module):
    """BenchX ``Classifier`` (``unifier/blocks/classifier/classifier.py`` L7-24): optional
    ``LayerNorm(eps=1e-6)`` on the pooled feature (``use_fc_norm``), dropout 0, a linear layer whose
    weight is ``trunc_normal_(std=2e-5)`` when ``trunc_init`` (the bias keeps PyTorch's default init)."""

    def __init__(self, dim: int, num_classes: int, fc_norm: bool = True, trunc_init: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6) if fc_norm else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        if trunc_init:
            nn.init.trunc_normal_(self.fc.weight, std=2e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def multiclass_f1(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """torchmetrics ``MulticlassF1Score(num_classes=k)`` default (macro over classes of the arg-max)."""
    from sklearn.metrics import f1_score  # lazy: heavy import (scikit-learn), only this path needs it

    return float(f1_score(y_true, y_pred, labels=list(range(k)), average="macro", zero_division=0))


def _cls_elements() -> list[Element]:
    cfg = "configs/classification/NIH/mgca_vit.yml"
    return [
        Element("settings per dataset/backbone", "optimizer, lr, encoder lr ×, batch, warm-up/t_total per config",
                f"{BENCHX} configs/classification/*/*.yml", "read from benchmarks/benchx_configs.yaml "
                "(benchx_dataset from the datamodule, benchx_model mgca_vit)"),
        Element("optimizer", "SGD momentum 0.9 (ViTs) / Adam, no weight decay", f"{cfg} L42-50",
                "the config's optimizer, weight decay 0", param="weight_decay", value=0.0),
        Element("parameter groups", "ve_only: encoder at lr × lr_multiplier_ve (0.1), head at lr",
                "unifier/executors/utils.py L133-140", "the same (one group when the config has none)"),
        Element("schedule", "WarmupCosineScheduler, progress not clamped (periodic after t_total), per step",
                "unifier/blocks/schedulers/WarmupCosineScheduler.py L19-24; executors/utils.py L333-341",
                "benchx_warmup_cosine (the same factor)"),
        Element("gradient clipping", "clip_grad_norm 1.0", f"{cfg} L44", "1.0", param="grad_clip", value=1.0),
        Element("epochs", "epochs 200, loop range(0, epochs + 1) = 201", "unifier/executors/trainer.py L99",
                "201", param="max_epochs", value=201),
        Element("validation cadence", "eval_start 10, eval_interval 5", "trainer.py L174", "the same",
                param="eval_interval", value=5),
        Element("early stop", "10 validations without strict improvement", "executors/utils.py L408-429",
                "10 validations", param="early_stop", value=10),
        Element("selection metric", "multilabel_auroc (NIH, VinDr, CheXpert) / multiclass_f1 (RSNA, SIIM, COVIDx)",
                "configs/classification/*/*.yml validator", "val_auc / val_f1 from the config"),
        Element("loss", "BCEWithLogits (14 labels) / CrossEntropy on one-hot 2 classes", "datasets.py L1452; ImageClassifier.py L54-60",
                "the config's loss (binary datamodules get a 2-way CE head on one-hot targets)"),
        Element("head", "Classifier: LayerNorm(eps 1e-6) if use_fc_norm, Linear, trunc_normal_(std 2e-5) if trunc_init",
                "unifier/blocks/classifier/classifier.py L14-17", "FCNormClassifier with the config's flags"),
        Element("pooling", "cnn.global_pool (token = CLS for MGCA-ViT)", "configs/_base_/models/mgca_vit.yml L4-10",
                "the encoder's image_representation (CLS token of medvlp ViTs); another pool is recorded as a deviation"),
        Element("train view", "RandomResizedCrop(224) + RandomHorizontalFlip + Grayscale(3), Normalize(0.4978, 0.2449)",
                "unifier/datasets/transforms.py L47-68", "the same on the datamodule's resized image", 
                "BenchX crops the stored image; medvlp crops the datamodule's image_size square (the datamodule "
                "reads and resizes)"),
        Element("eval view", "Resize(224) + CenterCrop(224)", "transforms.py L47-68", "the same", param="crop", value=224),
        Element("precision", "use_amp True", f"{cfg} L57", "the method's precision",
                "medvlp does not run the fine-tune under AMP"),
        Element("label fractions", "train_1.txt / train_10.txt / train.txt", "scripts/classification/run_BenchX_*.sh L6-9",
                "fraction_source file with BenchX's files", param="fraction_source", value="file"),
        Element("seeds", "42, 0, 1 (cudnn.benchmark, non-deterministic)", "run_BenchX_*.sh L6-9; bin/utils.py L107-115",
                "the suite's seeds (paper_benchx: 42, 0, 1)"),
    ]


@register_benchmark("benchx_finetune")
@documented(_cls_elements)
class BenchXFinetune(Protocol):
    """BenchX end-to-end fine-tuning for classification (NIH, VinDr, RSNA, SIIM, COVIDx; CheXpert from
    BenchX's ``develop`` branch).

    The per-dataset and per-backbone settings are data (``benchmarks/benchx_configs.yaml``); the dataset
    is read from the datamodule (``benchx_dataset`` overrides it; a datamodule without a BenchX config
    uses NIH's, recorded as a deviation) and the backbone config is ``benchx_model`` (``mgca_vit``).
    Unset ``optimizer``, ``lr``, ``backbone_lr_mult``, ``batch_size``, ``warmup_steps``,
    ``total_steps`` come from that config. A copy of the encoder is fine-tuned (the evaluated model is
    untouched); test at the best-validation weights.

    The learning-rate factor is BenchX's, not medvlp's clamped schedule: after ``t_total`` it rises
    again (with warm-up 50 and ``t_total`` 3000: 0 at step 3000, 0.5 at 4475, 1.0 at 5950).
    """

    parameters = {
        "benchx_dataset": "BenchX config folder: nih | rsna | siim | covidx | vindr | chexpert (from the datamodule)",
        "benchx_model": "BenchX backbone config (mgca_vit)",
        "optimizer": "sgd | adam (the config's)", "lr": "head learning rate (the config's)",
        "momentum": "SGD momentum (0.9)", "backbone_lr_mult": "encoder lr multiplier (the config's: 0.1 for ve_only)",
        "weight_decay": "weight decay (0)", "batch_size": "batch size (the config's)", "grad_clip": "max gradient norm (1.0)",
        "warmup_steps": "linear warm-up steps (the config's)", "total_steps": "BenchX t_total (the config's)",
        "max_epochs": "epoch budget (201: BenchX's range(0, epochs + 1))",
        "early_stop": "validations without improvement before stopping (10)",
        "eval_start": "first validated epoch (10)", "eval_interval": "validate every N epochs (5)",
        "crop": "RandomResizedCrop / center-crop side (224)", "norm": "[mean, std] on [0, 1] intensities ([0.4978, 0.2449])",
        "fraction_source": "file | hash | mgca (file)", "fraction_files": "{label percent: BenchX subset file} ({})",
    }

    name = "benchx_finetune"
    variant = "benchx_finetune"
    needs_labels = True
    selection = "BenchX selects on validation AUROC / F1"
    defaults = FINETUNE_DEFAULTS
    uses_fractions = True

    def resolved(self, ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """Params with the config's values filled in, the config, and the run-time deviations."""
        p = self.params(ctx)
        extra = []
        dataset = p["benchx_dataset"] or BENCHX_DATASETS.get(getattr(ctx.datamodule, "name", ""), None)
        if dataset is None:
            dataset = "nih"
            extra.append(f"dataset config: NIH's (no BenchX config for {type(ctx.datamodule).__name__})")
        cfg = benchx_config(str(dataset), str(p["benchx_model"]))
        official = {"optimizer": cfg["optimizer"], "lr": cfg["lr"], "backbone_lr_mult": cfg["backbone_lr_mult"],
                    "batch_size": cfg["batch_size"], "warmup_steps": cfg["warmup_steps"], "total_steps": cfg["t_total"]}
        for key in CONFIG_KEYS:
            if p[key] is None:
                p[key] = official[key]
            elif differs(p[key], official[key]):
                extra.append(f"{key}={p[key]!r} ({dataset}/{p['benchx_model']}.yml: {official[key]!r})")
        if cfg["pool"] != "token":
            extra.append(f"pooling: BenchX {cfg['pool']}, medvlp the encoder's image_representation")
        cfg["dataset"] = dataset
        return p, cfg, extra

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
        p, cfg, extra = self.resolved(ctx)
        dm = ctx.datamodule
        torch.manual_seed(seed)
        ids = split_ids(dm, "train")
        rows, subset_hash, how = select_fraction(ids, fraction, ctx.subset_seed_for(seed), p["fraction_source"],
                                                 p["fraction_files"])
        gen = torch.Generator().manual_seed(seed)
        model = copy.deepcopy(ctx.model).to(ctx.device)
        for q in model.image_backbone().parameters():
            q.requires_grad_(True)
        probe = probe_batch(dm, rows, seed)
        with torch.no_grad():
            dim = model.eval().image_representation(self.view(ctx, probe["image"], False, gen).to(ctx.device)).shape[-1]
        n_labels = len(dm.label_names)
        one_hot = n_labels > 1 and bool(np.all(np.nansum(labels_of(probe).numpy(), 1) == 1))
        ce = cfg["loss"] == "ce" or one_hot
        binary = ce and n_labels == 1  # one label (RSNA/SIIM): BenchX's 2-way one-hot CE
        k = 2 if binary else n_labels
        if ce and cfg["loss"] != "ce":
            extra.append(f"loss: cross-entropy for one-hot labels where {cfg['dataset']} uses BCE")
        if cfg["loss"] == "ce" and not binary and k != cfg["num_classes"]:
            extra.append(f"classes: {k} where BenchX's {cfg['dataset']} has {cfg['num_classes']}")
        head = FCNormClassifier(dim, k, bool(cfg["fc_norm"]), bool(cfg["trunc_init"])).to(ctx.device)
        backbone = model.image_backbone()
        lr, mult = float(p["lr"]), float(p["backbone_lr_mult"])
        if mult != 1.0:
            groups = [{"params": list(head.parameters()), "lr": lr, "name": "head"},
                      {"params": list(backbone.parameters()), "lr": lr * mult, "name": "visual_encoder"}]
        else:
            groups = [{"params": list(head.parameters()) + list(backbone.parameters()), "lr": lr, "name": "all"}]
        if p["optimizer"] == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=float(p["momentum"]), weight_decay=float(p["weight_decay"]))
        elif p["optimizer"] == "adam":
            opt = torch.optim.Adam(groups, lr=lr, weight_decay=float(p["weight_decay"]))
        else:
            raise ValueError(f"{self.name}: optimizer must be sgd|adam, got {p['optimizer']!r}")
        sched = benchx_warmup_cosine(opt, int(p["total_steps"]), int(p["warmup_steps"]))

        def target(y: torch.Tensor) -> torch.Tensor:
            return torch.cat([1 - y, y], 1) if binary else y

        def logits_of(batch: dict[str, Any], train: bool) -> torch.Tensor:
            return head(model.image_representation(self.view(ctx, batch["image"], train, gen).to(ctx.device)))

        def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            y = target(y).to(logits.device)
            if ce:
                return F.cross_entropy(logits.float(), y.argmax(1))
            known = ~torch.isnan(y)
            return F.binary_cross_entropy_with_logits(logits.float()[known], y[known])

        def scores(split: str, ids_: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
            s, y = scored_split(dm, split, int(p["batch_size"]), seed, lambda b: logits_of(b, False), ce, ids_)
            return (s[:, 1:], y) if binary else (s, y)

        monitor = "val_auc" if cfg["monitor"] == "multilabel_auroc" else "val_f1"

        def validate() -> dict[str, float]:
            s, y = scores("val")
            if monitor == "val_auc":
                return {"val_auc": macro_auc(y, s)[0]}
            pred = (s[:, 0] > 0.5).astype(int) if binary else s.argmax(1)
            true = y[:, 0].astype(int) if binary else y.argmax(1)
            return {"val_f1": multiclass_f1(true, pred, k)}

        trainer = HeadTrainer(
            modules=[head, backbone], optimizer=opt, scheduler=sched, grad_clip=float(p["grad_clip"]),
            train_batches=epoch_batches(dm, rows, int(p["batch_size"]), seed),
            train_step=lambda batch: loss_of(logits_of(batch, True), labels_of(batch)),
            validate=validate, monitor=monitor, mode="max", max_epochs=int(p["max_epochs"]),
            patience=int(p["early_stop"]), eval_start=int(p["eval_start"]), eval_interval=int(p["eval_interval"]),
            info={"rows": rows, "how": how, "multiclass": ce and not binary, "config": cfg, "extra": extra, "params": p})
        return trainer, {"head": head, "model": model, "scores": scores, "split_hash": subset_hash, "loss_of": loss_of}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        p, cfg = trainer.info["params"], trainer.info["config"]
        ids: list[str] = []
        with torch.no_grad():
            s, y = parts["scores"]("test", ids)
        how = "; ".join([
            f"BenchX fine-tune ({cfg['dataset']}/{p['benchx_model']}.yml): {p['optimizer']} lr {float(p['lr']):g}",
            f"encoder lr x{float(p['backbone_lr_mult']):g}",
            f"BenchX warm-up {p['warmup_steps']} + periodic cosine (t_total {p['total_steps']})",
            f"grad clip {p['grad_clip']:g}, batch {p['batch_size']}, {result.epochs_run}/{p['max_epochs']} epochs",
            f"{trainer.monitor} every {p['eval_interval']} from {p['eval_start']}, early stop {p['early_stop']}",
            f"best-val epoch {result.best_epoch + 1}", "RandomResizedCrop+flip", trainer.info["how"]])
        values, samples, recipes = classification_values(ids, s, y, ctx.datamodule.label_names, trainer.info["multiclass"], how)
        del parts["model"]
        comp = row_comparability(self.variant, p["fraction_source"], result, trainer,
                                 fidelity(self.fidelity_elements, ctx.params, trainer.info["extra"]))
        return ProtocolResult(values, parts["split_hash"], comp, samples=samples, recipes=recipes)


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



SEG_DEFAULTS: dict[str, Any] = {
    "lr": None, "weight_decay": 0.05, "batch_size": 8, "max_iterations": 20000, "warmup_iterations": 1500,
    "eval_interval": 2000, "channels": 768, "aux_channels": 256, "aux_weight": 0.4,
    "fraction_source": "file", "fraction_files": {}, "norm": [0.4978, 0.2449],
}
#: released ``upernet_vit.py`` learning rate per dataset (SIIM, Object-CXR, TBX11K 1e-3; RSNA 1e-4)
SEG_LR = {"rsna_pneumonia": 1e-4}
SEG_CFG = "preprocess/mmsegmentation/configs/benchmark/siim/upernet_vit.py"


def _seg_elements() -> list[Element]:
    base = "preprocess/mmsegmentation/configs/_base_"
    return [
        Element("config", "released upernet_vit.py (not the pre-release bf33997 MRM 160k config)", f"{BENCHX} {SEG_CFG}",
                "the released config"),
        Element("model", "ViT (frozen_exclude []) → Feature2Pyramid(4, 2, 1, 0.5) → UPerHead(768) + FCN aux(256)",
                f"{SEG_CFG} L12-33", "the encoder's four feature levels → the same necks/heads",
                "medvlp's encoder gives its own four levels and drop path (BenchX: out_indices 3/5/7/11, drop_path 0.1)"),
        Element("optimizer", "AdamW lr 1e-3 (RSNA 1e-4), betas (0.9, 0.999), wd 0.05, no layer decay",
                f"{SEG_CFG} L38-49 (layer decay commented out L47-48)", "the same",
                param="weight_decay", value=0.05),
        Element("schedule", "LinearLR(1e-6, 0→1500) + PolyLR(power 1, eta_min 0, 1500→20000), per iteration",
                f"{SEG_CFG} L51-54", "the same", param="warmup_iterations", value=1500),
        Element("iterations", "IterBasedTrainLoop max_iters 20000", f"{SEG_CFG} L66", "20000",
                param="max_iterations", value=20000),
        Element("validation", "every 2000 iterations", f"{SEG_CFG} L66", "2000", param="eval_interval", value=2000),
        Element("loss", "CrossEntropy (1.0) on the decode head + CrossEntropy ×0.4 on the aux head",
                f"{base}/models/upernet_my_vit.py L34-62", "the same", param="aux_weight", value=0.4),
        Element("batch", "8 (val/test 1)", f"{SEG_CFG} L69-71", "8", param="batch_size", value=8),
        Element("augmentation", "Resize(512, keep ratio) + RandomFlip(0.5)", f"{base}/datasets/siim.py L4-11",
                "the datamodule's resize (image_size 512) + flip p 0.5"),
        Element("normalisation", "mean 255·0.4978, std 255·0.2449", f"{base}/models/upernet_my_vit.py L3-9", "the same"),
        Element("selection", "CheckpointHook save_best mDice (dataset-level, background included)", f"{SEG_CFG} L77-79",
                "best validation dice_mmseg_dataset, test at those weights"),
        Element("metric", "IoUMetric mDice (areas summed over the set, mean over both classes)", f"{SEG_CFG} L81-84",
                "dice_mmseg_dataset (and the foreground-only value beside it)"),
        Element("splits", "train.txt / val.txt / test.txt (1 %/10 %: train_1.txt / train_10.txt by override)",
                f"{base}/datasets/siim.py L35-79", "train subset from fraction_files; val/test = the datamodule's",
                "medvlp's val/test are the datamodule's split, not BenchX's val.txt/test.txt"),
        Element("precision", "AmpOptimWrapper, fp16 dynamic loss scale", f"{SEG_CFG} L56-64", "the method's precision",
                "medvlp does not run under AMP"),
        Element("seeds", "42, 0, 1", "preprocess/mmsegmentation/scripts/run_BenchX_SIIM.sh L38-41", "the suite's seeds"),
    ]


@register_benchmark("benchx_segmentation")
@documented(_seg_elements)
class BenchXSegmentation(Protocol):
    """BenchX segmentation as released (UperNet on the fine-tuned ViT, MMSegmentation 1.x).

    The pre-release configuration (``bf33997``: AdamW 2e-5 with layer decay 0.65, focal + Dice losses,
    160k iterations, ``Dice.front``) is no longer followed. ``max_iterations`` / ``eval_interval`` can
    be lowered for tests (the row then records the deviation).
    """

    name = "benchx_segmentation"
    variant = "benchx_segmentation"
    selection = "BenchX selects on validation mDice"
    defaults = SEG_DEFAULTS
    uses_fractions = True
    needs_mask = True
    parameters = {
        "lr": "AdamW learning rate (1e-3; RSNA 1e-4)", "weight_decay": "AdamW weight decay (0.05)",
        "batch_size": "batch size (8)", "max_iterations": "training iterations (20000)",
        "warmup_iterations": "linear warm-up iterations (1500)", "eval_interval": "iterations between validations (2000)",
        "channels": "UPerHead channels (768)", "aux_channels": "FCN auxiliary head channels (256)",
        "aux_weight": "auxiliary CE weight (0.4)", "fraction_source": "file | hash | mgca (file)",
        "fraction_files": "{label percent: subset file} ({})", "norm": "[mean, std] on [0, 1] intensities",
    }

    def applicable(self, ctx: EvalContext) -> str | None:
        if ctx.datamodule.spatial_dims != 2:
            return "BenchX segmentation is 2D"
        return super().applicable(ctx)

    def build(self, ctx: EvalContext, fraction: float, seed: int) -> tuple[HeadTrainer, dict[str, Any]]:
        """The trainer of one (fraction, seed) run and the pieces the test step needs."""
        p = self.params(ctx)
        dm = ctx.datamodule
        official_lr = SEG_LR.get(getattr(dm, "name", ""), 1e-3)
        extra = [] if p["lr"] is None or not differs(p["lr"], official_lr) else [f"lr={p['lr']!r} (official {official_lr:g})"]
        p["lr"] = official_lr if p["lr"] is None else p["lr"]
        torch.manual_seed(seed)
        ids = split_ids(dm, "train")
        rows, subset_hash, how = select_fraction(ids, fraction, ctx.subset_seed_for(seed), p["fraction_source"],
                                                 p["fraction_files"])
        model = copy.deepcopy(ctx.model).to(ctx.device)
        backbone = model.image_backbone()
        gen = torch.Generator().manual_seed(seed)
        mean, std = p["norm"]

        def view(x: torch.Tensor) -> torch.Tensor:
            return to_channels(renormalise(x, dm, float(mean), float(std))[0], encoder_channels(model))

        probe = probe_batch(dm, rows, seed)
        with torch.no_grad():
            maps = model.eval().image_feature_maps(view(probe["image"]).to(ctx.device))
        if len(maps) < 4:
            raise ValueError(f"{self.name}: the encoder exposes {len(maps)} feature levels; UperNet needs 4")
        dim = maps[0].shape[1]
        k = 2 if len(dm.label_names) <= 1 else len(dm.label_names) + 1
        neck, head, aux = Feature2Pyramid(dim), UPerHead(dim, int(p["channels"]), k), FCNAuxHead(dim, int(p["aux_channels"]), k)
        for m in (neck, head, aux):
            m.to(ctx.device)
        params = [q for m in (backbone, neck, head, aux) for q in m.parameters()]
        opt = torch.optim.AdamW(params, lr=float(p["lr"]), betas=(0.9, 0.999), weight_decay=float(p["weight_decay"]))
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
            return (F.cross_entropy(out, y, ignore_index=255)
                    + float(p["aux_weight"]) * F.cross_entropy(out_aux, y, ignore_index=255))

        def predict(split: str, ids_: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            preds, targets = [], []
            for batch in subset_loader(dm, split, None, int(p["batch_size"]), False, seed):
                if batch is None:
                    continue
                preds.append(logits(view(batch["image"]).to(ctx.device))[0].argmax(1, keepdim=True).cpu())
                targets.append(batch["mask"].long())
                if ids_ is not None:
                    ids_.extend(batch_ids(batch, len(ids_)))
            return torch.cat(preds), torch.cat(targets)

        def validate() -> dict[str, float]:
            pred, target = predict("val")
            return {"val_mdice": dice_score(pred, target, k, "mmseg_dataset")}

        loader_for = lambda n: subset_loader(dm, "train", rows, int(p["batch_size"]), True, seed * 1000 + n)  # noqa: E731
        trainer = HeadTrainer(
            modules=[backbone, neck, head, aux], optimizer=opt, scheduler=sched,
            train_batches=iteration_blocks(loader_for, interval), train_step=step, validate=validate,
            monitor="val_mdice", mode="max", max_epochs=max(1, total // interval), patience=None,
            info={"rows": rows, "how": how, "k": k, "extra": extra, "lr": float(p["lr"])})
        return trainer, {"predict": predict, "model": model, "split_hash": subset_hash, "heads": (neck, head, aux)}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        p = self.params(ctx)
        ids: list[str] = []
        with torch.no_grad():
            pred, target = parts["predict"]("test", ids)
        how = (f"BenchX UperNet fine-tune (released config): AdamW lr {trainer.info['lr']:g} wd {p['weight_decay']:g}, "
               f"warm-up {p['warmup_iterations']} + poly, CE + {p['aux_weight']:g}·aux CE, {result.steps} iterations, "
               f"best val mDice at validation {result.best_epoch + 1}; {trainer.info['how']}; N_test={len(pred)}")
        values = [MetricValue(f"dice_{d}", dice_score(pred, target, trainer.info["k"], d), f"{DEFINITIONS[d]}; {how}")
                  for d in ("mmseg_dataset", "mmseg_dataset_foreground")]
        del parts["model"]
        samples, recipes = dice_samples(pred, target, trainer.info["k"], {v.metric: v.metric[len("dice_"):] for v in values}, ids)
        comp = row_comparability(self.variant, p["fraction_source"], result, trainer,
                                 fidelity(self.fidelity_elements, ctx.params, trainer.info["extra"]))
        return ProtocolResult(values, parts["split_hash"], comp, samples=samples, recipes=recipes)
