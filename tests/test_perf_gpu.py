"""``python -m perf --gpu --tiny``: the GPU benchmark's code path runs on a CPU with a tiny config."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def perf_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # perf/ is not installed
    yield
    for name in [m for m in sys.modules if m == "perf" or m.startswith("perf.")]:
        del sys.modules[name]


def test_gpu_benchmark_tiny_runs_on_cpu_and_reports_every_field(tmp_path, perf_on_path, capsys) -> None:
    from perf.bench import main
    from perf.gpu import peak_tflops

    assert main(["--gpu", "--tiny", "--steps", "1", "--out", str(tmp_path / "gpu.json")]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert "no CUDA device" in report["note"]  # the CPU fallback says so
    for method in ("clip", "asg"):
        fp32 = report[method]["fp32_eager"]
        assert fp32["step_s"] > 0 and fp32["samples_per_s"] > 0 and fp32["flops_per_step"] > 0
        assert fp32["mfu"] is None  # no peak for a CPU
    assert report["loader"]["samples_per_s"] > 0
    out = capsys.readouterr().out
    assert "clip fp32_eager" in out and "asg fp32_eager" in out and "samples/s" in out
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0 and peak_tflops("NVIDIA H200", "fp32") == 67.0


def test_mgca_linear_forward_counts_follow_the_printed_formula(perf_on_path) -> None:
    from perf.bench import mgca_linear_forward_counts

    r = mgca_linear_forward_counts(epochs=2, fractions=(0.5, 1.0), seeds=1, n_train=10, n_val=3, n_test=4)
    assert r["mgca_forwards"] == (2 * (5 + 3) + 4) + (2 * (10 + 3) + 4)
    assert r["mgca_linear_val_test_cached_forwards"] == 2 * 5 + 2 * 10 + 3 + 4
    assert r["cached_probe_forwards"] == 17 and "E*(f*N_train + N_val) + N_test" in r["formula"]
