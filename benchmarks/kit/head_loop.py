"""The one epoch loop of trainable-head protocols: train, validate each epoch, keep the best-validation
weights, stop early, restore the best weights before testing.

Reference protocols differ only in what they plug in (optimizer, schedule, loss, augmentation, monitored
quantity); :class:`HeadTrainer` holds those pieces so that a test can inspect exactly what was built,
and :func:`fit` runs them. This is Lightning's ``ModelCheckpoint(monitor=...)`` +
``EarlyStopping(patience=...)`` + ``trainer.test(ckpt_path="best")`` pattern that MGCA's
``mgca_finetuner.py`` and BenchX's configs use, without a Lightning ``Trainer`` per (fraction, seed).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from medvlp.progress import track

log = logging.getLogger(__name__)


@dataclass
class HeadTrainer:
    """Everything one trainable-head run is made of.

    Attributes:
        modules: the trainable modules whose weights are snapshotted at the best validation epoch.
        optimizer: built optimizer (its param groups say what trains with which lr).
        train_batches: callable returning the batches of one epoch (fresh augmentation each call).
        train_step: ``batch → loss`` in train mode (the loop calls backward and steps).
        validate: ``() → {name: value}`` on the validation split in eval mode; must hold ``monitor``.
        monitor: validation quantity to select on (``val_loss``, ``val_auc`` …).
        mode: ``min`` or ``max``.
        max_epochs: epoch budget. patience: epochs without improvement before stopping
            (``None`` = never stop early).
        scheduler: stepped after every optimizer step when given (``interval: step``).
        grad_clip: max global gradient norm (``None`` = no clipping).
        set_train_mode: called at the start of each epoch (e.g. keeps a frozen encoder in eval mode,
            as MGCA's ``on_train_batch_start``).
        eval_start: first epoch (1-based) after which validation runs; eval_interval: validate every
            this many epochs from there (BenchX ``eval_start``/``eval_interval``); patience then counts
            validations, not epochs. The last epoch is always validated.
    """

    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer
    train_batches: Callable[[int], Iterable[Any]]
    train_step: Callable[[Any], torch.Tensor]
    validate: Callable[[], dict[str, float]]
    monitor: str = "val_loss"
    mode: str = "min"
    max_epochs: int = 50
    patience: int | None = 10
    scheduler: Any = None
    grad_clip: float | None = None
    set_train_mode: Callable[[], None] | None = None
    eval_start: int = 1
    eval_interval: int = 1
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    """What :func:`fit` did: epochs run, the selected epoch (0-based) and the validation history."""

    epochs_run: int
    best_epoch: int
    best_value: float
    history: list[dict[str, float]]
    steps: int


def _better(value: float, best: float, mode: str) -> bool:
    if math.isnan(value):
        return False
    return value < best if mode == "min" else value > best


def fit(trainer: HeadTrainer) -> FitResult:
    """Run the loop; on return the modules hold the best-validation weights.

    Raises:
        KeyError: when ``validate`` does not return ``trainer.monitor``.
        ValueError: for an unknown ``mode``.
    """
    if trainer.mode not in ("min", "max"):
        raise ValueError(f"mode must be min|max, got {trainer.mode!r}")
    best = math.inf if trainer.mode == "min" else -math.inf
    best_state = [copy.deepcopy(m.state_dict()) for m in trainer.modules]
    best_epoch, since, steps, history, done = -1, 0, 0, [], 0
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    for epoch in track(range(trainer.max_epochs), trainer.max_epochs, "head epochs"):
        for m in trainer.modules:
            m.train()
        if trainer.set_train_mode is not None:
            trainer.set_train_mode()
        for batch in trainer.train_batches(epoch):
            loss = trainer.train_step(batch)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trainer.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, trainer.grad_clip)
            trainer.optimizer.step()
            if trainer.scheduler is not None:
                trainer.scheduler.step()
            steps += 1
        done = epoch + 1
        due = done >= trainer.eval_start and (done - trainer.eval_start) % max(trainer.eval_interval, 1) == 0
        if not due and done < trainer.max_epochs:
            continue
        for m in trainer.modules:
            m.eval()
        with torch.no_grad():
            metrics = dict(trainer.validate())
        if trainer.monitor not in metrics:
            raise KeyError(f"validation returned {sorted(metrics)}, not the monitored {trainer.monitor!r}")
        metrics["epoch"] = epoch
        history.append(metrics)
        value = float(metrics[trainer.monitor])
        if _better(value, best, trainer.mode):
            best, best_epoch, since = value, epoch, 0
            best_state = [copy.deepcopy(m.state_dict()) for m in trainer.modules]
        else:
            since += 1
            if trainer.patience is not None and since >= trainer.patience:
                log.info("early stop after epoch %d (%s best %.4f at epoch %d)", epoch, trainer.monitor, best, best_epoch)
                break
    for m, state in zip(trainer.modules, best_state):
        m.load_state_dict(state)
        m.eval()
    return FitResult(done, best_epoch, float(best), history, steps)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """medvlp's *clamped* warm-up cosine: linear warm-up over ``warmup_steps`` (``(step + 1) / warmup``),
    then cosine decay to ``min_ratio`` × base lr at ``total_steps``, where the factor then stays.

    Used by medvlp's own protocols. BenchX's scheduler differs (it is periodic after ``t_total``): see
    :func:`benchx_warmup_cosine`.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def benchx_warmup_cosine_factor(step: int, warmup_steps: int, t_total: int, cycles: float = 0.5) -> float:
    """BenchX's ``WarmupCosineScheduler.lr_lambda`` (``unifier/blocks/schedulers/WarmupCosineScheduler.py``
    L19-24 @ b874fa6): ``step / max(1, warmup)`` during warm-up (0 at step 0), then
    ``max(0, 0.5·(1 + cos(π·2·cycles·progress)))`` with ``progress = (step − warmup) / max(1, t_total − warmup)``
    **not clamped**: after ``t_total`` the factor rises again (period ``2·(t_total − warmup)`` steps for
    ``cycles = 0.5``), e.g. 0.5 at step 4475 and 1.0 at step 5950 for warm-up 50, ``t_total`` 3000."""
    if step < warmup_steps:
        return float(step) / float(max(1.0, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, t_total - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress)))


def benchx_warmup_cosine(optimizer: torch.optim.Optimizer, t_total: int, warmup_steps: int,
                         cycles: float = 0.5) -> torch.optim.lr_scheduler.LambdaLR:
    """BenchX's *unclamped, periodic* warm-up cosine (:func:`benchx_warmup_cosine_factor`) as a
    ``LambdaLR`` stepped every optimizer step (BenchX ``TrainingScheduler.iteration_step``); as BenchX,
    the first step runs at factor 0."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: benchx_warmup_cosine_factor(step, warmup_steps, t_total, cycles))


def selection_fields(result: FitResult, trainer: HeadTrainer) -> dict[str, Any]:
    """What a result row records about checkpoint selection: ``selection: best_val``, the monitored
    validation quantity, the selected epoch (0-based) and the epochs run."""
    return {"selection": "best_val", "selection_monitor": trainer.monitor, "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run}


def selection_text(result: FitResult, trainer: HeadTrainer) -> str:
    """The selection as a phrase for a metric definition."""
    return (f"weights of the best validation epoch {result.best_epoch + 1} of {result.epochs_run} "
            f"({trainer.monitor} {result.best_value:.4g}, {trainer.mode})")
