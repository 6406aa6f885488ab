"""Build a datamodule + method from a config and pretrain with resumable, atomic checkpoints."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
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
from medvlp.paths import check_name, sanitize
from medvlp.pretrained.init import load_initial_weights
from medvlp.provenance import provenance
from medvlp.scale import build_strategy
from medvlp.registry import METHODS, build_datamodule
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
import importlib.util
from datetime import timedelta
import torch
from omegaconf import OmegaConf
from lightning.pytorch.profilers import Profiler

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
    load the encoders' ``init_from`` files (:func:`medvlp.pretrained.init.load_initial_weights`).

    Arguments whose value reads the environment are stored in the method's hyperparameters (``hparams.yaml``,
    checkpoints) as the literal ``${oc.env:NAME}`` (:meth:`VLPMethod.persist_hparams`), never resolved.
    """
    cls = METHODS.get(to_container(cfg["method"])["name"])
    kwargs = _method_kwargs(to_container(cfg["method"]), cls, datamodule)
    method = cls(**kwargs)
    stored = _method_kwargs(persistable(cfg)["method"], cls, datamodule)
    method.persist_hparams({k: stored.get(k) for k, v in kwargs.items() if stored.get(k) != v})
    load_initial_weights(method)
    return method


def _method_kwargs(spec: Mapping[str, Any], cls: Any, datamodule: Any | None) -> dict[str, Any]:
    kwargs = dict(spec.get("init_args") or {})
    if datamodule is not None and isinstance(kwargs.get("image_encoder") or {}, Mapping):  # str: ${oc.env:...}
        enc = dict(kwargs.get("image_encoder") or {})
        target = enc.get("init_args", enc) if "class_path" in enc else enc
        for k, v in datamodule.encoder_hints().items():
            target.setdefault(k, v)
        kwargs["image_encoder"] = enc
        accepted = inspect.signature(cls.__init__).parameters
        for k, v in datamodule.method_hints().items():
            if k in accepted and kwargs.get(k) is None:
                kwargs[k] = v
    return kwargs


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

    accel = str(accelerator or "auto")
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if accel in ("auto", "cpu"):
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "32-true"


def run_dir(cfg: Mapping[str, Any]) -> Path:
    """``run.dir`` as given, else ``<run.root>/<run.name>``, else ``<run.root>/<method>_<data>[-<modality>]-<hash>``.

    The derived name uses only the method and datamodule names (and a known modality), read from the
    config with environment reads unresolved (:func:`~medvlp.config.persistable`) and reduced to
    ``[A-Za-z0-9._-]``, so no environment value can become part of a folder name; ``<hash>`` is a short
    hash of the whole ``data`` block, so the same method on two manifests of one datamodule gets two
    folders. ``run.name`` must be a safe path component (:func:`medvlp.paths.check_name`).
    """
    r = cfg["run"]
    if r.get("dir"):
        return Path(str(to_container(r["dir"])))
    root = Path(str(to_container(r.get("root", "runs"))))
    if r.get("name"):
        return root / check_name(persistable(cfg)["run"]["name"], "run.name")
    names = persistable(cfg)
    data = names["data"]
    tag = _safe_name(data["name"])
    modality = (data.get("init_args") or {}).get("modality")
    if modality in KNOWN_MODALITIES:
        tag = f"{tag}-{modality}"
    spec = hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:RUN_HASH_LENGTH]
    return root / f"{_safe_name(str(names['method']['name']).split('.')[-1])}_{tag}-{spec}"


KNOWN_MODALITIES = ("xray", "ct", "mri", "em", "mixed")
#: hex digits of the data-spec hash in a derived run folder name
RUN_HASH_LENGTH = 8
#: config keys (and key prefixes) a resumed run may change: how long it trains, logging, devices and the run
#: folder's own bookkeeping. Any other difference from the stored ``config.yaml`` refuses to resume.
RESUME_EXEMPT_KEYS = (
    "trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "trainer.log_every_n_steps", "trainer.logger",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.profiler", "trainer.devices",
    "trainer.num_nodes", "trainer.accelerator", "trainer.strategy", "trainer.callbacks",
    "run.dir", "run.root", "run.name", "run.resume", "run.overwrite", "run.weights_only_resume", "run.lr_monitor",
    "run.checkpoint_every_n_steps", "run.checkpoint_every_n_minutes", "run.checkpoint_every_n_epochs",
)
#: the files of a run that ``run.overwrite=true`` (or ``run.resume=false``) moves aside before a fresh start
RUN_FILES = ("config.yaml", "summary.json", "checkpoints", "logs", "tensorboard", "wandb")


def _safe_name(name: Any) -> str:
    text = str(name)
    if "${" in text:
        return "env"
    return sanitize(text, "run")


def _exempt(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_EXEMPT_KEYS)


def _flat(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, Mapping) and x:
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: x}


def resume_view(cfg: Any) -> dict[str, Any]:
    """The keys of a run config that must match for a resume (dotted key → value, environment reads
    unresolved, :data:`RESUME_EXEMPT_KEYS` left out)."""
    return {k: v for k, v in _flat(persistable(cfg)).items() if not _exempt(k)}


def resume_hash(cfg: Any) -> str:
    """Hash of :func:`resume_view`: equal for two configs exactly when one run may resume the other."""
    return hashlib.sha1(json.dumps(resume_view(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def resume_mismatch(out: Path, cfg: Any) -> str | None:
    """Why the run in ``out`` cannot be resumed with ``cfg`` (the differing keys, both values), or ``None``
    when it can (no stored config, or the same :func:`resume_hash`)."""
    stored_path = out / "config.yaml"
    if not stored_path.is_file():
        return None

    try:
        stored = OmegaConf.to_container(OmegaConf.load(stored_path), resolve=False)
    except Exception as exc:  # noqa: BLE001 - a damaged config.yaml never resumes blindly
        return f"its config.yaml cannot be read ({type(exc).__name__})"
    old, new = resume_view(stored), resume_view(cfg)
    if resume_hash(stored) == resume_hash(cfg):
        return None
    diff = sorted((k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>")),
                  key=lambda k: (k.count(".") > 1, k))  # data.name / method.name first
    shown = "; ".join(f"{k}: {_short(old.get(k, '<unset>'))} (stored) vs {_short(new.get(k, '<unset>'))} (new)"
                      for k in diff[:3])
    rest = diff[3:]
    return shown + (f"; also {', '.join(rest[:12])}" + (f" and {len(rest) - 12} more" if len(rest) > 12 else "")
                    if rest else "")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def prepare_run_dir(cfg: Any, out: Path) -> bool:
    """Decide what happens to an existing run in ``out``; returns whether ``last.ckpt`` is resumed.

    ``run.resume`` (default) resumes only a run whose stored ``config.yaml`` matches ``cfg``
    (:func:`resume_mismatch`); a different run stops with one line naming both configs' differing keys and
    the ways out. ``run.overwrite=true`` or ``run.resume=false`` start fresh: the old run's files are moved
    into ``<out>/replaced-<UTC time>/`` (nothing is deleted) and a warning names that folder.

    Raises:
        ValueError: the stored run was made with a different config and neither option is given.
    """
    r = cfg["run"]
    last = out / "checkpoints" / "last.ckpt"
    existing = [out / n for n in RUN_FILES if (out / n).exists()]
    if not existing:
        return False
    fresh = bool(r.get("overwrite")) or not r.get("resume", True)
    if not fresh:
        why = resume_mismatch(out, cfg)
        if why is None:
            return last.is_file()
        if not last.is_file() and not (out / "summary.json").exists():
            fresh = True  # a config.yaml without a checkpoint (the run never got going): nothing to lose
        else:
            raise ValueError(
                f"{out} holds a run of a different config ({out / 'config.yaml'} vs this one: {why}); "
                f"pick another folder (run.name=NAME or run.dir=PATH), start over there keeping the old run "
                f"in {out}/replaced-* (run.overwrite=true), or do not resume (run.resume=false)")
    if fresh and _is_rank_zero():
        aside = out / time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime())
        n = 1
        while aside.exists():
            aside, n = out / f"{aside.name.split('.')[0]}.{n}", n + 1
        aside.mkdir(parents=True)
        for p in existing:
            os.replace(p, aside / p.name)
        why = "run.overwrite=true" if r.get("overwrite") else ("run.resume=false" if not r.get("resume", True)
                                                               else "an unfinished run of another config")
        log.warning("%s: starting a fresh run; the previous run's %s moved to %s", why,
                    ", ".join(p.name for p in existing), aside)
    return False


def finished_run(cfg: Any) -> Path | None:
    """``last.ckpt`` of a run of ``cfg`` that already trained ``trainer.max_steps`` steps, under the resume
    rule of :func:`prepare_run_dir`: ``None`` when there is none (or ``run.overwrite`` / ``run.resume=false``
    ask for a fresh run).

    Raises:
        ValueError: the folder holds a finished run of a different config (as :func:`prepare_run_dir`).
    """
    out = run_dir(cfg)
    r = cfg["run"]
    summary, last = out / "summary.json", out / "checkpoints" / "last.ckpt"
    if r.get("overwrite") or not r.get("resume", True) or not (summary.is_file() and last.is_file()):
        return None
    try:
        steps = int(json.loads(summary.read_text()).get("steps", 0))
    except (ValueError, AttributeError):
        return None
    if steps < int(cfg["trainer"]["max_steps"]):
        return None
    why = resume_mismatch(out, cfg)
    if why is not None:
        prepare_run_dir(cfg, out)  # raises the one-line error naming the differing keys
    return last


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
    resume = prepare_run_dir(cfg, out)  # before config.yaml is rewritten: it is what a resume compares with
    save_config(cfg, out / "config.yaml")  # environment reads stay unresolved on disk
    if not c["run"].get("weights_only_resume", True):
        log.warning("run.weights_only_resume=false: resuming will unpickle %s/checkpoints/last.ckpt, which can "
                    "run code; use this only for checkpoints you wrote yourself", out)
    L.seed_everything(int(c["run"]["seed"]), workers=True)
    dm = build_datamodule_from_config(c)
    method = build_method(cfg, dm)  # the config itself: its environment reads are stored unresolved
    ckpt_dir = out / "checkpoints"
    trainer_kwargs = {k: v for k, v in c["trainer"].items() if v is not None and k not in ("logger", "callbacks", "plugins")}
    trainer_kwargs["strategy"] = build_strategy(trainer_kwargs.get("strategy", "auto"))  # FSDP/DDP from YAML
    if isinstance(trainer_kwargs.get("profiler"), Mapping):  # a {class_path, init_args} spec, checked first

        trainer_kwargs["profiler"] = instantiate(trainer_kwargs["profiler"], expected=Profiler)
    if "precision" in trainer_kwargs:
        trainer_kwargs["precision"] = resolve_precision(trainer_kwargs["precision"], trainer_kwargs.get("accelerator"))
        log.info("precision: %s", trainer_kwargs["precision"])
    loggers = build_loggers(c["trainer"].get("logger"), out, out.name)
    trainer = L.Trainer(default_root_dir=str(out), logger=loggers or False,
                        callbacks=build_callbacks(c["trainer"], c["run"], ckpt_dir, bool(loggers)),
                        plugins=build_plugins(c["trainer"]), **trainer_kwargs)
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if resume else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    start = time.time()
    weights_only = bool(c["run"].get("weights_only_resume", True))
    try:
        trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path, weights_only=weights_only if ckpt_path else None)
    except pickle.UnpicklingError as exc:
        if not ckpt_path:
            raise
        raise ValueError(f"refusing to resume from {ckpt_path}: it is not a weights-only checkpoint (its pickle "
                         f"names {_unpickle_culprit(exc)}; nothing of it ran); move it away, or pass "
                         "run.weights_only_resume=false on the command line if you wrote it yourself") from None
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


def _unpickle_culprit(exc: BaseException) -> str:
    """What a refused pickle asked for (e.g. ``posix.system``), from torch's weights-only message."""
    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return m.group(1) if m else "objects that are not tensors or plain containers"


def _metric(trainer: L.Trainer, key: str) -> float | None:
    v = trainer.callback_metrics.get(key)
    return float(v) if v is not None else None
