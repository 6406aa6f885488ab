"""Performance benchmarks (not tests): every figure is a ratio measured within one run.

``python -m medvlp.benchmarks.perf [--quick] [--out perf.json]`` (also ``make perf``) measures

1. **probe**: linear-probe protocol cost with cached features (extract once, logistic regression per
   fraction × seed) vs MGCA's way (frozen backbone re-encoding every image every epoch while a linear
   head trains) on the same phantom data and fractions × seeds;
2. **throughput**: pretraining samples/s and peak memory per method (each in its own process; CUDA
   peak allocated on a GPU, peak RSS on CPU), relative to the CLIP baseline;
3. **clip_step**: our CLIP step (SDPA attention, the demo preset's precision) vs a straightforward
   MGCA/ConVIRT-style step (explicit attention matrix, fp32) with the same model sizes;
4. **loader3d**: 3D datamodule volumes/s in the second epoch with MONAI ``CacheDataset`` vs uncached;
5. **text_cache**: demo CLIP training steps/s with the text encoder's frozen-prefix cache vs without
   (same batches and precision; the cache is warm after one pass, as from the second epoch on);
6. **mfu** (CUDA only): model FLOPs utilisation of ViT-B/16 image-encoder training in bf16;
7. **mimic_index**: building the MIMIC-CXR index (metadata/split/label CSVs, one report file per study) at
   MIMIC-CXR-JPG's size (377,110 images over 227,835 studies; ``--quick``: a tenth), and the duplicate-id
   check in one linear pass vs the former ``ids.count`` loop on the same 20,000 ids.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    from medvlp.benchmarks.features import FeatureCache
    from medvlp.benchmarks.linear_probe import fit_predict_multilabel
    from medvlp.benchmarks.splits import fraction_ids, fraction_rows

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
    return {"train_images": n_train, "fractions": fractions, "seeds": seeds, "mgca_epochs": epochs,
            "cached_s": round(cached, 2), "reencode_s": round(reencode, 2), "speedup": round(reencode / cached, 2)}


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
        proc = subprocess.run([sys.executable, "-m", "medvlp.benchmarks.perf", "--one", m, "--steps", str(steps)],
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


def bench_clip_step(steps: int) -> dict[str, Any]:
    """Our CLIP step vs an MGCA/ConVIRT-style step (explicit attention, fp32), same sizes and data."""
    from medvlp.losses import clip_loss

    device = _device()
    bf16 = _bf16(device)
    results = {}
    for name, impl, amp in (("ours_sdpa", "sdpa", bf16), ("naive_fp32", "naive", False)):
        torch.manual_seed(0)
        model, dm = _model_and_data("clip", None)
        for blk in model.image_encoder.blocks:
            blk.attn.impl = impl
        model.to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
        b = next(iter(dm.train_dataloader()))
        image = b["image"].to(device)
        for i in range(steps + 2):
            if i == 2:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                loss = clip_loss(model.encode_image(image, False), model.encode_text(b["text"], False), 0.07)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        results[name] = steps / (time.perf_counter() - t0)
    return {"steps_per_s": {k: round(v, 3) for k, v in results.items()},
            "speedup": round(results["ours_sdpa"] / results["naive_fp32"], 3),
            "note": f"ours: SDPA attention{', bf16 autocast' if bf16 else ', fp32'} (demo preset precision "
                    f"on this {device}); baseline: explicit attention matrix, fp32"}


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
            "speedup": round(results["cached"] / results["uncached"], 3)}


def bench_loader3d(n: int, epochs: int = 2) -> dict[str, Any]:
    """Second-epoch volumes/s of an MSD-layout datamodule, uncached vs MONAI CacheDataset."""
    from medvlp.datamodules.ct import MSDDataModule

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
    from medvlp.datamodules.xray import MIMICCXRDataModule

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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints JSON and a short summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on 2 CPU cores)")
    ap.add_argument("--out", default="results/perf.json")
    ap.add_argument("--only", nargs="*", default=["probe", "throughput", "clip_step", "text_cache", "loader3d", "mfu",
                                                  "mimic_index"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
            "mimic_index": lambda: bench_mimic_index(args.quick)}
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
