"""Faults: SIGKILL mid-run then rerun (no lost or duplicated work), and property tests of the report
parser, the SIIM RLE decoder and the split builder."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medvlp.benchmarks.kit.splits import fraction_ids
from medvlp.datamodules.io.readers import DataError, rle_decode_siim
from medvlp.io import safe_load
from medvlp.reports import TripletParser, split_sentences

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medvlp.cli", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the fault could be injected: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run to make progress")
        time.sleep(0.05)


def test_sigkill_during_pretraining_then_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "method=clip", "preset=tiny", "trainer.max_steps=400", "run.checkpoint_every_n_steps=10",
            "trainer.enable_progress_bar=false", f"run.dir={run}", "data.init_args.num_train=64"]
    proc = _start(args, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    _wait_for(last.is_file, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_killed = safe_load(last)["global_step"]  # the file on disk is complete and loadable
    assert 0 < step_killed < 400
    done = subprocess.run([sys.executable, "-m", "medvlp.cli", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Restored all states from the checkpoint" in done.stderr
    assert safe_load(last)["global_step"] == 400


def test_sigkill_during_benchmark_then_rerun_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["benchmark", "suite=smoke", f"output={out}"]
    proc = _start(args, tmp_path)
    results = out / "results.csv"

    def some_rows() -> bool:
        return results.is_file() and len(pd.read_csv(results)) >= 3

    _wait_for(some_rows, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = pd.read_csv(results)  # never a half-written file
    done = subprocess.run([sys.executable, "-m", "medvlp.cli", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = pd.read_csv(results)
    key = ["label", "dataset", "protocol", "params", "fraction", "seed", "metric"]
    assert not final.duplicated(key).any()
    assert len(final) > len(partial)
    merged = partial.merge(final, on=key, suffixes=("_a", "_b"))
    assert len(merged) == len(partial) and np.allclose(merged["value_a"], merged["value_b"])  # kept, not redone
    assert set(final["protocol"]) == {"zero_shot", "retrieval", "linear_probe", "segmentation"}


# ---------------------------------------------------------------------------------------------- properties
PARSER = TripletParser()
WORDS = st.sampled_from(["no", "right", "left", "lower", "lobe", "effusion", "pneumothorax", "possible", "heart",
                         "size", "is", "normal", "opacity", "not", "seen", "may", "nodule", "2.5", "cm", ".", ",", ";",
                         "\n", "FINDINGS:", "IMPRESSION:", "ü", "apex", "base", "bilateral", "mid"])


@settings(max_examples=150, deadline=None)
@given(st.lists(WORDS, max_size=60).map(" ".join) | st.text(max_size=300))
def test_parser_never_crashes_and_stays_in_vocabulary(text: str) -> None:
    n_sent = len(split_sentences(text))
    for t in PARSER.parse(text):
        assert t.finding in PARSER.tags and t.existence in ("positive", "negative", "uncertain")
        assert t.region == "" or t.region in PARSER.regions
        assert 0 <= t.sentence < n_sent
    for a, b, s in split_sentences(text):
        assert text[a:b] == s and s.strip() == s


def _encode_siim(mask: np.ndarray) -> str:
    """Reference encoder: relative column-major RLE."""
    flat = mask.T.ravel()
    runs, pos, i = [], 0, 0
    while i < flat.size:
        if flat[i]:
            j = i
            while j < flat.size and flat[j]:
                j += 1
            runs += [i - pos, j - i]
            pos, i = j, j
        else:
            i += 1
    return " ".join(map(str, runs)) if runs else "-1"


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_rle_round_trip(h: int, w: int, data: st.DataObject) -> None:
    bits = data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    mask = np.array(bits, np.uint8).reshape(h, w)
    assert np.array_equal(rle_decode_siim(_encode_siim(mask), h, w), mask)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="0123456789 -x", max_size=40))
def test_rle_garbage_gives_data_error_or_a_mask(text: str) -> None:
    try:
        m = rle_decode_siim(text, 8, 8)
    except DataError:
        return
    assert m.shape == (8, 8) and set(np.unique(m)) <= {0, 1}


@settings(max_examples=150, deadline=None)
@given(st.sets(st.text(min_size=1, max_size=8), min_size=1, max_size=200), st.floats(0.001, 1.0), st.integers(0, 5))
def test_split_builder_properties(ids: set[str], fraction: float, seed: int) -> None:
    ids_l = sorted(ids)
    chosen = fraction_ids(ids_l, fraction, seed)
    assert len(chosen) == min(len(ids_l), max(2, math.ceil(fraction * len(ids_l))))
    assert set(chosen) <= ids and len(set(chosen)) == len(chosen)
    assert chosen == fraction_ids(list(reversed(ids_l)), fraction, seed)
    assert set(fraction_ids(ids_l, 1.0, seed)) == ids


def test_nan_gradient_guard_names_the_parameter() -> None:
    from medvlp.method import NonFiniteLossError
    from tests.conftest import build_tiny

    method, _ = build_tiny("clip")
    p = next(method.image_encoder.parameters())
    p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite gradient in 'image_encoder"):
        method.on_after_backward()
