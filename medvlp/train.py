"""Build a datamodule + method from a config and pretrain with resumable, atomic checkpoints."""
from __future__ import annotations

import inspect
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Mapping

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from omegaconf import DictConfig

from medvlp import noise, validate
from medvlp.compose import DEFAULTS, is_checked
from medvlp.config import instantiate, persistable, save_config, to_container
from medvlp.io import atomic_torch_save, atomic_write_text
from medvlp.method import VLPMethod
from medvlp.pretrained.init import load_initial_weights
from medvlp.provenance import provenance
from medvlp.scale import build_strategy
from medvlp.registry import METHODS, build_datamodule

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes through a temp file and ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, Path(path))


class StepProgressBar(RichProgressBar):
    """Rich progress bar whose description reads ``Epoch k`` (not ``Epoch k/-2``) when training is bounded
    by ``max_steps`` (``max_epochs=-1``), and ``Epoch k/E`` otherwise; its total is the batches this epoch
    will run (Lightning caps it at ``max_steps``)."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        desc = f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs is not None and max_epochs > 0 else "")
        return f"{desc:{len(self.validation_description)}}"


def _specs(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build_loggers(value: Any, out: Path, run_name: str) -> list[Logger]:
    """Loggers for ``trainer.logger``: unset/``true`` → CSV under ``<run>/logs``; ``false`` → none; a
    shorthand ``csv|tensorboard|wandb``, a ``{class_path, init_args}`` spec, or a list of them.

    TensorBoard writes under ``<run>/tensorboard``; W&B under ``<run>/wandb`` (project ``medvlp``, offline
    when ``WANDB_MODE=offline``). Both are optional extras (``pip install medvlp[tensorboard]`` / ``[wandb]``).
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if value is None or value is True:
        value = ["csv"]
    loggers: list[Logger] = []
    for item in _specs(value):
        if item == "csv":
            loggers.append(CSVLogger(str(out), name="logs"))
        elif item == "tensorboard":
            _require("tensorboard", ("tensorboard", "tensorboardX"), "tensorboard")
            loggers.append(TensorBoardLogger(str(out), name="tensorboard"))
        elif item == "wandb":
            _require("wandb", ("wandb",), "wandb")
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            loggers.append(WandbLogger(name=run_name, project="medvlp", save_dir=str(out)))
        else:
            loggers.append(instantiate(item, expected=Logger))
    return loggers


def _require(what: str, modules: tuple[str, ...], extra: str) -> None:
    import importlib.util

    if not any(importlib.util.find_spec(m) is not None for m in modules):
        raise ImportError(f"logger={what} needs the {' or '.join(modules)} package: pip install 'medvlp[{extra}]'")


def build_callbacks(trainer_cfg: Mapping[str, Any], run_cfg: Mapping[str, Any], ckpt_dir: Path,
                    has_logger: bool) -> list[Callback]:
    """medvlp's checkpointing, then ``trainer.callbacks`` specs, a learning-rate monitor (``run.lr_monitor``,
    only with a logger) and the step-aware progress bar (unless the config brings its own)."""
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                        every_n_train_steps=int(run_cfg["checkpoint_every_n_steps"]), save_on_train_epoch_end=True)
    ]
    callbacks += extra_checkpoints(run_cfg, ckpt_dir)
    callbacks += [instantiate(s, expected=Callback) for s in _specs(trainer_cfg.get("callbacks"))]
    if has_logger and run_cfg.get("lr_monitor", True) and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if trainer_cfg.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())
    return callbacks


def extra_checkpoints(run_cfg: Mapping[str, Any], ckpt_dir: Path) -> list[Callback]:
    """``last.ckpt`` also every ``run.checkpoint_every_n_minutes`` of training time and every
    ``run.checkpoint_every_n_epochs`` epochs (each unset or 0 = off), besides the step interval."""
    from datetime import timedelta

    out: list[Callback] = []
    minutes, epochs = run_cfg.get("checkpoint_every_n_minutes"), run_cfg.get("checkpoint_every_n_epochs")
    if minutes:
        out.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                   train_time_interval=timedelta(minutes=float(minutes))))
    if epochs:
        out.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_epochs=int(epochs),
                                   save_on_train_epoch_end=True))
    return out


def build_plugins(trainer_cfg: Mapping[str, Any]) -> list[Any]:
    """``trainer.plugins`` specs plus the atomic checkpoint writer (unless a CheckpointIO is given)."""
    plugins = [instantiate(s, expected=validate.trainer_plugin_bases()) for s in _specs(trainer_cfg.get("plugins"))]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def build_datamodule_from_config(cfg: Mapping[str, Any]) -> Any:
    """Instantiate ``cfg.data``."""
    return build_datamodule(to_container(cfg["data"]))


def build_method(cfg: Mapping[str, Any], datamodule: Any | None = None) -> VLPMethod:
    """Instantiate ``cfg.method`` for training, filling unset image-encoder keys from the datamodule's
    ``encoder_hints()`` and unset method arguments from its ``method_hints()`` (e.g. ``class_names``), then
    load the encoders' ``init_from`` files (:func:`medvlp.pretrained.init.load_initial_weights`)."""
    spec = to_container(cfg["method"])
    cls = METHODS.get(spec["name"])
    kwargs = dict(spec.get("init_args") or {})
    if datamodule is not None:
        enc = dict(kwargs.get("image_encoder") or {})
        target = enc.get("init_args", enc) if "class_path" in enc else enc
        for k, v in datamodule.encoder_hints().items():
            target.setdefault(k, v)
        kwargs["image_encoder"] = enc
        accepted = inspect.signature(cls.__init__).parameters
        for k, v in datamodule.method_hints().items():
            if k in accepted and kwargs.get(k) is None:
                kwargs[k] = v
    method = cls(**kwargs)
    load_initial_weights(method)
    return method


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU multiplies bf16 in hardware (``avx512_bf16`` or ``amx_bf16`` in
    ``/proc/cpuinfo``); False where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: Any, accelerator: Any = "auto") -> Any:
    """Lightning precision for ``trainer.precision``; ``"auto"`` picks ``"bf16-mixed"`` where bf16 is
    native (a CUDA GPU that supports it, or a CPU with bf16 instructions) and ``"32-true"`` elsewhere.
    Other values pass through unchanged."""
    if precision != "auto":
        return precision
    import torch

    accel = str(accelerator or "auto")
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if accel in ("auto", "cpu"):
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "32-true"


def run_dir(cfg: Mapping[str, Any]) -> Path:
    """``run.dir`` as given, or ``<run.root>/<method>_<data>[-<modality>]``.

    The derived name uses only the method and datamodule names (and a known modality), read from the
    config with environment reads unresolved (:func:`~medvlp.config.persistable`) and reduced to
    ``[A-Za-z0-9._-]``, so no environment value can become part of a folder name.
    """
    r = cfg["run"]
    if r.get("dir"):
        return Path(str(to_container(r["dir"])))
    names = persistable(cfg)
    data = names["data"]
    tag = _safe_name(data["name"])
    modality = (data.get("init_args") or {}).get("modality")
    if modality in KNOWN_MODALITIES:
        tag = f"{tag}-{modality}"
    return Path(str(to_container(r.get("root", "runs")))) / f"{_safe_name(str(names['method']['name']).split('.')[-1])}_{tag}"


KNOWN_MODALITIES = ("xray", "ct", "mri", "em", "mixed")


def _safe_name(name: Any) -> str:
    text = str(name)
    if "${" in text:
        return "env"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def pretrain(cfg: DictConfig) -> Path:
    """Pretrain per ``cfg``; returns the final checkpoint path.

    The resolved config is saved as ``<run>/config.yaml``. Checkpoints go to ``<run>/checkpoints``
    (``last.ckpt`` every ``run.checkpoint_every_n_steps`` and at the end, written atomically). With
    ``run.resume`` a rerun continues from ``last.ckpt`` (loaded with ``weights_only=True``).
    """
    noise.install()  # known-harmless third-party messages off; real warnings stay
    if not is_checked(cfg):  # a config built by hand; one from compose() was checked there
        validate.check_config(cfg, DEFAULTS)
    c = to_container(cfg)
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")  # environment reads stay unresolved on disk
    if not c["run"].get("weights_only_resume", True):
        log.warning("run.weights_only_resume=false: resuming will unpickle %s/checkpoints/last.ckpt, which can "
                    "run code; use this only for checkpoints you wrote yourself", out)
    L.seed_everything(int(c["run"]["seed"]), workers=True)
    dm = build_datamodule_from_config(c)
    method = build_method(c, dm)
    ckpt_dir = out / "checkpoints"
    trainer_kwargs = {k: v for k, v in c["trainer"].items() if v is not None and k not in ("logger", "callbacks", "plugins")}
    trainer_kwargs["strategy"] = build_strategy(trainer_kwargs.get("strategy", "auto"))  # FSDP/DDP from YAML
    if "precision" in trainer_kwargs:
        trainer_kwargs["precision"] = resolve_precision(trainer_kwargs["precision"], trainer_kwargs.get("accelerator"))
        log.info("precision: %s", trainer_kwargs["precision"])
    loggers = build_loggers(c["trainer"].get("logger"), out, out.name)
    trainer = L.Trainer(default_root_dir=str(out), logger=loggers or False,
                        callbacks=build_callbacks(c["trainer"], c["run"], ckpt_dir, bool(loggers)),
                        plugins=build_plugins(c["trainer"]), **trainer_kwargs)
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if (c["run"]["resume"] and last.is_file()) else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    start = time.time()
    trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path,
                weights_only=bool(c["run"].get("weights_only_resume", True)) if ckpt_path else None)
    trainer.save_checkpoint(str(last), weights_only=False)  # full state: a rerun resumes from it
    skipped = dm.skip_report() if hasattr(dm, "skip_report") else {}
    if skipped:
        log.warning("skipped samples under the datamodule's policy: %s", skipped)
    names = persistable(cfg)
    summary = {"method": names["method"]["name"], "data": names["data"]["name"], "steps": trainer.global_step,
               "seconds": round(time.time() - start, 2), "checkpoint": str(last),
               "precision": str(trainer_kwargs.get("precision", "32-true")),
               "train_loss": _metric(trainer, "train/loss_epoch"), "skipped": skipped,
               "provenance": provenance(trainer.strategy.root_device)}
    if trainer.is_global_zero:  # under DDP every rank returns here; one writes the summary
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return last


def _metric(trainer: L.Trainer, key: str) -> float | None:
    v = trainer.callback_metrics.get(key)
    return float(v) if v is not None else None
