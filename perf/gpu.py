"""``python -m perf --gpu``: paper-size training steps on one GPU (``make perf-gpu``, under 5 minutes).

For CLIP (ViT-B/16 + BERT-base) and ASG at the paper preset, both random-initialised and built offline from
their configs (the text tower is a randomly initialised BERT of the paper's shape saved to a temporary folder,
so nothing is downloaded), it prints per configuration (fp32 and bf16 autocast eager, and ``torch.compile`` at bf16):
step time, samples/s, MFU (model FLOPs of one step counted by :class:`torch.utils.flop_counter.FlopCounterMode`
÷ step time ÷ the device's peak from :data:`PEAK_TFLOPS`) and peak allocated memory; and the samples/s of the
loader that would feed it (prepared shards at 224², ``num_workers`` = the CPU cores).

``--tiny`` runs the same code path with the tiny preset and 32² images (seconds on a CPU). Without a GPU the
benchmark runs on the CPU and says so (``note``); MFU is then ``None`` (no peak for a CPU).
"""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perf.fixtures import write_covidx

#: dense peak TFLOP/s per device (vendor data sheets; bf16 tensor cores without sparsity, fp32 = TF32 off)
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 67.0}, "H100": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}, "L40S": {"bf16": 362.0, "fp32": 91.6},
               "A10": {"bf16": 125.0, "fp32": 31.2}, "V100": {"bf16": None, "fp32": 15.7}}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for ``precision`` (``bf16``/``fp32``) of the first entry named in ``device_name``."""
    return next((v[precision] for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def _random_bert(folder: Path, hidden: int, layers: int, heads: int, vocab: int) -> str:
    """A randomly initialised BERT of the given shape, saved with a WordPiece tokenizer, for ``AutoModel``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from medvlp.encoders.text import _tiny_vocab

    words = list(dict.fromkeys(_tiny_vocab()))
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    cfg = BertConfig(vocab_size=max(vocab, len(words)), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=512)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _build(method: str, tiny: bool, bert: str, batch_size: int) -> tuple[Any, Any]:
    from medvlp.compose import compose
    from medvlp.config import to_container
    from medvlp.train import build_datamodule_from_config, build_method

    size = 32 if tiny else 224
    args = [f"method={method}", f"preset={'tiny' if tiny else 'paper'}", "data=phantom",
            "data.init_args.modality=xray", f"data.init_args.image_size={size}", "data.init_args.num_train=64",
            "data.init_args.num_val=8", "data.init_args.num_test=8", f"data.init_args.batch_size={batch_size}"]
    cfg = to_container(compose(args))
    enc = cfg["method"]["init_args"]
    enc.setdefault("image_encoder", {})["init_from"] = None
    if not tiny:
        enc.setdefault("text_encoder", {})["model"] = bert
    dm = build_datamodule_from_config(cfg)
    dm.prepare_data()
    return build_method(cfg, dm), dm


def _to(b: Any, device: str) -> Any:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}


def _step_stats(model: Any, batch: dict[str, Any], device: str, bf16: bool, compiled: bool, steps: int,
                name: str) -> dict[str, Any]:
    model = model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-5)
    losses = torch.compile(model._losses) if compiled else model._losses
    amp = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with amp:
            loss = model._total(losses(batch), "train")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    step()  # warm-up (and compilation)
    flops = None
    if not compiled:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    bs = model._bs(batch)
    peak = peak_tflops(name, "bf16" if bf16 else "fp32") if device == "cuda" else None
    return {"step_s": round(dt, 4), "samples_per_s": round(bs / dt, 1), "flops_per_step": flops,
            "mfu": round(flops / dt / (peak * 1e12), 3) if flops and peak else None,
            "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None}


def loader_rate(tiny: bool, batch_size: int, workers: int) -> dict[str, Any]:
    """Samples/s of ``data=shards prepared=…`` (uint8 at the training size) over all ``workers`` processes."""
    from medvlp.datamodules import COVIDxDataModule, ShardDataModule
    from medvlp.datamodules.io.prepare import prepare

    size, n = (32, 64) if tiny else (224, 512)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_covidx(Path(tmp) / "covidx", n,
                            lambda i: rng.integers(0, 255, (size + size // 7, size), dtype=np.uint8), quality=90)
        out = Path(tmp) / "prepared"
        prepare(COVIDxDataModule(str(root), image_size=size), out, samples_per_shard=max(n // (2 * workers), 8),
                workers=workers, progress=False)
        dm = ShardDataModule(prepared=str(out), image_size=size, batch_size=batch_size, num_workers=workers)
        t0 = time.perf_counter()
        count = sum(b["image"].shape[0] for _ in range(2) for b in dm.train_dataloader())
        dt = time.perf_counter() - t0
    return {"samples_per_s": round(count / dt, 1), "num_workers": workers, "image_size": size,
            "samples": count, "note": "includes worker start-up of two epochs"}


def bench_gpu(tiny: bool = False, steps: int | None = None) -> dict[str, Any]:
    """The ``--gpu`` report (see the module docstring)."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    steps = steps or (2 if tiny else 10)
    report: dict[str, Any] = {"device": name, "tiny": tiny, "steps": steps, "torch": torch.__version__}
    if not cuda:
        report["note"] = ("no CUDA device: ran on the CPU (numbers are not GPU numbers; MFU needs a device peak)"
                          + ("" if tiny else "; use --tiny for a CPU-sized run"))
    bs = 4 if tiny else 64
    compile_ok = hasattr(torch, "compile") and (cuda or not tiny or os.environ.get("MEDVLP_PERF_COMPILE") == "1")
    precisions = [False] + ([True] if (not cuda or torch.cuda.is_bf16_supported()) else [])
    with tempfile.TemporaryDirectory() as tmp:
        bert = "" if tiny else _random_bert(Path(tmp) / "bert-base", 768, 12, 12, 28996)
        for method in ("clip", "asg"):
            torch.manual_seed(0)
            model, dm = _build(method, tiny, bert, bs)
            batch = _to(next(iter(dm.train_dataloader())), device)
            res: dict[str, Any] = {"batch_size": model._bs(batch)}
            for bf16 in precisions:  # compiled once, at the training precision (bf16 where native): keeps < 5 min
                for compiled in ([False, True] if compile_ok and bf16 == precisions[-1] else [False]):
                    key = f"{'bf16' if bf16 else 'fp32'}_{'compile' if compiled else 'eager'}"
                    try:
                        res[key] = _step_stats(model, batch, device, bf16, compiled, steps, name)
                    except Exception as exc:  # noqa: BLE001 - a failing configuration is reported, not fatal
                        res[key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            if not compile_ok:
                res["compile"] = "not measured in --tiny on CPU (compilation dominates; MEDVLP_PERF_COMPILE=1 runs it)"
            report[method] = res
            del model
    cores = os.cpu_count() or 1
    report["loader"] = loader_rate(tiny, bs, cores if cuda else min(2, cores))
    return report


def summary(report: dict[str, Any]) -> str:
    """One line per configuration: step time, samples/s, MFU, peak memory."""
    lines = [f"device: {report['device']}" + (f" ({report['note']})" if "note" in report else "")]
    for method in ("clip", "asg"):
        for key, r in report[method].items():
            if isinstance(r, dict) and "step_s" in r:
                lines.append(f"{method} {key}: {r['step_s'] * 1000:.1f} ms/step, {r['samples_per_s']} samples/s, "
                             f"MFU {r['mfu']}, peak {r['peak_mem_mb']} MB")
            elif isinstance(r, dict):
                lines.append(f"{method} {key}: {r.get('error')}")
    lo = report["loader"]
    lines.append(f"loader (prepared shards, {lo['num_workers']} workers): {lo['samples_per_s']} samples/s")
    return "\n".join(lines)
