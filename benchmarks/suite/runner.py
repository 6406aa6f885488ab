"""Suite runner: methods × datasets × protocols × fractions × seeds → one results CSV.

A suite is YAML (packaged ``benchmarks/suites/<name>.yaml`` or a path); see README "Benchmark suites".
Every unit is skipped on rerun when its rows exist; pretraining resumes from its last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from medvlp.benchmarks.suite.experiments import write_experiment
from medvlp.benchmarks.kit.features import FeatureCache, model_fingerprint, trim_heap
from medvlp.benchmarks.suite.paper_view import model_fields, pretrain_data_of, row_fields
from medvlp.benchmarks.kit.protocol import RUNNER_KEYS, EvalContext, split_protocol_entry
from medvlp.benchmarks.suite.results import ResultStore, unit_name
from medvlp.benchmarks.suite.schema import check_suite, load_suite  # noqa: F401  (load_suite: public here too)
from medvlp.compose import compose, derive
from medvlp.config import persistable, to_container
from medvlp.io import atomic_write_text
from medvlp.method import load_method
from medvlp.paths import check_name, sanitize
from medvlp.pretrained.formats import load_ckpt_spec
from medvlp.progress import UnitProgress
from medvlp.provenance import provenance
from medvlp.registry import BENCHMARKS
from medvlp.train import build_datamodule_from_config, build_method, finished_run, pretrain
from medvlp.validate import ConfigError, raise_if

log = logging.getLogger(__name__)


def _config_hash(cfg: Any) -> str:
    """Hash of the run config as persisted (environment reads unresolved: no secret reaches a results row)."""
    return hashlib.sha1(json.dumps(persistable(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def method_config(suite: Mapping[str, Any], label: str, entry: Mapping[str, Any]) -> DictConfig:
    """The run config of one suite method entry, composed and checked in one pass.

    The suite's ``pretrain`` block and the entry's ``data``, ``init_args`` and ``trainer`` are layers of that
    pass (after the entry's ``overrides``); the run folder is ``<output>/runs/<label>`` with the suite's seed.
    Pretraining seeds derive their configs from this one (:func:`seed_config`) without another pass.

    Raises:
        ValueError: the suite sets ``run.weights_only_resume=false`` (only the command line may).
        medvlp.validate.ConfigError: a bad key or value, naming the entry.
    """
    args = [f"method={entry.get('method', label)}", f"preset={entry.get('preset', suite.get('preset', 'demo'))}"]
    if entry.get("data"):
        args.append(f"data={entry['data']['name']}")  # loads that datamodule's packaged defaults
    layers: list[tuple[str, Any]] = [("suite.pretrain", suite.get("pretrain") or {})]
    if entry.get("data"):
        layers.append((f"methods.{label}.data", {"data": entry["data"]}))
    if entry.get("init_args"):
        layers.append((f"methods.{label}.init_args", {"method": {"init_args": entry["init_args"]}}))
    if entry.get("trainer"):
        layers.append((f"methods.{label}.trainer", {"trainer": entry["trainer"]}))
    folder = check_name(label, "suite method label")  # a path component of <output>/runs/
    layers.append(("suite", {"run": {"dir": str(Path(suite["output"]) / "runs" / folder),
                                     "seed": int(suite.get("seed", 42))}}))
    try:
        cfg = compose(args + list(entry.get("overrides", [])), layers=layers)
    except ConfigError as exc:
        raise ConfigError(f"methods.{label}: {exc}") from None
    if OmegaConf.select(cfg, "run.weights_only_resume", default=True) is False:
        raise ValueError(f"suite {suite.get('name')!r}, method {label!r}: a suite cannot set "
                         "run.weights_only_resume=false; only the command line can "
                         "(medvlp benchmark suite=... run.weights_only_resume=false)")
    return derive(cfg, {"run.weights_only_resume": bool(suite.get(UNSAFE_RESUME_KEY, True))})


def seed_config(cfg: DictConfig, seed: int | None) -> DictConfig:
    """The entry's config for pretraining seed ``seed`` (``runs/<label>/seed<seed>``, ``run.seed=seed``);
    ``None``: the entry's own config."""
    if seed is None:
        return cfg
    return derive(cfg, {"run.dir": str(Path(cfg.run.dir) / f"seed{seed}"), "run.seed": int(seed)})


#: suite key set only by ``medvlp benchmark`` from the command line (never read from a suite file)
UNSAFE_RESUME_KEY = "_cli_weights_only_resume"


def obtain_model(entry: Mapping[str, Any], label: str, cfg: DictConfig | None,
                 load: bool = True) -> tuple[Any, str, str]:
    """Return ``(model, checkpoint, config_hash)`` for a suite method entry (pretraining if needed).

    Args:
        entry: the suite's method entry.
        label: its label.
        cfg: its checked run config for one pretraining seed (:func:`seed_config`); ``None`` for an entry
            that names a checkpoint (``ckpt``).
        load: False: pretrain (if needed) without loading the checkpoint back; the model is then ``None``.
    """
    if entry.get("ckpt"):  # a medvlp checkpoint path or {format, path} of a released model
        model, desc = load_ckpt_spec(entry["ckpt"], allow_class_path=bool(entry.get("allow_class_path", False)))
        return model, desc, "external"
    assert cfg is not None
    chash = _config_hash(cfg)
    if entry.get("pretrain", True) is False:
        L.seed_everything(int(cfg.run.seed))
        dm = build_datamodule_from_config(to_container(cfg))
        return build_method(to_container(cfg), dm).eval(), "random-init", chash
    done = finished_run(cfg)  # the same resume rule as pretrain(): a run of another config is an error
    if done is not None:
        ckpt = done
        log.info("%s: pretraining already finished (%s)", label, ckpt)
    else:
        log.info("%s: pretraining (%s steps)", label, cfg.trainer.max_steps)
        ckpt = pretrain(cfg)
    return (load_method(str(ckpt)) if load else None), str(ckpt), chash


def describe_backbone(model: Any) -> str:
    """Short description of the image backbone, e.g. ``ViTEncoder(d=192, L=12)``."""
    enc = model.image_backbone()
    parts = [f"d={enc.embed_dim}"] if hasattr(enc, "embed_dim") else []
    if hasattr(enc, "blocks"):
        parts.append(f"L={len(enc.blocks)}")
    return f"{type(enc).__name__}({', '.join(parts)})" if parts else type(enc).__name__


def _protocols(suite: Mapping[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    """``(key, protocol, runner keys + the protocol's own parameters)`` of each protocol entry."""
    out = []
    for key, params in suite["protocols"].items():
        name, runner, own = split_protocol_entry(key, params)
        out.append((key, BENCHMARKS.get(name)(), {**runner, **own}))
    return out


def unit_seeds(proto: Any, params: Mapping[str, Any], fraction: float, quiet: bool = False) -> list[tuple[int, int]]:
    """``(subset_seed, training_seed)`` pairs to run for one fraction, without deterministic repeats.

    ``seeds`` are training seeds; ``subset_seeds`` draw the label subset (absent: each training seed
    also draws its own subset). At fraction 1 every subset seed gives the whole train split, and a
    :attr:`~Protocol.deterministic` protocol ignores the training seed, so pairs that cannot change
    the result run once.
    """
    if not proto.uses_fractions:
        return [(0, 0)]
    seeds = [int(s) for s in params.get("seeds", [0])]
    subset = params.get("subset_seeds")
    pairs = [(int(ss), s) for ss in subset for s in seeds] if subset is not None else [(s, s) for s in seeds]
    out, seen = [], set()
    for ss, s in pairs:
        key = (None if float(fraction) >= 1 else ss, None if proto.deterministic else s)
        if key not in seen:
            seen.add(key)
            out.append((ss, s))
    if len(out) < len(pairs) and not quiet:
        log.info("%s at fraction %g: %d of %d seed pairs would repeat an identical run; running %d",
                 proto.name, fraction, len(pairs) - len(out), len(pairs), len(out))
    return out


def _n_units(proto: Any, params: Mapping[str, Any]) -> int:
    """(fraction, seed pair) units one protocol runs per model and dataset."""
    fractions = params.get("fractions", [1.0]) if proto.uses_fractions else [1.0]
    return sum(len(unit_seeds(proto, params, float(f), quiet=True)) for f in fractions)


def plan_methods(suite: Mapping[str, Any]) -> dict[str, DictConfig | None]:
    """Each method entry's run config, composed and checked once (``None`` for checkpoint entries)."""
    errors, plans = [], {}
    for label, entry in suite["methods"].items():
        entry = dict(entry or {})
        try:
            plans[label] = None if entry.get("ckpt") else method_config(suite, label, entry)
        except ConfigError as exc:
            errors.append(str(exc))
    raise_if(errors)
    return plans


def pretrain_seeds(suite: Mapping[str, Any], entry: Mapping[str, Any]) -> list[int | None]:
    """The pretraining seeds of a method entry (``[None]``: one run at the suite's seed)."""
    seeds = entry.get("pretrain_seeds", suite.get("pretrain_seeds"))
    return [None] if seeds is None or entry.get("ckpt") else [int(s) for s in seeds]


@dataclass(frozen=True)
class Arm:
    """One model of a suite: a method entry at one pretraining seed, and the evaluation units run on it.

    Attributes:
        label: the method entry's label.
        pseed: its pretraining seed (``None``: the suite's seed, one run).
        entry: the method entry.
        cfg: its checked run config (:func:`seed_config`); ``None`` for a checkpoint entry.
    """

    label: str
    pseed: int | None
    entry: Mapping[str, Any]
    cfg: DictConfig | None

    @property
    def key(self) -> str:
        """The arm's name on the command line (``only=<key>``): ``label`` or ``label@seed``."""
        return self.label if self.pseed is None else f"{self.label}@{self.pseed}"

    @property
    def pretrains(self) -> bool:
        """Whether obtaining the model trains one (not a checkpoint, not ``pretrain: false``)."""
        return self.cfg is not None and self.entry.get("pretrain", True) is not False

    @property
    def config_hash(self) -> str:
        """The hash its result rows carry (``external`` for a checkpoint entry)."""
        return "external" if self.cfg is None else _config_hash(self.cfg)


def plan_arms(suite: Mapping[str, Any], only: Sequence[str] | None = None) -> list[Arm]:
    """The suite's arms in order, each method entry composed and checked once (:func:`plan_methods`).

    Args:
        suite: a loaded suite.
        only: arm keys (:attr:`Arm.key`) to keep; ``None``: all.

    Raises:
        ValueError: an ``only`` key names no arm (with the arm keys).
    """
    plans = plan_methods(suite)
    arms = [Arm(label, pseed, dict(entry or {}), None if plans[label] is None else seed_config(plans[label], pseed))
            for label, entry in suite["methods"].items() for pseed in pretrain_seeds(suite, entry or {})]
    if only is None:
        return arms
    keys = [a.key for a in arms]
    unknown = [k for k in only if k not in keys]
    if unknown:
        raise ValueError(f"only={unknown}: not arms of suite {suite.get('name')!r} (arms: {', '.join(keys)})")
    return [a for a in arms if a.key in set(only)]


def pretraining_finished(cfg: DictConfig) -> bool:
    """Whether ``cfg``'s run folder holds a finished pretraining of this config (``summary.json`` with
    ``max_steps`` steps and ``checkpoints/last.ckpt``, under :func:`medvlp.train.finished_run`'s resume rule)."""
    return finished_run(cfg) is not None


@dataclass
class SuiteRun:
    """What every arm's evaluation shares: the results store, the feature cache, the built datasets and the
    protocols (built once per process by :func:`prepare_run`)."""

    suite: Mapping[str, Any]
    device: str
    store: ResultStore
    cache: FeatureCache
    datasets: dict[str, Any]
    only: dict[str, set]
    protocols: list
    per_model: dict[tuple[str, str], int]
    progress: UnitProgress
    prov: Any


def prepare_run(suite: Mapping[str, Any], device: str | None, n_arms: int) -> SuiteRun:
    """Build the store, cache, datasets (``prepare_data`` run) and protocols for evaluating ``n_arms`` arms."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(suite["output"])
    protocols = _protocols(suite)
    datasets = {k: build_datamodule_from_config({"data": {kk: vv for kk, vv in v.items() if kk != "protocols"}})
                for k, v in suite["datasets"].items()}
    only = {k: set(v["protocols"]) for k, v in suite["datasets"].items() if v.get("protocols")}
    for dm in datasets.values():
        dm.prepare_data()
    per_model = {(ds, key): _n_units(proto, params) for ds in datasets for key, proto, params in protocols
                 if not (ds in only and key not in only[ds])}
    return SuiteRun(suite, device, ResultStore(out / "results.csv"), FeatureCache(out / "features"), datasets, only,
                    protocols, per_model, UnitProgress(sum(per_model.values()) * n_arms), provenance(device))


def pretrain_arm(arm: Arm, requeue: bool = False) -> str:
    """Pretrain one arm (or find its finished pretraining); returns the checkpoint path (``""`` for an arm
    that does not pretrain).

    Args:
        arm: the arm.
        requeue: add :class:`~medvlp.benchmarks.suite.launch.requeue.RequeueOnSignal` to its trainer (a
            SLURM job: checkpoint and requeue on ``SIGUSR1``). The arm's config hash is unchanged.
    """
    if not arm.pretrains:
        return ""
    cfg = arm.cfg
    if requeue and not pretraining_finished(cfg):
        plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        callbacks = OmegaConf.select(plain, "trainer.callbacks", default=None)
        callbacks = [] if callbacks is None else list(OmegaConf.to_container(callbacks)) \
            if OmegaConf.is_list(callbacks) else [OmegaConf.to_container(callbacks)]
        OmegaConf.update(plain, "trainer.callbacks", callbacks + [{"class_path": REQUEUE_CALLBACK}], merge=False)
        cfg = plain  # not marked checked: pretrain() validates it (the callback's class included)
    _model, ckpt, _ = obtain_model(arm.entry, arm.label, cfg, load=False)
    return ckpt


#: the callback a SLURM pretraining job adds (class path: the core imports nothing from here)
REQUEUE_CALLBACK = "medvlp.benchmarks.suite.launch.requeue.RequeueOnSignal"


def arm_marker(suite: Mapping[str, Any], arm: Arm) -> Path:
    """``<output>/arms/<arm>.json``: written when every evaluation unit of the arm has its results."""
    name = sanitize(arm.key, "arm")
    return Path(suite["output"]) / "arms" / f"{name}-{hashlib.sha1(arm.key.encode()).hexdigest()[:8]}.json"


def arm_plan_hash(suite: Mapping[str, Any], arm: Arm) -> str:
    """What an arm's evaluation depends on: its config hash, its entry, the datasets and the protocols."""
    plan = {"config_hash": arm.config_hash, "entry": arm.entry, "datasets": suite["datasets"],
            "protocols": suite["protocols"]}
    return hashlib.sha1(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:12]


def arm_done(suite: Mapping[str, Any], arm: Arm, store: ResultStore) -> bool:
    """Whether an arm's evaluation finished for its current plan and all its units' results exist."""
    marker = arm_marker(suite, arm)
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())
    return done.get("plan") == arm_plan_hash(suite, arm) and \
        all((store.units_dir / f"{name}.json").is_file() for name in done.get("units", []))


def evaluate_arm(run: SuiteRun, arm: Arm) -> None:
    """Obtain one arm's model (pretraining if needed), run its evaluation units that have no results yet, and
    mark the arm done (:func:`arm_marker`)."""
    model, ckpt, chash = obtain_model(arm.entry, arm.label, arm.cfg)
    names = _evaluate_model(run.suite, run.store, run.cache, run.datasets, run.only, run.protocols, arm.label, arm.entry,
                    model, ckpt, chash, "" if arm.pseed is None else arm.pseed, run.device, run.progress,
                    run.per_model, run.prov,
                    data_cfg=None if arm.cfg is None or ckpt == "random-init" else arm.cfg.get("data"))
    atomic_write_text(arm_marker(run.suite, arm), json.dumps({"arm": arm.key, "plan": arm_plan_hash(run.suite, arm),
                                                              "units": names}))
    run.cache.release(model)  # its cached features/maps leave memory; then the model itself, before the next
    del model  # arm pretrains (the disk cache keeps everything for reruns)
    trim_heap()


#: what ``stage=`` runs of each arm: pretraining only, or everything (pretraining if needed, then evaluation)
STAGES = ("all", "pretrain")


def run_suite(suite: Mapping[str, Any], device: str | None = None, only: Sequence[str] | None = None,
              stage: str = "all", requeue: bool = False) -> Path:
    """Run every unit of ``suite`` (or of the arms ``only`` names) in this process; returns the results CSV.

    The suite's keys and every method entry's run config are checked before any work, each once.

    Args:
        suite: a loaded suite.
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        only: arm keys (:attr:`Arm.key`) to run; ``None``: every arm.
        stage: ``all`` (pretrain if needed, then evaluate) or ``pretrain`` (pretraining only: a SLURM
            launcher's first job of an arm).
        requeue: pretraining checkpoints and requeues its SLURM job on ``SIGUSR1`` (:func:`pretrain_arm`).
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {', '.join(STAGES)}")
    check_suite(suite)
    arms = plan_arms(suite, only)
    write_experiment(suite)  # an experiment's claims, checked against the suite, beside its results
    store_path = Path(suite["output"]) / "results.csv"
    if stage == "pretrain":
        for arm in arms:
            pretrain_arm(arm, requeue)
        return store_path
    run = prepare_run(suite, device, len(arms))
    for arm in arms:
        evaluate_arm(run, arm)
    log.info("feature cache: %d hits, %d misses", run.cache.hits, run.cache.misses)
    return run.store.path


def _evaluate_model(suite: Mapping[str, Any], store: ResultStore, cache: FeatureCache, datasets: Mapping[str, Any],
                    only: Mapping[str, set], protocols: list, label: str, entry: Mapping[str, Any], model: Any,
                    ckpt: str, chash: str, pseed: int | str, device: str, progress: UnitProgress | None = None,
                    per_model: Mapping[tuple[str, str], int] | None = None, prov: Any = None,
                    data_cfg: Any = None) -> list[str]:
    """Run one model's evaluation units that have no results; returns every unit's name (run or found)."""
    names: list[str] = []
    progress = progress or UnitProgress(0)
    per_model = per_model or {}
    weights = model_fingerprint(model)  # once per model; the feature cache reuses it
    cache.pin(model, weights)
    mfields = model_fields(model, pretrain_data_of(entry, to_container(data_cfg) if data_cfg is not None else None, ckpt))
    backbone = describe_backbone(model)
    method = getattr(model, "name", None) or entry.get("method", label)
    if entry.get("auto_label"):
        label = f"{method} {backbone}"
    enc_dims = getattr(model.image_backbone(), "spatial_dims", None)
    for ds_name, dm in datasets.items():
        if enc_dims is not None and dm.spatial_dims not in enc_dims:
            log.info("%s on %s: skipped (encoder supports %sD, data is %dD)", label, ds_name, list(enc_dims), dm.spatial_dims)
            progress.step(f"{label} {ds_name}: skipped", n=sum(n for k, n in per_model.items() if k[0] == ds_name))
            continue
        store.drop_stale({"weights": weights, "config_hash": chash, "dataset_version": dm.dataset_version},
                         label=label, dataset=ds_name, pretrain_seed=pseed)
        for key, proto, params in protocols:
            if ds_name in only and key not in only[ds_name]:
                continue
            if entry.get("protocols") is not None and key not in entry["protocols"]:
                progress.step(f"{label} {ds_name} {key}: not run for this method", n=per_model.get((ds_name, key), 0))
                continue
            own = {k: v for k, v in params.items() if k not in RUNNER_KEYS}
            ctx = EvalContext(model, dm, cache, own, device, Path(suite["output"]))
            reason = proto.applicable(ctx)
            if reason:
                log.info("%s on %s: %s skipped (%s)", label, ds_name, key, reason)
                progress.step(f"{label} {ds_name} {key}: skipped", n=per_model.get((ds_name, key), 0))
                continue
            fractions = params.get("fractions", [1.0]) if proto.uses_fractions else [1.0]
            pjson = json.dumps(own, sort_keys=True)
            for fraction in fractions:
                for subset_seed, seed in unit_seeds(proto, params, float(fraction)):
                    unit = dict(label=label, dataset=ds_name, protocol=key, params=pjson, fraction=fraction,
                                pretrain_seed=pseed, subset_seed=subset_seed, seed=seed, weights=weights,
                                config_hash=chash, dataset_version=dm.dataset_version)
                    names.append(unit_name(unit))
                    if store.done(**unit):
                        progress.step(f"{label} {ds_name} {key}: done before", quiet=True)
                        continue
                    t0 = time.time()
                    ctx.subset_seed = subset_seed
                    res = proto.run(ctx, float(fraction), int(seed))
                    log.info("%s %s %s f=%g s=%d/%d: %s (%.1fs)", label, ds_name, key, fraction, subset_seed, seed,
                             ", ".join(f"{v.metric}={v.value:.3f}" for v in res.values), time.time() - t0)
                    for flag in res.flags:
                        log.warning("%s %s %s f=%g: %s", label, ds_name, key, fraction, flag)
                    now = time.strftime("%Y-%m-%dT%H:%M:%S")
                    comp = json.dumps({**mfields, **row_fields(proto, params, dm, res), "provenance": prov},
                                      sort_keys=True, default=str)
                    store.add([{**unit, "comparability": comp, "suite": suite["name"], "method": method, "backbone": backbone,
                                "protocol_name": proto.name, "checkpoint": ckpt, "split_hash": res.split_hash,
                                "metric": v.metric, "value": v.value, "definition": v.definition,
                                "flags": " | ".join(res.flags), "timestamp": now}
                               for v in res.values], res.samples, res.recipes)
                    progress.step(f"{label} {ds_name} {key} f={fraction:g} s={subset_seed}/{seed}", time.time() - t0)
    cache.unpin(model)
    return names


def evaluation_suite(ckpt: Any, data: Any, protocols: Sequence[str], protocol_params: Mapping[str, Any],
                     out: str, label: str | None = None, allow_class_path: bool = False) -> dict[str, Any]:
    """The one-checkpoint suite of ``medvlp evaluate``: rows are labelled ``"<method> <backbone>"`` from the
    checkpoint's metadata unless ``label`` is given."""
    data = {"name": data} if isinstance(data, str) else dict(data)
    return {
        "name": "evaluate",
        "output": str(out),
        "methods": {str(label or "checkpoint"): {"ckpt": ckpt, "auto_label": label is None,
                                                 "allow_class_path": allow_class_path}},
        "datasets": {data["name"]: data},
        "protocols": {p: dict((protocol_params or {}).get(p) or {}) for p in protocols},
    }
