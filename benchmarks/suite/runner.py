"""Suite runner: methods × datasets × protocols × fractions × seeds → one results CSV.

A suite is YAML (packaged ``benchmarks/suites/<name>.yaml`` or a path); see README "Benchmark suites".
Every unit is skipped on rerun when its rows exist; pretraining resumes from its last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from omegaconf import OmegaConf

from medvlp.benchmarks.suite.experiments import write_experiment
from medvlp.benchmarks.kit.features import FeatureCache, model_fingerprint, trim_heap
from medvlp.benchmarks.suite.paper_view import model_fields, pretrain_data_of, row_fields
from medvlp.benchmarks.kit.protocol import EvalContext
from medvlp.benchmarks.suite.results import ResultStore
from medvlp.compose import compose, split_args
from medvlp.config import load_yaml, merge, packaged_yaml, to_container
from medvlp.method import load_method
from medvlp.progress import UnitProgress
from medvlp.provenance import provenance
from medvlp.registry import BENCHMARKS
from medvlp.train import build_datamodule_from_config, build_method, pretrain

log = logging.getLogger(__name__)


def load_suite(name_or_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a packaged suite by name or a YAML path, applying dot-list overrides."""
    p = Path(name_or_path)
    cfg = load_yaml(p) if p.suffix in (".yaml", ".yml") or p.is_file() else packaged_yaml("medvlp.benchmarks.suites", name_or_path)
    if not cfg:
        raise FileNotFoundError(f"unknown suite {name_or_path!r} (no packaged suite or file of that name)")
    cfg = merge(cfg, overrides=overrides)
    suite = to_container(cfg)
    for key in ("methods", "datasets", "protocols"):
        if not suite.get(key):
            raise ValueError(f"suite {name_or_path!r} needs a non-empty {key!r} mapping")
    suite.setdefault("name", p.stem if p.suffix else name_or_path)
    suite.setdefault("output", f"results/{suite['name']}")
    return suite


def _config_hash(cfg: Any) -> str:
    return hashlib.sha1(json.dumps(to_container(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _method_config(suite: Mapping[str, Any], label: str, entry: Mapping[str, Any], seed: int | None = None,
                   run_name: str | None = None) -> Any:
    args = [f"method={entry.get('method', label)}", f"preset={entry.get('preset', suite.get('preset', 'demo'))}"]
    if entry.get("data"):
        args.append(f"data={entry['data']['name']}")  # loads that datamodule's packaged defaults
    cfg = compose(args + list(entry.get("overrides", [])))
    layers = [cfg, OmegaConf.create(suite.get("pretrain") or {})]
    if entry.get("data"):
        layers.append(OmegaConf.create({"data": entry["data"]}))
    if entry.get("init_args"):
        layers.append(OmegaConf.create({"method": {"init_args": entry["init_args"]}}))
    if entry.get("trainer"):
        layers.append(OmegaConf.create({"trainer": entry["trainer"]}))
    run_dir = Path(suite["output"]) / "runs" / label
    cfg = merge(*layers, overrides=[f"run.dir={run_dir / run_name if run_name else run_dir}",
                                    f"run.seed={suite.get('seed', 42) if seed is None else seed}"])
    if OmegaConf.select(cfg, "run.weights_only_resume", default=True) is False:
        raise ValueError(f"suite {suite.get('name')!r}, method {label!r}: a suite cannot set "
                         "run.weights_only_resume=false; only the command line can "
                         "(medvlp benchmark suite=... run.weights_only_resume=false)")
    return merge(cfg, overrides=[f"run.weights_only_resume={bool(suite.get(UNSAFE_RESUME_KEY, True))}"])


#: suite key set only by ``benchmark_command`` from the command line (never read from a suite file)
UNSAFE_RESUME_KEY = "_cli_weights_only_resume"


def obtain_model(suite: Mapping[str, Any], label: str, entry: Mapping[str, Any],
                 seed: int | None = None) -> tuple[Any, str, str]:
    """Return ``(model, checkpoint, config_hash)`` for a suite method entry (pretraining if needed).

    ``seed`` (one of the suite's ``pretrain_seeds``) pretrains into ``runs/<label>/seed<seed>`` with
    ``run.seed=seed``; ``None`` uses the suite's ``seed`` and ``runs/<label>``.
    """
    if entry.get("ckpt"):  # a medvlp checkpoint path or {format, path} of a released model
        from medvlp.pretrained.formats import load_ckpt_spec

        model, desc = load_ckpt_spec(entry["ckpt"], allow_class_path=bool(entry.get("allow_class_path", False)))
        return model, desc, "external"
    cfg = _method_config(suite, label, entry, seed, None if seed is None else f"seed{seed}")
    chash = _config_hash(cfg)
    if entry.get("pretrain", True) is False:
        L.seed_everything(int(cfg.run.seed))
        dm = build_datamodule_from_config(to_container(cfg))
        return build_method(to_container(cfg), dm).eval(), "random-init", chash
    out = Path(cfg.run.dir)
    summary = out / "summary.json"
    ckpt = out / "checkpoints" / "last.ckpt"
    if summary.is_file() and ckpt.is_file() and json.loads(summary.read_text()).get("steps", 0) >= int(cfg.trainer.max_steps):
        log.info("%s: pretraining already finished (%s)", label, ckpt)
    else:
        log.info("%s: pretraining (%s steps)", label, cfg.trainer.max_steps)
        ckpt = pretrain(cfg)
    return load_method(str(ckpt)), str(ckpt), chash


def describe_backbone(model: Any) -> str:
    """Short description of the image backbone, e.g. ``ViTEncoder(d=192, L=12)``."""
    enc = model.image_backbone()
    parts = [f"d={enc.embed_dim}"] if hasattr(enc, "embed_dim") else []
    if hasattr(enc, "blocks"):
        parts.append(f"L={len(enc.blocks)}")
    return f"{type(enc).__name__}({', '.join(parts)})" if parts else type(enc).__name__


def _protocols(suite: Mapping[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    out = []
    for key, params in suite["protocols"].items():
        params = dict(params or {})
        name = params.pop("protocol", key)
        proto_cls = BENCHMARKS.get(name)
        out.append((key, proto_cls(), params))
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


def run_suite(suite: Mapping[str, Any], device: str | None = None) -> Path:
    """Run every unit of ``suite``; returns the results CSV path."""
    from medvlp.validate import check_suite

    check_suite(suite, _method_config)  # every key and protocol parameter, before any work
    write_experiment(suite)  # an experiment's claims, checked against the suite, beside its results
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(suite["output"])
    store = ResultStore(out / "results.csv")
    cache = FeatureCache(out / "features")
    protocols = _protocols(suite)
    datasets = {k: build_datamodule_from_config({"data": {kk: vv for kk, vv in v.items() if kk != "protocols"}})
                for k, v in suite["datasets"].items()}
    only = {k: set(v["protocols"]) for k, v in suite["datasets"].items() if v.get("protocols")}
    for dm in datasets.values():
        dm.prepare_data()
    per_model = {(ds, key): _n_units(proto, params) for ds in datasets for key, proto, params in protocols
                 if not (ds in only and key not in only[ds])}
    for label, e in suite["methods"].items():
        unknown = set((e or {}).get("protocols") or ()) - set(suite["protocols"])
        if unknown:
            raise ValueError(f"suite {suite['name']!r}, method {label!r}: protocols {sorted(unknown)} are not protocol "
                             f"keys of the suite ({sorted(suite['protocols'])})")
    pseeds = {label: ([None] if (e or {}).get("pretrain_seeds", suite.get("pretrain_seeds")) is None or (e or {}).get("ckpt")
                      else [int(s) for s in (e or {}).get("pretrain_seeds", suite.get("pretrain_seeds"))])
              for label, e in suite["methods"].items()}
    progress = UnitProgress(sum(per_model.values()) * sum(len(v) for v in pseeds.values()))
    prov = provenance(device)
    for label, entry in suite["methods"].items():
        entry = dict(entry or {})
        for pseed in pseeds[label]:
            model, ckpt, chash = obtain_model(suite, label, entry, pseed)
            _evaluate_model(suite, store, cache, datasets, only, protocols, label, entry, model, ckpt, chash,
                            "" if pseed is None else pseed, device, progress, per_model, prov)
            cache.release(model)  # its cached features/maps leave memory; then the model itself, before the next
            del model  # one pretrains (the disk cache keeps everything for reruns)
            trim_heap()
    log.info("feature cache: %d hits, %d misses", cache.hits, cache.misses)
    return store.path


def _evaluate_model(suite: Mapping[str, Any], store: ResultStore, cache: FeatureCache, datasets: Mapping[str, Any],
                    only: Mapping[str, set], protocols: list, label: str, entry: Mapping[str, Any], model: Any,
                    ckpt: str, chash: str, pseed: int | str, device: str, progress: UnitProgress | None = None,
                    per_model: Mapping[tuple[str, str], int] | None = None, prov: Any = None) -> None:
    progress = progress or UnitProgress(0)
    per_model = per_model or {}
    weights = model_fingerprint(model)  # once per model; the feature cache reuses it
    cache.pin(model, weights)
    seed = None if pseed == "" else int(pseed)
    data_cfg = (None if entry.get("ckpt") or ckpt == "random-init"
                else _method_config(suite, label, entry, seed, None if seed is None else f"seed{seed}").get("data"))
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
            ctx = EvalContext(model, dm, cache, params, device, Path(suite["output"]))
            reason = proto.applicable(ctx)
            if reason:
                log.info("%s on %s: %s skipped (%s)", label, ds_name, key, reason)
                progress.step(f"{label} {ds_name} {key}: skipped", n=per_model.get((ds_name, key), 0))
                continue
            fractions = params.get("fractions", [1.0]) if proto.uses_fractions else [1.0]
            pjson = json.dumps({k: v for k, v in params.items() if k not in ("fractions", "seeds", "subset_seeds")},
                               sort_keys=True)
            for fraction in fractions:
                for subset_seed, seed in unit_seeds(proto, params, float(fraction)):
                    unit = dict(label=label, dataset=ds_name, protocol=key, params=pjson, fraction=fraction,
                                pretrain_seed=pseed, subset_seed=subset_seed, seed=seed, weights=weights,
                                config_hash=chash, dataset_version=dm.dataset_version)
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


def benchmark_command(args: Sequence[str]) -> int:
    """``medvlp benchmark suite=NAME [key=value ...]``."""
    files, overrides = split_args(args)
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("suite=")), None)
    if name is None and files:
        name = files[0]
    if name is None:
        raise ValueError("benchmark needs suite=NAME or a suite file")
    resume_flag = "run.weights_only_resume="
    rest = [o for o in overrides if not o.startswith(("suite=", "device=", resume_flag))]
    device = next((o.split("=", 1)[1] for o in overrides if o.startswith("device=")), None)
    suite = load_suite(name, rest)
    suite.pop(UNSAFE_RESUME_KEY, None)  # only the command line sets it
    weights_only = [o.split("=", 1)[1].lower() for o in overrides if o.startswith(resume_flag)]
    if weights_only and weights_only[-1] in ("false", "0", "no"):
        log.warning("run.weights_only_resume=false from the command line: pretraining resumes will unpickle "
                    "checkpoints, which can run code")
        suite[UNSAFE_RESUME_KEY] = False
    path = run_suite(suite, device)
    print(f"results: {path}")
    return 0


def evaluate_command(args: Sequence[str]) -> int:
    """``medvlp evaluate ckpt=PATH data=NAME [data.init_args.k=v] protocols=[a,b] out=DIR [label=NAME]``."""
    _, overrides = split_args(args)
    cfg = OmegaConf.from_dotlist(overrides)
    if "ckpt" not in cfg:
        raise ValueError("evaluate needs ckpt=PATH (or ckpt.format=F ckpt.path=P)")
    allow_class_path = bool(cfg.get("allow_class_path", False))
    ckpt = to_container(cfg.ckpt)
    data = to_container(cfg.get("data", {"name": "phantom"}))
    if isinstance(data, str):
        data = {"name": data}
    protocols = cfg.get("protocols", ["zero_shot", "retrieval", "linear_probe"])
    suite = {
        "name": "evaluate",
        "output": str(cfg.get("out", "results/evaluate")),
        # rows are labelled "<method> <backbone>" from the checkpoint's metadata (or label=NAME)
        "methods": {str(cfg.get("label", "checkpoint")): {"ckpt": ckpt, "auto_label": "label" not in cfg,
                                                          "allow_class_path": allow_class_path}},
        "datasets": {data["name"]: data},
        "protocols": {p: to_container(cfg.get("protocol_params", {})).get(p, {}) for p in protocols},
    }
    print(f"results: {run_suite(suite, cfg.get('device'))}")
    return 0
