"""MGCA's linear classification protocol (``HKU-MedAI/MGCA`` @ 680fe4a: ``mgca/models/mgca/mgca_finetuner.py``,
``mgca/models/ssl_finetuner.py``, ``mgca/datasets/data_module.py``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medvlp.benchmarks.kit.fidelity import Element, documented, fidelity
from medvlp.benchmarks.kit.head_loop import HeadTrainer, fit
from medvlp.benchmarks.kit.head_parts import (ForwardCounter, classification_loss, classification_values, epoch_batches,
                                              labels_of, probe_batch, row_comparability, splits_folder)
from medvlp.benchmarks.kit.protocol import EvalContext, Protocol, ProtocolResult
from medvlp.benchmarks.kit.splits import select_fraction
from medvlp.benchmarks.kit.views import (batch_ids, center_crop, encoder_channels, random_crop, renormalise, split_ids,
                                         subset_loader, to_channels)
from medvlp.benchmarks.protocols.linear_probe import is_one_hot
from medvlp.registry import register_benchmark

MGCA = "HKU-MedAI/MGCA @ 680fe4a"
DEFAULTS: dict[str, Any] = {"lr": 5e-4, "weight_decay": 1e-6, "batch_size": 48, "max_epochs": 50, "patience": 10,
                            "resize": 256, "crop": 224, "fraction_source": "mgca", "fraction_files": {}}


def mgca_encoder_forwards(n_train: int, n_val: int, n_test: int, epochs: int, batch_size: int = 48) -> int:
    """Images MGCA's finetuner sends through the frozen encoder in ``epochs`` epochs: every epoch the
    full train batches (``drop_last=True``) and the full val batches (``drop_last=True``), then the test
    split once (no ``drop_last``). MGCA recomputes the val features every epoch; medvlp caches them."""
    return epochs * ((n_train // batch_size) * batch_size + (n_val // batch_size) * batch_size) + n_test


def _elements() -> list[Element]:
    ft, ssl, dm = "mgca/models/mgca/mgca_finetuner.py", "mgca/models/ssl_finetuner.py", "mgca/datasets/data_module.py"
    return [
        Element("encoder", "frozen, eval mode every train batch", f"{MGCA} {ssl} L44-45, L52-53", "the same"),
        Element("head", "SSLEvaluator(n_hidden=None): Flatten → Dropout(0) → Linear", f"{ssl} L49-50, L155-160",
                "nn.Linear (dropout 0)"),
        Element("optimizer", "AdamW(head) lr 5e-4, betas (0.9, 0.999), wd 1e-6, no schedule", f"{ssl} L18-19, L114-120",
                "the same", param="lr", value=5e-4),
        Element("weight decay", "1e-6", f"{ssl} L18-19", "1e-6", param="weight_decay", value=1e-6),
        Element("batch", "48 for train, val and test", f"{ft} L32", "48", param="batch_size", value=48),
        Element("epochs", "max_epochs 50", f"{ft} L40", "50", param="max_epochs", value=50),
        Element("selection", "ModelCheckpoint + EarlyStopping on val_loss (min, patience 10), test ckpt_path best",
                f"{ft} L89-92, L117", "the same", param="patience", value=10),
        Element("loaders", "train shuffle + drop_last=True; val drop_last=True; test drop_last=False",
                f"{dm} L26-67", "the same"),
        Element("val loss", "self.log('val_loss') per batch → epoch mean of batch means", f"{ssl} L73",
                "mean of the batch-mean losses over the full val batches"),
        Element("loss", "BCE-with-logits (CheXpert, RSNA: 1 output) / cross-entropy (COVIDx)", f"{ssl} L105-110",
                "the same; unknown (NaN) labels masked out of BCE", "MGCA fills blanks with 0 (medvlp's CheXpert "
                "datamodule does so under uncertainty: mgca, so this only matters for other datamodules)"),
        Element("train view", "DataTransforms: resize/pad 256, RandomCrop 224, Normalize(0.5, 0.5); CheXpert: "
                "Moco2Transform (crop, jitter, grey, blur, flip)", f"{ft} L44-63", "random 224 crop of the 256 image",
                "Moco2Transform's colour jitter/grey/blur/flip for CheXpert are not applied"),
        Element("eval view", "CenterCrop 224", "mgca/datasets/transforms.py DataTransforms", "the same (features cached "
                "once: identical every epoch)", param="crop", value=224),
        Element("image size", "resize_img to 256 (pad)", "mgca/datasets/utils.py L28-74", "the datamodule's image_size 256",
                param="resize", value=256),
        Element("label fractions", "df.sample(frac, random_state=42) over the train CSV", "mgca/datasets/classification_dataset.py "
                "L52-53, L165-166", "fraction_source mgca over the datamodule's records (MGCA order for RSNA)",
                param="fraction_source", value="mgca"),
        Element("seed", "seed_everything(42), deterministic", f"{ft} L31, L42, L108", "the suite's seeds"),
    ]


@register_benchmark("mgca_linear")
@documented(_elements)
class MGCALinear(Protocol):
    """MGCA/ASG linear classification: a frozen image encoder and one trained ``nn.Linear``.

    The validation and test centre-crop features are computed once per run (the frozen encoder gives the
    same features every epoch); the training features are recomputed every epoch (fresh random crops).
    ``ProtocolResult.comparability["encoder_forwards"]`` counts the images sent through the encoder,
    beside :func:`mgca_encoder_forwards` (what MGCA's loop would send for the same epochs).
    Metrics: macro ROC-AUC over classes, top-1 accuracy for one-hot sets.
    """

    name = "mgca_linear"
    variant = "mgca_linear"
    needs_labels = True
    selection = "MGCA selects on validation loss"
    defaults = DEFAULTS
    uses_fractions = True
    parameters = {
        "lr": "AdamW learning rate of the head (5e-4)", "weight_decay": "AdamW weight decay (1e-6)",
        "batch_size": "batch size (48)", "max_epochs": "epoch budget (50)",
        "patience": "early-stopping patience in epochs on validation loss (10)",
        "resize": "padded image side the datamodule must deliver (256)", "crop": "random/center crop side (224)",
        "fraction_source": "mgca | hash | file (mgca)", "fraction_files": "{label percent: id or BenchX subset file} ({})",
    }

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
        rows, subset_hash, how = select_fraction(ids, fraction, ctx.subset_seed_for(seed), p["fraction_source"],
                                                 p["fraction_files"], splits_folder(ctx))
        n_classes, bs = len(dm.label_names), int(p["batch_size"])
        gen = torch.Generator().manual_seed(seed)
        counter = ForwardCounter()

        def features(batch: dict[str, Any], train: bool) -> torch.Tensor:
            with torch.no_grad():
                x = self.view(ctx, batch["image"], train, gen)
                counter.add(len(x))
                return model.image_representation(x.to(ctx.device)).flatten(1)

        probe = probe_batch(dm, rows, seed)
        dim = features(probe, False).shape[-1]
        counter.images = counter.calls = 0  # the probe only sizes the head
        multiclass = n_classes > 1 and is_one_hot(labels_of(probe).numpy())
        head = nn.Linear(dim, n_classes).to(ctx.device)
        opt = torch.optim.AdamW(head.parameters(), lr=float(p["lr"]), betas=(0.9, 0.999),
                                weight_decay=float(p["weight_decay"]))
        loss_of = classification_loss(multiclass)
        cache: dict[str, list[tuple[torch.Tensor, torch.Tensor, list[str]]]] = {}

        def cached(split: str) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
            """Centre-crop features of a split, once per run (val: MGCA's drop_last=True batches)."""
            if split not in cache:
                out = []
                drop = split == "val" and len(dm.dataset("val", augment=False)) >= bs
                for batch in subset_loader(dm, split, None, bs, False, seed, drop_last=drop):
                    if batch is not None:
                        out.append((features(batch, False), labels_of(batch), batch_ids(batch, 0)))
                cache[split] = out
            return cache[split]

        def validate() -> dict[str, float]:
            losses = [float(loss_of(head(f), y)) for f, y, _ in cached("val")]
            if not losses:
                raise ValueError(f"{self.name}: the validation split yielded no sample")
            return {"val_loss": sum(losses) / len(losses)}

        trainer = HeadTrainer(
            modules=[head], optimizer=opt, train_batches=epoch_batches(dm, rows, bs, seed, drop_last=len(rows) >= bs),
            train_step=lambda batch: loss_of(head(features(batch, True)), labels_of(batch)),
            validate=validate, monitor="val_loss", mode="min", max_epochs=int(p["max_epochs"]),
            patience=int(p["patience"]), set_train_mode=lambda: model.eval(),
            info={"rows": rows, "how": how, "multiclass": multiclass, "forwards": counter,
                  "tail_kept": len(rows) < bs, "val_tail_kept": len(dm.dataset("val", augment=False)) < bs})
        return trainer, {"head": head, "logits_of": lambda batch, train: head(features(batch, train)), "loss_of": loss_of,
                         "split_hash": subset_hash, "cached": cached}

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        trainer, parts = self.build(ctx, fraction, seed)
        result = fit(trainer)
        p, head = self.params(ctx), parts["head"]
        scores, targets, ids = [], [], []
        with torch.no_grad():
            for f, y, batch_id in parts["cached"]("test"):
                logits = head(f).float().cpu()
                scores.append(torch.softmax(logits, 1) if trainer.info["multiclass"] else torch.sigmoid(logits))
                targets.append(y)
                ids.extend(batch_id)
        s, y = torch.cat(scores).numpy(), torch.cat(targets).numpy()
        forwards = trainer.info["forwards"].images
        n_val = len(ctx.datamodule.dataset("val", augment=False))
        mgca = mgca_encoder_forwards(len(trainer.info["rows"]), n_val, len(y), result.epochs_run, int(p["batch_size"]))
        how = (f"MGCA linear protocol: frozen encoder CLS feature, nn.Linear, AdamW lr {p['lr']:g} wd "
               f"{p['weight_decay']:g}, batch {p['batch_size']} (train/val drop_last), {result.epochs_run}/{p['max_epochs']} "
               f"epochs (early stop on val loss = mean of batch means, patience {p['patience']}), best-val epoch "
               f"{result.best_epoch}; {p['resize']} pad, {p['crop']} random/center crop; {trainer.info['how']}; "
               f"{forwards} encoder image forwards (MGCA's loop: {mgca})")
        values, samples, recipes = classification_values(ids, s, y, ctx.datamodule.label_names, trainer.info["multiclass"], how)
        extra = (["train batches keep the tail: the subset is smaller than one batch"] if trainer.info["tail_kept"] else []) + \
            (["val keeps the tail: the split is smaller than one batch"] if trainer.info["val_tail_kept"] else [])
        comp = row_comparability(self.variant, p["fraction_source"], result, trainer,
                                 fidelity(self.fidelity_elements, ctx.params, extra), encoder_forwards=forwards,
                                 mgca_encoder_forwards=mgca)
        return ProtocolResult(values, parts["split_hash"], comp, samples=samples, recipes=recipes)
