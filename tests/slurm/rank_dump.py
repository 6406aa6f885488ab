"""A callback for the 2-task ``srun`` test: every rank writes its state dict and step count at the end of training."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch


class DumpRankState(L.Callback):
    """Writes ``<out>/rank<global rank>.pt`` with ``state`` (the module's state dict), ``global_step``,
    ``world_size`` and the SLURM task id of this process."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        import os

        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "global_step": trainer.global_step, "world_size": trainer.world_size,
                    "procid": os.environ.get("SLURM_PROCID"), "env": type(trainer._accelerator_connector.cluster_environment).__name__},
                   self.out / f"rank{trainer.global_rank}.pt")
