"""Preemption on SLURM: on the requeue signal, checkpoint at the next step boundary and requeue the job.

:class:`RequeueOnSignal` is added to a suite arm's pretraining by ``medvlp benchmark ... launcher=slurm``
(its job runs ``stage=pretrain requeue=true``). The signal (``--signal=USR1@<s>`` before the time limit, or
``scancel --signal=USR1``) only sets a flag; after the current optimizer step every rank agrees on it, all
ranks write ``<run>/checkpoints/last.ckpt`` (full trainer state plus the random-number generators' states),
rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and the job is killed by SLURM. The requeued job resumes
from that checkpoint (``run.resume``): no step is lost or repeated. Lightning's own handler (which saves
from inside the signal handler, mid-step) is replaced for the duration of training.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)

CLASS_PATH = "medvlp.benchmarks.suite.launch.requeue.RequeueOnSignal"


class RequeueOnSignal(L.Callback):
    """Checkpoint at a step boundary and ``scontrol requeue`` when the job receives ``signum``.

    The checkpoint is written after the step during which the signal arrived: when that step ended an epoch,
    at the start of the next epoch (after the step's metrics are logged, before the next epoch draws its
    order), so the resumed run is the uninterrupted one (optimizer, loops, the random generators and the
    training loaders' shuffling generators are restored). Mid-epoch it is written at once; Lightning then
    restarts that epoch's loader on resume: the step count continues, the rest of the epoch's batch order
    and that step's logged metrics differ.

    Args:
        signum: the signal's name (``SIGUSR1``: what ``--signal=USR1@<s>`` sends to the job's steps).
    """

    def __init__(self, signum: str = "SIGUSR1") -> None:
        self.signum = getattr(signal, signum)
        self.flag = False
        self._at_epoch_start = False
        self._restore: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True  # acted on after the current step

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._trainer = trainer
        if os.environ.get("SLURM_JOB_ID"):
            signal.signal(self.signum, self._handle)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._restore is not None:  # resumed: the generators as they were when the checkpoint was written
            _set_states(self._restore, _loaders(trainer))
            self._restore = None
        if self._at_epoch_start:
            self._requeue(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._at_epoch_start or not trainer.strategy.reduce_boolean_decision(self.flag, all=False):
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            self._at_epoch_start = True  # the epoch ended: checkpoint when the next one starts (exact resume)
        else:
            self._requeue(trainer)  # mid-epoch: Lightning restarts this epoch's loader on resume

    def _requeue(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(str(last), weights_only=False)
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
        if trainer.is_global_zero:
            log.warning("preempted: checkpoint at step %d (%s); requeueing job %s", trainer.global_step, last, job)
            subprocess.run(["scontrol", "requeue", job], check=False)
        while True:  # SLURM ends this job (TERM, then KILL) and starts it again
            time.sleep(1)

    def state_dict(self) -> dict[str, Any]:
        """The random generators' states, and the training loaders' shuffling generators."""
        return _states(_loaders(self._trainer))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore = dict(state)


def _loaders(trainer: L.Trainer | None) -> list[Any]:
    """The training DataLoaders (any nesting of lists/dicts) of a running fit."""
    found: list[Any] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                walk(o)
        elif obj is not None:
            found.append(obj)

    if trainer is not None:
        try:
            walk(trainer.train_dataloader)
        except Exception:  # no loaders yet
            pass
    return found


def _states(loaders: list[Any]) -> dict[str, Any]:
    np_state = np.random.get_state()
    gens = [getattr(dl, "generator", None) for dl in loaders]
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "loaders": [g.get_state() if isinstance(g, torch.Generator) else None for g in gens]}


def _set_states(state: dict[str, Any], loaders: list[Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), *py[2:]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    for dl, gen_state in zip(loaders, state.get("loaders") or []):
        if gen_state is not None and isinstance(getattr(dl, "generator", None), torch.Generator):
            dl.generator.set_state(gen_state)
