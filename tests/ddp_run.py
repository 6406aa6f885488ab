"""Lightning DDP on 2 CPU gloo processes, run by ``tests/test_distributed.py`` as
``python -m tests.ddp_run OUT_DIR METHOD [METHOD ...]`` (Lightning's own launcher starts rank 1 by
re-running this command).

Per method (tiny preset, its example data, ``accelerator="cpu", devices=2, strategy="ddp"`` and no
``find_unused_parameters``) it trains ``MAX_STEPS`` steps, then every rank writes its full state dict
(parameters, EMA teachers, buffers) to ``OUT_DIR/<method>/rank<r>.pt`` and rank 0 writes ``last.ckpt``.

The pseudo-method ``clip_gather`` trains CLIP with ``gather_negatives=true`` for one step and dumps, per
rank, the initial weights, the local batch, the local loss and the (DDP-averaged) gradients, so the test
can recompute the step in one process on the global batch. LayerNorm heads and a dropout-free text
encoder make that step deterministic (BatchNorm statistics are per device by design).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from medvlp.compose import compose
from medvlp.config import to_container
from medvlp.method import load_method
from medvlp.registry import METHODS
from medvlp.train import AtomicCheckpointIO, build_datamodule_from_config, build_method

MAX_STEPS = 2
GATHER_OVERRIDES = ["method.init_args.gather_negatives=true", "method.init_args.proj_norm=ln"]


def config(method: str) -> dict[str, Any]:
    """Tiny-preset config of ``method`` (``clip_gather``: CLIP with global negatives)."""
    name, extra = ("clip", GATHER_OVERRIDES) if method == "clip_gather" else (method, [])
    cfg = compose([f"method={name}", "preset=tiny"])
    return to_container(OmegaConf.merge(cfg, OmegaConf.from_dotlist(extra)))


class DumpStates(L.Callback):
    """Writes each rank's final state dict (and, for the gather check, the first step's tensors)."""

    def __init__(self, out: Path, first_step: bool) -> None:
        self.out, self.first_step = out, first_step
        self.step0: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.first_step and trainer.global_step == 0:
            pl_module.text_encoder.model.eval()  # no dropout: the step is a function of weights and batch
            self.step0 = {"state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                          "image": batch["image"].clone(), "text": list(batch["text"])}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        if self.first_step and trainer.global_step == 0:
            self.step0["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                                   if p.grad is not None}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.first_step and trainer.global_step == 1 and "loss" not in self.step0:
            self.step0["loss"] = float(outputs["loss"])

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "step0": self.step0, "global_step": trainer.global_step},
                   self.out / f"rank{trainer.global_rank}.pt")


def run(method: str, root: Path) -> None:
    cfg = config(method)
    out = root / method
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, workers=True)
    dm = build_datamodule_from_config(cfg)
    model = build_method(cfg, dm)
    gather = method == "clip_gather"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1 if gather else MAX_STEPS,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=str(out), plugins=[AtomicCheckpointIO()],
                        callbacks=[DumpStates(out, first_step=gather)])
    trainer.fit(model, datamodule=dm)
    last = out / "last.ckpt"
    trainer.save_checkpoint(str(last), weights_only=False)
    if trainer.global_rank == 0:  # the checkpoint loads back (weights_only) into an equal model
        loaded = load_method(str(last)).state_dict()
        ours = model.state_dict()
        bad = sorted(k for k in set(loaded) | set(ours) if k not in loaded or k not in ours
                     or not torch.equal(loaded[k], ours[k]))
        (out / "reload.json").write_text(json.dumps({"mismatch": bad}))


def main(argv: list[str]) -> None:
    """``argv``: output folder, then method names (``all`` = every registered method, plugins included)."""
    root = Path(argv[0])
    methods = [m for name in argv[1:] for m in (METHODS.names() if name == "all" else [name])]
    root.mkdir(parents=True, exist_ok=True)
    (root / "methods.json").write_text(json.dumps(methods))
    for method in methods:
        run(method, root)


if __name__ == "__main__":
    main(sys.argv[1:])
