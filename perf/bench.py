"""Performance benchmarks (not tests): every figure is a ratio measured within one run.

``python -m perf.bench [--quick] [--out perf.json]`` (also ``make perf``) measures

1. **probe**: linear-probe protocol cost with cached features (one backbone forward per image, no report
   encoding, logistic regression per fraction × seed) vs MGCA's way (frozen backbone re-encoding every
   image every epoch while a linear head trains) on the same phantom data and fractions × seeds, with the
   counted forwards and their extrapolation to CheXpert size at MGCA's 50 epochs;
2. **throughput**: pretraining samples/s and peak memory per method (each in its own process; CUDA
   peak allocated on a GPU, peak RSS on CPU), relative to the CLIP baseline;
3. **clip_step**: the CLIP training step split into factors: attention kernel (SDPA vs explicit attention
   matrix) at equal precision, and precision (bf16 autocast vs fp32) at equal kernel;
4. **loader3d**: 3D datamodule volumes/s in the second epoch with MONAI ``CacheDataset`` vs uncached;
5. **text_cache**: demo CLIP training steps/s with the text encoder's frozen-prefix cache vs without
   (same batches and precision; the cache is warm after one pass, as from the second epoch on), and the
   cache's hit rate on the real training stream (random order over the training set, configured size);
6. **mfu** (CUDA only): model FLOPs utilisation of ViT-B/16 image-encoder training in bf16;
7. **mimic_index**: building the MIMIC-CXR index (metadata/split/label CSVs, one report file per study) at
   MIMIC-CXR-JPG's size (377,110 images over 227,835 studies; ``--quick``: a tenth), and the duplicate-id
   check in one linear pass vs the former ``ids.count`` loop on the same 20,000 ids;
8. **loader2d**: images per CPU-second of one loader process from 2500×2048 JPEGs: full decode vs a plain
   PIL full-decode loop vs the fast decode vs prepared shards (``medvlp prepare``, sha256-verified or not)
   vs their floor (tar read + ``np.load`` + one batched normalisation);
9. **memory**: activation bytes per sample per method (tensors saved for backward), relative to CLIP;
10. **eval**: wall time of the quickstart suite's evaluation (random-init model) before vs after the
    evaluation dedup, same commit, with counted forwards and a value-by-value comparison;
11. **ddp**: samples/s of 2 ``DistributedDataParallel`` processes vs 1 at the same per-process batch
    (tiny-preset CLIP; gloo on CPU with one thread per process, NCCL when two or more GPUs are visible),
    printed as the speed-up and the scaling efficiency (speed-up / 2);
12. **attention**: forward+backward CPU time of SDPA's flash vs math kernel vs explicit attention per token
    count (≤ 257 tokens), i.e. which kernel the ViT's attention call should use on a CPU.

``--gpu`` (``make perf-gpu``) runs :mod:`perf.gpu` instead: paper-size CLIP and ASG steps on one GPU
(``--tiny``: the same path with tiny configs, on a CPU when there is no GPU).

Training steps use the demo preset's precision as :func:`medvlp.train.resolve_precision` resolves it on
this machine (``auto``: bf16 autocast where bf16 is native), except ``clip_step``'s naive baseline (fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from perf.fixtures import write_covidx

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bf16(device: str, preset: str = "demo") -> bool:
    """Whether ``preset``'s ``trainer.precision`` resolves to bf16 autocast on ``device``."""
    from medvlp.compose import compose
    from medvlp.train import resolve_precision

    precision = compose(["method=clip", f"preset={preset}"])["trainer"]["precision"]
    return resolve_precision(precision, device) == "bf16-mixed"


def _model_and_data(method: str, steps_data: dict[str, Any] | None = None, preset: str = "demo",
                    overrides: tuple[str, ...] = ()) -> tuple[Any, Any]:
    from medvlp.compose import compose
    from medvlp.config import to_container
    from medvlp.train import build_datamodule_from_config, build_method

    cfg = to_container(compose([f"method={method}", f"preset={preset}", *overrides]))
    if steps_data:
        cfg["data"]["init_args"].update(steps_data)
    dm = build_datamodule_from_config(cfg)
    dm.prepare_data()
    return build_method(cfg, dm), dm


def bench_probe(quick: bool) -> dict[str, Any]:
    """Cached-feature linear probe vs MGCA-style re-encoding each epoch (same fractions × seeds)."""
    from medvlp.benchmarks.kit.features import FeatureCache
    from medvlp.benchmarks.protocols.linear_probe import fit_predict_multilabel
    from medvlp.benchmarks.kit.splits import fraction_ids, fraction_rows

    n_train = 128 if quick else 512
    model, dm = _model_and_data("clip", {"num_train": n_train, "num_test": 128})
    model.eval()
    fractions, seeds, epochs = [0.1, 1.0], [0, 1, 2], 3 if quick else 10
    t0 = time.perf_counter()
    cache = FeatureCache(None)
    tr, te = cache.get(model, dm, "train"), cache.get(model, dm, "test")
    for f in fractions:
        for s in seeds:
            rows, _ = fraction_rows(tr.ids, f, s)
            fit_predict_multilabel(tr.representation[rows], tr.labels[rows], te.representation)
    cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    loader = dm.eval_dataloader("train", 48)
    ids = [m["id"] for b in dm.eval_dataloader("train", 256) for m in b["meta"]]
    for f in fractions:
        for s in seeds:
            keep = set(fraction_ids(ids, f, s))
            head = torch.nn.Linear(model.image_encoder.embed_dim, len(dm.label_names))
            opt = torch.optim.AdamW(head.parameters(), 1e-3)
            for _ in range(epochs):
                for b in loader:
                    sel = [i for i, m in enumerate(b["meta"]) if m["id"] in keep]
                    if not sel:
                        continue
                    with torch.no_grad():
                        feats = model.image_representation(b["image"][sel])
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats), b["labels"][sel])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                for b in dm.eval_dataloader("test", 48):
                    head(model.image_representation(b["image"]))
    reencode = time.perf_counter() - t0
    cached_fw = cache.counts["image_forwards"]
    mgca_fw = sum(epochs * len(fraction_ids(ids, f, s)) + len(te.ids) for f in fractions for s in seeds)
    return {"train_images": n_train, "fractions": fractions, "seeds": seeds, "mgca_epochs": epochs,
            "cached_s": round(cached, 2), "reencode_s": round(reencode, 2), "speedup": round(reencode / cached, 2),
            "forwards": {"cached": cached_fw, "reencode": mgca_fw, "ratio": round(mgca_fw / cached_fw, 1),
                         "cached_text_forwards": cache.counts["text_forwards"]},
            "chexpert_extrapolation": chexpert_forward_ratio(seeds=len(seeds)),
            "mgca_linear_vs_mgca": mgca_linear_forward_counts(seeds=len(seeds))}


def chexpert_forward_ratio(epochs: int = 50, fractions: tuple[float, ...] = (0.01, 0.1, 1.0), seeds: int = 3,
                           n_train: int = 191027 - 5000 - 1000, n_val: int = 5000) -> dict[str, Any]:
    """Counted image forwards at CheXpert size: MGCA's linear evaluation (every epoch encodes the fraction's
    training images and the validation set, per fraction × seed) vs the cached probe (every training image
    once). 191,027 frontal images in CheXpert's train.csv (the real file, tests/test_datamodules_real_formats),
    minus MGCA's 5,000 validation images and the 1,000 CheXpert 5x200 images. Test-set forwards are left out
    of both sides (MGCA: once per unit, cache: once), which understates the ratio; classifier time is not
    counted (logistic regression on cached features vs a linear head per batch)."""
    mgca = seeds * sum(epochs * (round(f * n_train) + n_val) for f in fractions)
    return {"n_train": n_train, "n_val": n_val, "epochs": epochs, "fractions": list(fractions), "seeds": seeds,
            "mgca_forwards": mgca, "cached_forwards": n_train, "ratio": round(mgca / n_train, 1)}


MGCA_LINEAR_FORMULA = ("per (fraction f, seed): MGCA / mgca_linear today = E*(f*N_train + N_val) + N_test "
                       "(train crops and the val split re-encoded every epoch, test once); with a val/test feature "
                       "cache = E*f*N_train per unit + (N_val + N_test) once per weights; cached probe = "
                       "N_train + N_val + N_test once")


def mgca_linear_forward_counts(epochs: int = 50, fractions: tuple[float, ...] = (0.01, 0.1, 1.0), seeds: int = 3,
                               n_train: int = 191027 - 5000 - 1000, n_val: int = 5000, n_test: int = 1000
                               ) -> dict[str, Any]:
    """Counted image forwards of the ``mgca_linear`` reference protocol vs MGCA at ``epochs``, computed
    arithmetically from dataset sizes × epochs (:data:`MGCA_LINEAR_FORMULA`; CheXpert sizes as in
    :func:`chexpert_forward_ratio`, 1,000 test images = CheXpert 5x200)."""
    units = [(f, s) for f in fractions for s in range(seeds)]
    mgca = sum(epochs * (round(f * n_train) + n_val) + n_test for f, _ in units)
    val_test_cached = sum(epochs * round(f * n_train) for f, _ in units) + n_val + n_test
    probe = n_train + n_val + n_test
    return {"formula": MGCA_LINEAR_FORMULA, "epochs": epochs, "fractions": list(fractions), "seeds": seeds,
            "n_train": n_train, "n_val": n_val, "n_test": n_test, "mgca_forwards": mgca,
            "mgca_linear_val_test_cached_forwards": val_test_cached, "cached_probe_forwards": probe,
            "mgca_vs_val_test_cached": round(mgca / val_test_cached, 3), "mgca_vs_cached_probe": round(mgca / probe, 1)}


def bench_attention_kernels(token_counts: tuple[int, ...] = (17, 65, 197, 257), batch: int = 16, heads: int = 3,
                            head_dim: int = 64, reps: int = 3, iters: int = 10) -> dict[str, Any]:
    """Forward+backward CPU seconds of SDPA's flash kernel vs its math kernel vs explicit attention per token
    count (interleaved, best of ``reps``): which kernel the ViT's attention should use on this device."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v

    def kernel(backend: Any) -> Any:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    fns = {"flash": kernel(SDPBackend.FLASH_ATTENTION), "math": kernel(SDPBackend.MATH), "explicit": naive}
    out: dict[str, Any] = {}
    for n in token_counts:
        best = {k: float("inf") for k in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                q, k, v = (torch.randn(batch, heads, n, head_dim, requires_grad=True) for _ in range(3))
                t0 = time.process_time()
                for _ in range(iters):
                    fn(q, k, v).sum().backward()
                best[name] = min(best[name], (time.process_time() - t0) / iters)
        out[str(n)] = {"cpu_ms": {k: round(v * 1e3, 3) for k, v in best.items()},
                       "flash_vs_math_speedup": round(best["math"] / best["flash"], 3),
                       "fastest": min(best, key=best.get)}
    return {"device": "cpu", "threads": torch.get_num_threads(), "shape": f"B={batch}, heads={heads}, d={head_dim}",
            "tokens": out}


def _throughput_one(method: str, steps: int) -> dict[str, Any]:
    device = _device()
    model, dm = _model_and_data(method)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    loader = dm.train_dataloader()
    it = iter(loader)

    def batch_to(b: Any) -> Any:
        if isinstance(b, tuple):
            b = b[0]
        if isinstance(b, dict) and all(isinstance(v, dict) for v in b.values()):
            return {k: batch_to(v) for k, v in b.items()}
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}

    batches = []
    while len(batches) < steps + 2:
        try:
            batches.append(batch_to(next(it)))
        except StopIteration:
            it = iter(loader)
    n_samples = 0
    amp = _bf16(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, b in enumerate(batches):
        if i == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = model._total(model._losses(b), "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            n_samples += model._bs(b)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "samples_per_s": n_samples / dt, "peak_mb": peak, "bf16": amp,
            "memory": "cuda_allocated" if device == "cuda" else "rss"}


def bench_throughput(methods: list[str], steps: int) -> dict[str, Any]:
    """Per-method samples/s and peak memory, each method in a fresh process."""
    out = {}
    for m in methods:
        proc = subprocess.run([sys.executable, "-m", "perf.bench", "--one", m, "--steps", str(steps)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            raise RuntimeError(f"throughput run for {m} failed:\n{proc.stderr[-2000:]}")
        out[m] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out["clip"]
    for m, r in out.items():
        r["throughput_vs_clip"] = round(r["samples_per_s"] / base["samples_per_s"], 3)
        r["memory_vs_clip"] = round(r["peak_mb"] / base["peak_mb"], 3)
        r["samples_per_s"], r["peak_mb"] = round(r["samples_per_s"], 2), round(r["peak_mb"], 1)
    return out


class _ClipStep:
    """One demo-CLIP training configuration (attention ``impl``, bf16 ``amp``, config ``overrides``) on one
    fixed batch; :meth:`step` runs one optimiser step and returns its time (CPU seconds on a CPU, wall on CUDA)."""

    def __init__(self, device: str, impl: str, amp: bool, overrides: tuple[str, ...] = ()) -> None:
        torch.manual_seed(0)
        self.model, dm = _model_and_data("clip", None, overrides=overrides)
        for blk in self.model.image_encoder.blocks:
            blk.attn.impl = impl
        self.model.to(device).train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], 1e-4)
        b = next(iter(dm.train_dataloader()))
        self.image, self.text, self.device, self.amp = b["image"].to(device), b["text"], device, amp

    def step(self) -> float:
        from medvlp.losses import clip_loss

        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter() if cuda else time.process_time()
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.amp):
            loss = clip_loss(self.model.encode_image(self.image, False), self.model.encode_text(self.text, False), 0.07)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() if cuda else time.process_time()) - t0


def _interleaved_steps_per_s(configs: dict[str, _ClipStep], steps: int, warmup: int = 2) -> dict[str, float]:
    """Steps/s of each configuration from its median step time, the configurations' steps interleaved
    (one step of each in turn), so machine load affects them alike."""
    times: dict[str, list[float]] = {k: [] for k in configs}
    for i in range(warmup + steps):
        for k, c in configs.items():
            t = c.step()
            if i >= warmup:
                times[k].append(t)
    return {k: 1.0 / float(np.median(v)) for k, v in times.items()}


def bench_clip_step(steps: int) -> dict[str, Any]:
    """A CLIP training step split into its factors, each at the other factor held equal: attention kernel
    (SDPA vs explicit attention matrix) at fp32 (and at bf16 where bf16 is native), and precision (bf16
    autocast vs fp32) with SDPA. Same model sizes, data and batch. Then, without the prefix cache, the current
    step vs an explicit-attention, train-mode-text reference (each factor named in its key). All configurations
    are built first and their steps interleaved (median CPU seconds per step on a CPU)."""
    device = _device()
    bf16 = _bf16(device)
    configs = [("sdpa", False), ("naive", False)] + ([("sdpa", True), ("naive", True)] if bf16 else [])
    steps_of = {f"{impl}_{'bf16' if amp else 'fp32'}": _ClipStep(device, impl, amp) for impl, amp in configs}
    # like for like without the prefix cache (so the frozen text layers run every step): the current step
    # (SDPA, frozen text layers in eval mode) vs the reference (explicit attention, whole text tower in train
    # mode with dropout, as the official ASG/GTGM code runs it), and each factor alone
    ref_runs = {"current_sdpa_eval_frozen": ("sdpa", False), "text_train_mode_sdpa": ("sdpa", True),
                "reference_naive_train_mode": ("naive", True)}
    for name, (impl, dropout) in ref_runs.items():
        steps_of[name] = _ClipStep(device, impl, False, (
            "method.init_args.text_encoder.prefix_cache=0",
            f"method.init_args.text_encoder.frozen_dropout={str(dropout).lower()}"))
    results = _interleaved_steps_per_s(steps_of, steps)
    out: dict[str, Any] = {"steps_per_s": {k: round(v, 3) for k, v in results.items()},
                           "kernel_sdpa_vs_naive_fp32": round(results["sdpa_fp32"] / results["naive_fp32"], 3),
                           "current_vs_reference_(sdpa+eval-mode frozen text vs explicit attention+train-mode text, "
                           "fp32, no prefix cache)": round(results["current_sdpa_eval_frozen"]
                                                          / results["reference_naive_train_mode"], 3),
                           "frozen_text_eval_vs_train_mode_(sdpa, fp32, no prefix cache)": round(
                               results["current_sdpa_eval_frozen"] / results["text_train_mode_sdpa"], 3)}
    if bf16:
        out["kernel_sdpa_vs_naive_bf16"] = round(results["sdpa_bf16"] / results["naive_bf16"], 3)
        out["precision_bf16_vs_fp32_sdpa"] = round(results["sdpa_bf16"] / results["sdpa_fp32"], 3)
    else:
        out["precision_bf16_vs_fp32_sdpa"] = f"not measured: bf16 is not native on this {device}"
    return out


def bench_text_cache(steps: int) -> dict[str, Any]:
    """Demo CLIP training steps/s with the frozen-prefix text cache vs without, on the same batches."""
    device = _device()
    amp = _bf16(device)
    results: dict[str, float] = {}
    for name, size in (("cached", 4096), ("uncached", 0)):
        torch.manual_seed(0)
        model, dm = _model_and_data("clip", None, overrides=(f"method.init_args.text_encoder.prefix_cache={size}",))
        model.to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
        it = iter(dm.train_dataloader())
        batches = [next(it) for _ in range(steps)]

        def step(b: dict[str, Any]) -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                loss = model._total(model._losses({**b, "image": b["image"].to(device)}), "train")
            opt.zero_grad()
            loss.backward()
            opt.step()

        for b in batches:  # first pass fills the cache (and warms up both variants alike)
            step(b)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            step(b)
        if device == "cuda":
            torch.cuda.synchronize()
        results[name] = steps / (time.perf_counter() - t0)
    return {"steps_per_s": {k: round(v, 3) for k, v in results.items()}, "bf16": amp,
            "speedup": round(results["cached"] / results["uncached"], 3), "hit_rate": text_cache_hit_rate()}


def lru_hit_rate(n_reports: int, cache_size: int, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Hit rate per epoch of the text encoder's LRU policy (hit → most recent; evict the least recent beyond
    ``cache_size``) on a random order over ``n_reports`` distinct reports per epoch (a simulation of the
    policy, not of the encoder: every paper-scale report is distinct)."""
    from collections import OrderedDict

    rng = np.random.default_rng(seed)
    cache: OrderedDict[int, None] = OrderedDict()
    rates = []
    for _ in range(epochs):
        hits = 0
        for r in rng.permutation(n_reports).tolist():
            if r in cache:
                hits += 1
                cache.move_to_end(r)
            else:
                cache[r] = None
                if len(cache) > cache_size:
                    cache.popitem(last=False)
        rates.append(round(hits / n_reports, 4))
    return {"reports": n_reports, "cache_size": cache_size, "hit_rate_per_epoch": rates}


@torch.no_grad()
def text_cache_hit_rate(epochs: int = 2) -> dict[str, Any]:
    """Hit rate of the frozen-prefix cache on the demo's real training stream: the train loader's random
    order over the whole training set for ``epochs`` epochs, the demo preset's cache size."""
    model, dm = _model_and_data("clip", None)
    enc = model.text_encoder
    per_epoch = []
    for _ in range(epochs):
        hits = total = 0
        for b in dm.train_dataloader():
            texts = list(b["text"])
            hits += sum(t in enc._prefix_cache for t in texts)
            total += len(texts)
            enc(texts)  # fills/evicts the cache exactly as a training step does
        per_epoch.append(round(hits / total, 3))
    return {"cache_size": enc.prefix_cache_size, "train_samples": len(dm.dataset("train")),
            "simulated_lru_at_mimic_size": lru_hit_rate(217_000, enc.prefix_cache_size, epochs),
            "distinct_reports": len({dm.dataset("train", augment=False)[i]["text"] for i in range(len(dm.dataset("train")))}),
            "hit_rate_per_epoch": per_epoch}


def bench_loader3d(n: int, epochs: int = 2) -> dict[str, Any]:
    """Second-epoch volumes/s of an MSD-layout datamodule, uncached vs MONAI CacheDataset."""
    from medvlp.datamodules.volume.ct import MSDDataModule

    with tempfile.TemporaryDirectory() as tmp:
        import nibabel as nib

        root = Path(tmp)
        (root / "imagesTr").mkdir()
        (root / "labelsTr").mkdir()
        rng = np.random.default_rng(0)
        training = []
        for i in range(n):
            nib.save(nib.Nifti1Image(rng.normal(0, 200, (160, 160, 64)).astype(np.float32), np.diag([0.8, 0.8, 2.5, 1])),
                     str(root / "imagesTr" / f"v{i}.nii.gz"))
            nib.save(nib.Nifti1Image((rng.random((160, 160, 64)) > 0.9).astype(np.uint8), np.diag([0.8, 0.8, 2.5, 1])),
                     str(root / "labelsTr" / f"v{i}.nii.gz"))
            training.append({"image": f"./imagesTr/v{i}.nii.gz", "label": f"./labelsTr/v{i}.nii.gz"})
        (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "fg"},
                                                       "training": training}))
        out = {}
        for cache in ("none", "memory"):
            dm = MSDDataModule(str(root), volume_size=(32, 96, 96), pixdim=(1.5, 1.5, 2.0), cache=cache,
                               val_fraction=0.0, test_fraction=0.0, batch_size=2)
            loader = dm.eval_dataloader("train", 2)
            for e in range(epochs):
                t0 = time.perf_counter()
                count = sum(b["image"].shape[0] for b in loader)
                dt = time.perf_counter() - t0
            out[cache] = count / dt
        return {"volumes": n, "volumes_per_s": {k: round(v, 2) for k, v in out.items()},
                "speedup": round(out["memory"] / out["none"], 2)}


def bench_memory(methods: list[str]) -> dict[str, Any]:
    """Activation bytes per sample per method: the tensors autograd saves for backward during one training
    forward (``saved_tensors_hooks``; each storage counted once; parameters excluded), demo preset, one batch."""
    device = _device()
    out: dict[str, Any] = {}
    for method in methods:
        torch.manual_seed(0)
        model, dm = _model_and_data(method)
        model.to(device).train()
        batch = next(iter(dm.train_dataloader()))
        batch = batch[0] if isinstance(batch, tuple) else batch

        def to(b: Any) -> Any:
            if isinstance(b, dict) and all(isinstance(v, dict) for v in b.values()):
                return {k: to(v) for k, v in b.items()}
            return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}

        batch = to(batch)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: set[int] = set()
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen and ptr not in params:
                seen.add(ptr)
                total[0] += t.untyped_storage().nbytes()
            return t

        amp = _bf16(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                loss = model._total(model._losses(batch), "train")
        loss.backward()
        n = model._bs(batch)
        out[method] = {"batch": n, "activation_mb_per_sample": round(total[0] / n / 2**20, 3), "bf16": amp}
    base = out["clip"]["activation_mb_per_sample"]
    for r in out.values():
        r["vs_clip"] = round(r["activation_mb_per_sample"] / base, 3)
    return out


def _radiograph(h: int, w: int, seed: int) -> np.ndarray:
    """A chest-radiograph-like uint8 image (body, lungs, ribs, fine noise) of MIMIC-CXR-JPG size."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = yy / h - 0.5, xx / w - 0.5
    body = np.exp(-((x / 0.42) ** 6 + (y / 0.55) ** 6))
    lungs = sum(np.exp(-(((x - c) / 0.16) ** 2 + ((y + 0.02) / 0.3) ** 2)) for c in (-0.18, 0.18))
    ribs = 0.08 * (np.sin((60 + seed) * (y + 0.3 * x ** 2)) > 0.6) * (lungs > 0.2)
    img = 40 + 170 * body - 110 * lungs + 255 * ribs + np.random.default_rng(seed).normal(0, 3, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def bench_loader2d(n: int, image_size: int = 224, reps: int = 2) -> dict[str, Any]:
    """Per-core CPU seconds per image of one loader process (``num_workers=0``) at the paper image size from
    real-size (2500×2048) JPEGs in the COVIDx layout, interleaved over ``reps`` rounds (best kept):
    ``decode: full`` vs a plain PIL full-decode loop (open, grey, bilinear resize, float) vs ``decode: fast``
    vs the prepared shards read by ``data=shards prepared=…`` (uint8 at the training size, sha256 verified or
    not) vs their floor (tar read + ``np.load`` + one batched normalisation), and the datamodule's own
    ``prepared=…``. Ratios are images per CPU-second relative to each other."""
    from PIL import Image

    from medvlp.datamodules import COVIDxDataModule, ShardDataModule
    from medvlp.datamodules.io.prepare import normalise_batch, prepare

    with tempfile.TemporaryDirectory() as tmp:
        root = write_covidx(Path(tmp) / "covidx", n, lambda i: _radiograph(2500, 2048, i))
        kw = {"image_size": image_size, "split_convention": "hash"}
        prepared = Path(tmp) / "prepared"
        t0 = time.perf_counter()
        prepare(COVIDxDataModule(str(root), **kw), prepared, samples_per_shard=64, progress=False)
        prepare_s = time.perf_counter() - t0
        jpgs = sorted((root / "train").glob("*.jpg"))
        tars = sorted((prepared / "train").glob("*.tar"))

        def dataset(ds: Any) -> int:
            return sum(ds[i] is not None for i in range(len(ds)))

        def plain_pil() -> int:
            for p in jpgs:
                with Image.open(p) as im:
                    g = im.convert("L")
                    scale = image_size / max(g.size)
                    g = g.resize((max(1, round(g.width * scale)), max(1, round(g.height * scale))), Image.BILINEAR)
                    np.asarray(g, dtype=np.float32) / 255.0
            return len(jpgs)

        def shards(verify: bool) -> int:
            dm = ShardDataModule(prepared=str(prepared), image_size=image_size, batch_size=16, verify_hashes=verify)
            return sum(b["image"].shape[0] for b in dm.eval_dataloader("train", 16))

        def floor() -> int:  # tar read + np.load per sample + one normalisation per batch of 16
            import io
            import tarfile

            count, batch = 0, []
            for t in tars:
                with tarfile.open(t) as tar:
                    for m in tar.getmembers():
                        data = tar.extractfile(m).read()
                        if m.name.endswith(".npy"):
                            batch.append(torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)))
                            if len(batch) == 16:
                                normalise_batch(torch.stack(batch))
                                count, batch = count + len(batch), []
            if batch:
                normalise_batch(torch.stack(batch))
            return count + len(batch)

        runs = {"full": lambda: dataset(COVIDxDataModule(str(root), decode="full", **kw).dataset("train", augment=False)),
                "plain_pil_full": plain_pil,
                "fast": lambda: dataset(COVIDxDataModule(str(root), decode="fast", **kw).dataset("train", augment=False)),
                "prepared_by_id": lambda: dataset(COVIDxDataModule(str(root), prepared=str(prepared), **kw)
                                                  .dataset("train", augment=False)),
                "prepared_shards": lambda: shards(True), "prepared_shards_unverified": lambda: shards(False),
                "shard_floor": floor}
        best = {k: float("inf") for k in runs}
        for _ in range(reps):
            for k, fn in runs.items():
                t0 = time.process_time()
                count = fn()
                best[k] = min(best[k], (time.process_time() - t0) / count)
    rate = {k: 1.0 / v for k, v in best.items()}
    return {"images": n, "source": "2500x2048 JPEG (quality 95)", "image_size": image_size,
            "images_per_cpu_s": {k: round(v, 2) for k, v in rate.items()},
            "shards_vs_floor": round(rate["prepared_shards"] / rate["shard_floor"], 3),
            "shards_unverified_vs_floor": round(rate["prepared_shards_unverified"] / rate["shard_floor"], 3),
            "sha256_verify_overhead": round(best["prepared_shards"] / best["prepared_shards_unverified"] - 1, 3),
            "full_vs_plain_pil_full": round(rate["full"] / rate["plain_pil_full"], 3),
            "fast_vs_full": round(rate["fast"] / rate["full"], 2),
            "prepared_shards_vs_full": round(rate["prepared_shards"] / rate["full"], 1),
            "prepared_by_id_vs_full": round(rate["prepared_by_id"] / rate["full"], 1),
            "prepare_s_per_image": round(prepare_s / n, 4)}


@contextmanager
def legacy_evaluation() -> Iterator[None]:
    """The evaluation as it was before the dedup, for like-with-like timing in one run: two backbone
    forwards per image (``image_representation`` then ``encode_image``), report embeddings of every split at
    extraction, segmentation maps recomputed (in memory) for every fraction × seed, fine-tuning loading the
    whole training split."""
    import medvlp.benchmarks.kit.features as feats
    import medvlp.benchmarks.protocols.finetune as ft

    saved = (feats.image_outputs, feats.FeatureCache.get, feats.FeatureCache.maps, ft.load_fraction)

    def get(self: Any, model: Any, dm: Any, split: str, device: Any = "cpu") -> Any:
        out = saved[1](self, model, dm, split, device)
        out.text_embedding  # noqa: B018 - eager, as before
        return out

    def maps(self: Any, model: Any, dm: Any, split: str, device: Any = "cpu") -> Any:
        return feats.MapCache(None, self.counts).get(model, dm, split, "legacy", device)

    def load_fraction(dm: Any, fraction: float, seed: int, batch_size: int = 64) -> Any:
        class Whole:  # no records: the whole split is read, then subset
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

            def dataset(self, split: str, augment: bool = False) -> Any:
                return object()

        return saved[3](Whole(dm), fraction, seed, batch_size)

    feats.image_outputs = lambda model, image: (model.image_representation(image), model.encode_image(image))
    feats.FeatureCache.get, feats.FeatureCache.maps, ft.load_fraction = get, maps, load_fraction
    try:
        yield
    finally:
        feats.image_outputs, feats.FeatureCache.get, feats.FeatureCache.maps, ft.load_fraction = saved


def bench_eval(quick: bool) -> dict[str, Any]:
    """Wall time of the quickstart suite's evaluation (random-init model, every quickstart dataset and
    protocol, demo preset) before vs after the dedup (:func:`legacy_evaluation`), same commit, fresh feature
    caches; forwards counted; every metric value of the two runs compared."""
    import pandas as pd

    import medvlp.benchmarks.kit.features as feats
    from medvlp.benchmarks.suite.runner import load_suite, run_suite

    caches: list[Any] = []
    init = feats.FeatureCache.__init__

    def tracking_init(self: Any, root: Any) -> None:
        init(self, root)
        caches.append(self)

    out: dict[str, Any] = {}
    values = {}
    feats.FeatureCache.__init__ = tracking_init
    try:
        for name in ("legacy", "dedup"):
            with tempfile.TemporaryDirectory() as tmp:
                over = [f"output={tmp}"]
                if quick:
                    over += ["datasets.phantom_xray.init_args.num_train=128", "datasets.phantom_xray.init_args.num_test=64",
                             "datasets.phantom_ct.init_args.num_train=32", "datasets.phantom_ct.init_args.num_test=32"]
                suite = load_suite("quickstart", over)
                suite["methods"] = {"random_init": suite["methods"]["random_init"]}
                caches.clear()
                t0 = time.perf_counter()
                with legacy_evaluation() if name == "legacy" else nullcontext():
                    csv = run_suite(suite)
                out[name] = {"seconds": round(time.perf_counter() - t0, 1), **caches[-1].counts}
                values[name] = pd.read_csv(csv).set_index(["dataset", "protocol", "fraction", "seed", "metric"])["value"]
    finally:
        feats.FeatureCache.__init__ = init
    diff = (values["legacy"] - values["dedup"]).abs()
    return {**out, "speedup": round(out["legacy"]["seconds"] / out["dedup"]["seconds"], 2),
            "metric_values": int(diff.size), "max_abs_value_difference": float(diff.max()),
            "quick": quick}


def bench_mfu(steps: int) -> dict[str, Any]:
    """MFU of ViT-B/16 (224², 197 tokens) forward+backward in bf16 on CUDA; skipped without a GPU."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from medvlp.encoders import ViTEncoder

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    enc = ViTEncoder(in_channels=3, embed_dim=768, depth=12, num_heads=12, img_size_2d=224, patch_size_2d=16).cuda()
    opt = torch.optim.AdamW(enc.parameters(), 1e-4)
    bs = 128
    x = torch.randn(bs, 3, 224, 224, device="cuda")
    n_params = sum(p.numel() for p in enc.parameters())
    tokens, d, layers = 197, 768, 12
    flops_per_sample = 6 * n_params * tokens + 12 * layers * tokens * tokens * d  # dense + attention (fwd+bwd)
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = enc(x)["pooled"].float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    achieved = flops_per_sample * bs * steps / (time.perf_counter() - t0) / 1e12
    return {"device": name, "achieved_tflops": round(achieved, 1), "peak_tflops": peak,
            "mfu": round(achieved / peak, 3) if peak else None}


def _write_mimic_tables(root: Path, images: int, studies: int) -> None:
    """MIMIC-CXR-JPG 2.0.0 tables and one short report per study (no images: the index reads no pixels)."""
    import gzip

    labels = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
              "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
              "Pneumothorax", "Support Devices"]
    rng = np.random.default_rng(0)
    study_of = np.sort(rng.integers(0, studies, images))
    study_of[:studies] = np.arange(studies)  # every study has at least one image
    study_of.sort()
    subject_of_study = 10_000_000 + np.arange(studies) // 4
    meta = ["dicom_id,subject_id,study_id,ViewPosition"]
    split = ["dicom_id,study_id,subject_id,split"]
    for i, st in enumerate(study_of):
        view = ("PA", "AP", "LATERAL")[i % 3]
        meta.append(f"d{i:08d},{subject_of_study[st]},{50_000_000 + st},{view}")
        split.append(f"d{i:08d},{50_000_000 + st},{subject_of_study[st]},{'train' if st % 50 else 'test'}")
    lab = ["subject_id,study_id," + ",".join(labels)]
    lab += [f"{subject_of_study[st]},{50_000_000 + st}," + ",".join("1.0" if (st + k) % 9 == 0 else "" for k in range(14))
            for st in range(studies)]
    for name, rows in (("metadata", meta), ("split", split), ("chexpert", lab)):
        with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", compresslevel=1) as fh:
            fh.write("\n".join(rows) + "\n")
    for st in range(studies):
        sid = str(subject_of_study[st])
        folder = root / "files" / f"p{sid[:2]}" / f"p{sid}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"s{50_000_000 + st}.txt").write_text(
            f"FINAL REPORT\n EXAMINATION: CHEST\n \n FINDINGS: Study {st}. Lungs are clear.\n \n IMPRESSION: Normal.\n")


def bench_mimic_index(quick: bool) -> dict[str, Any]:
    """Index build time at MIMIC-CXR-JPG size; duplicate check linear vs quadratic on the same ids."""
    from medvlp.datamodules.tabular import duplicate_ids
    from medvlp.datamodules.xray.chest import MIMICCXRDataModule

    images, studies = (37_711, 22_784) if quick else (377_110, 227_835)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        _write_mimic_tables(root, images, studies)
        written = time.perf_counter() - t0
        dm = MIMICCXRDataModule(str(root), image_size=224)
        t0 = time.perf_counter()
        n = sum(len(dm.records(s)) for s in ("train", "val", "test"))
        index_s = time.perf_counter() - t0
    ids = [f"d{i:08d}" for i in range(20_000)]
    t0 = time.perf_counter()
    linear = duplicate_ids(ids)
    linear_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    quadratic = sorted({i for i in ids if ids.count(i) > 1})
    quadratic_s = time.perf_counter() - t0
    assert linear == quadratic == []
    return {"metadata_rows": images, "studies": studies, "records_indexed": n, "fixture_write_s": round(written, 1),
            "index_s": round(index_s, 2), "index_rows_per_s": round(images / index_s),
            "dup_check_20k_ids_linear_s": round(linear_s, 4), "dup_check_20k_ids_quadratic_s": round(quadratic_s, 2),
            "dup_check_speedup": round(quadratic_s / max(linear_s, 1e-9))}


class _LossStep(torch.nn.Module):
    """Forward = a method's training loss, so ``DistributedDataParallel`` wraps the whole step."""

    def __init__(self, method: Any) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.method._total(self.method._losses(batch), "train")


def _ddp_worker(rank: int, world: int, port: int, steps: int, out: Any) -> None:
    """One process of the ``ddp`` entry: tiny-preset CLIP steps under ``DistributedDataParallel``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world > 1
    backend, device = ("nccl", f"cuda:{rank}") if cuda else ("gloo", "cpu")
    if not cuda:  # one thread per process in both runs: like with like per process
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, dm = _model_and_data("clip", preset="tiny")
    model.to(device).train()
    step = DistributedDataParallel(_LossStep(model), device_ids=[rank] if cuda else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    batch = next(iter(dm.train_dataloader()))
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
        opt.zero_grad()
        step(batch).backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        out["samples_per_s"] = steps * len(batch["text"]) * world / (time.perf_counter() - t0)
        out["backend"], out["per_process_batch"] = backend, len(batch["text"])
    dist.destroy_process_group()


def bench_ddp(steps: int) -> dict[str, Any]:
    """Samples/s of 2 DDP processes vs 1 at the same per-process batch (tiny-preset CLIP): gloo on CPU
    (one thread per process), NCCL when two or more GPUs are visible."""
    import socket

    import torch.multiprocessing as mp

    res: dict[str, Any] = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(_ddp_worker, args=(world, port, steps, out), nprocs=world, join=True)
            res[f"world{world}"] = dict(out)
    one, two = res["world1"]["samples_per_s"], res["world2"]["samples_per_s"]
    return {"backend_2proc": res["world2"]["backend"], "per_process_batch": res["world1"]["per_process_batch"],
            "samples_per_s_1proc": round(one, 2), "samples_per_s_2proc": round(two, 2),
            "speedup_2_vs_1": round(two / one, 3), "scaling_efficiency": round(two / (2 * one), 3)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints JSON and a short summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on 2 CPU cores)")
    ap.add_argument("--out", default="results/perf.json")
    ap.add_argument("--only", nargs="*", default=["probe", "throughput", "clip_step", "text_cache", "loader3d", "mfu",
                                                  "mimic_index", "loader2d", "memory", "eval", "ddp", "attention"])
    ap.add_argument("--gpu", action="store_true", help="paper-size CLIP/ASG steps on one GPU (perf/gpu.py)")
    ap.add_argument("--tiny", action="store_true", help="with --gpu: tiny preset (a CPU-sized check of the path)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.gpu:
        from perf.gpu import bench_gpu, summary

        gpu = bench_gpu(args.tiny, args.steps)
        print(summary(gpu), flush=True)
        out = Path(args.out if args.out != "results/perf.json" else "results/perf_gpu.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(gpu, indent=2))
        print(f"written {out}")
        return 0
    if args.one:
        print(json.dumps(_throughput_one(args.one, args.steps or 5)))
        return 0
    steps = args.steps or (3 if args.quick else 10)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "torch": torch.__version__, "threads": torch.get_num_threads()}
    jobs = {"probe": lambda: bench_probe(args.quick),
            "throughput": lambda: bench_throughput(["clip", "asg", "umcl", "unimedi", "gtgm"], steps),
            "clip_step": lambda: bench_clip_step(steps),
            "text_cache": lambda: bench_text_cache(steps),
            "loader3d": lambda: bench_loader3d(6 if args.quick else 12),
            "mfu": lambda: bench_mfu(steps),
            "mimic_index": lambda: bench_mimic_index(args.quick),
            "loader2d": lambda: bench_loader2d(16 if args.quick else 48),
            "memory": lambda: bench_memory(["clip", "asg", "umcl", "unimedi", "gtgm"]),
            "eval": lambda: bench_eval(args.quick),
            "ddp": lambda: bench_ddp(steps),
            "attention": lambda: bench_attention_kernels(reps=2 if args.quick else 3)}
    for key in args.only:
        t0 = time.perf_counter()
        report[key] = jobs[key]()
        print(f"{key}: {json.dumps(report[key])} ({time.perf_counter() - t0:.0f}s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
