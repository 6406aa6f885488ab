"""The newcomer's path: what a first user runs into (16-bit images, typo suggestions, one-line errors
before any work, quiet start-up, report rendering), each checked as the user meets it."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp.pretrained.preprocess import Preprocess


def _png16(path: Path, lo: int = 983, hi: int = 15402) -> np.ndarray:
    from PIL import Image

    arr = np.linspace(lo, hi, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(arr).save(path)
    with Image.open(path) as im:
        read = np.asarray(im)
    assert read.dtype in (np.uint16, np.int32) and int(read.max()) == hi  # PIL reads 16-bit PNGs as I;16 / I
    return read.astype(np.uint16)


def test_preprocess_scales_a_16bit_png_by_its_bit_depth(tmp_path: Path) -> None:
    pre = Preprocess(image_size=32, channels=1, mean=(0.5,), std=(0.5,))
    raw = _png16(tmp_path / "cxr16.png")
    with pytest.warns(UserWarning, match="bit_depth"):  # 14-bit data in 16 bits: said, not silent
        x = pre.image(raw)
    assert x.shape == (1, 1, 32, 32)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # [0, 1] normalised by mean = std = 0.5
    expected_max = (15402 / 65535 - 0.5) / 0.5
    assert float(x.max()) == pytest.approx(expected_max, abs=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = pre.image(raw, bit_depth=14)
        assert float(full.max()) == pytest.approx((15402 / 16383 - 0.5) / 0.5, abs=0.02)
        mm = pre.image(raw, scale="minmax")  # as the datamodules read files
        assert float(mm.min()) == pytest.approx(-1.0, abs=0.02) and float(mm.max()) == pytest.approx(1.0, abs=0.02)
        u8 = pre.image((np.asarray(raw, np.float64) / 65535 * 255).astype(np.uint8))
        assert torch.allclose(u8, x, atol=0.02)  # 8 and 16 bits of one picture agree
    with pytest.raises(ValueError, match="bit_depth=12"):
        pre.image(raw, bit_depth=12)


# ------------------------------------------------------------------------------------------- typo suggestions
@pytest.mark.parametrize("args,suggestion", [
    (["pretrain", "method=clpi"], "did you mean clip?"),
    (["list", "method=clpi"], "did you mean clip?"),
    (["list", "protocol=zero_shoot"], "did you mean zero_shot?"),
    (["config", "preset=tinny"], "did you mean tiny?"),
    (["benchmark", "suite=quickstrat"], "did you mean quickstart?"),
    (["config", "trainer.max_stpes=5"], "did you mean trainer.max_steps?"),
])
def test_typos_in_names_get_a_suggestion(args: list[str], suggestion: str, capsys: pytest.CaptureFixture[str]) -> None:
    from medvlp.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert suggestion in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- start-up
def _fresh(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its stdout."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("args,message", [
    (["--help"], ""),
    (["config", "trainer.max_stpes=5"], "did you mean trainer.max_steps?"),
    (["pretrain", "run.sed=1"], "did you mean run.seed?"),
    (["evaluate", "ckpt=/nonexistent/last.ckpt"], "checkpoint not found: /nonexistent/last.ckpt"),
    (["benchmark", "suite=quickstrat"], "did you mean quickstart?"),
    (["experiments", "names=[exp_xry]"], "did you mean exp_xray?"),
])
def test_help_and_early_errors_import_no_model_library(args: list[str], message: str, tmp_path: Path) -> None:
    """``--help``, a config typo and a missing file are answered before torch, Lightning or the benchmark
    harness is imported (which takes seconds) and before any data is built."""
    out = _fresh(f"""
import contextlib, io, sys
from medvlp.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = main({args!r})
heavy = sorted(m for m in ("torch", "lightning", "monai", "transformers", "medvlp.benchmarks") if m in sys.modules)
print(code, heavy, err.getvalue().strip())
""", tmp_path)
    code, rest = out.split(" ", 1)
    assert code == ("0" if args == ["--help"] else "2")
    assert rest.startswith("[]"), rest
    assert message in rest
    assert not (tmp_path / ".cache").exists() and not list(tmp_path.iterdir())  # nothing generated


# ------------------------------------------------------------------------------------------- GTGM modality
def test_shared_mixed_argument_that_a_child_overrides_is_refused() -> None:
    """`method=gtgm data.init_args.modality=mri` used to train on CT, MRI and EM (GTGM's example data is a
    mixed datamodule whose children set their own modality)."""
    from medvlp.compose import compose
    from medvlp.validate import ConfigError

    with pytest.raises((ConfigError, ValueError), match=r"children \['ct', 'em'\] set their own modality"):
        compose(["method=gtgm", "data.init_args.modality=mri", "preset=tiny"])
    cfg = compose(["method=gtgm", "data=phantom", "data.init_args.modality=mri",
                   "data.init_args.captions={type: template}", "preset=tiny"])
    assert cfg.data.name == "phantom" and cfg.data.init_args.modality == "mri"
    assert compose(["method=gtgm", "data.init_args.batch_size=3", "preset=tiny"]).data.init_args.batch_size == 3


# ------------------------------------------------------------------------------------------- experiments out=
def test_experiments_out_holds_the_suites_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from medvlp.cli import main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from medvlp.benchmarks.kit.protocol import mean_recipe
    from medvlp.benchmarks.suite.results import ResultStore

    out = tmp_path / "exps"
    v = np.ones(8)
    ResultStore(out / "exp_gtgm" / "results.csv").add(  # a stored run of the suite, in out/<suite>
        [dict(label="random_init", dataset="phantom_ct", protocol="zero_shot", params="{}", fraction=1.0,
              pretrain_seed=0, subset_seed=0, seed=0, metric="auc", value=1.0, flags="")],
        {"v": v, "ids": np.arange(8).astype(str)}, {"auc": mean_recipe("v")})
    assert main(["experiments", "names=[exp_gtgm]", "run=false", f"out={out}"]) == 0
    assert (out / "exp_gtgm" / "experiment.yaml").is_file() and (out / "claims.csv").is_file()
    assert "gtgm" in (out / "claims.md").read_text()
    assert not (elsewhere / "results").exists()  # nothing read or written relative to the cwd


# ------------------------------------------------------------------------------------------- loading
def test_load_names_every_format_and_from_pretrained_points_at_load(tmp_path: Path) -> None:
    import medvlp

    with pytest.raises(KeyError) as err:
        medvlp.load("mgcaa", str(tmp_path / "x.ckpt"))
    assert "did you mean mgca?" in str(err.value) and "medvlp (a medvlp training checkpoint)" in str(err.value)
    assert "export (a `medvlp export` folder)" in str(err.value)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match=r"medvlp.load\('medvlp'"):
        medvlp.from_pretrained(str(ckpt))
    with pytest.raises(FileNotFoundError, match="no such export folder"):
        medvlp.from_pretrained(str(tmp_path / "missing" / "clip"))


# ------------------------------------------------------------------------------------------- noise
def test_pooler_only_load_report_is_dropped_and_other_reports_kept(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from medvlp.encoders.text import TextEncoder, _build_tiny

    tok, model = _build_tiny(32)
    model.pooler = None  # saved without the pooler that medvlp drops anyway
    tok.save_pretrained(str(tmp_path / "bert"))
    model.save_pretrained(str(tmp_path / "bert"))
    capfd.readouterr()
    TextEncoder(model=str(tmp_path / "bert"))
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out
    assert "Loading weights" not in captured.err  # no per-load progress bar

    import logging

    from medvlp.noise import PoolerOnlyReport

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, msg, None, None)

    keep = "BertModel LOAD REPORT from: x\nKey | Status\n---\nencoder.layer.0.w | MISSING |\npooler.dense.bias | MISSING |"
    drop = "BertModel LOAD REPORT from: x\nKey | Status\n---\npooler.dense.weight | MISSING |\npooler.dense.bias | MISSING |"
    assert PoolerOnlyReport().filter(record(keep)) and not PoolerOnlyReport().filter(record(drop))


def test_pretrain_prints_no_lightning_tip_and_each_message_once(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "MEDVLP_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "medvlp.cli", "pretrain", "method=clip", "preset=tiny",
                           "trainer.max_steps=1", "trainer.enable_progress_bar=false", f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "💡 Tip" not in log and "srun" not in log and "LeafSpec" not in log
    assert log.count("`Trainer.fit` stopped") == 1  # Lightning's messages print once, in medvlp's format


# ------------------------------------------------------------------------------------------- medvlp list
def test_list_aligns_long_names_and_keeps_whole_sentences() -> None:
    from medvlp.describe import list_all, packaged_names

    lines = [ln for ln in list_all().splitlines() if ln.startswith("  ")]
    starts = {len(ln) - len(ln[2:].split(" ", 1)[1].lstrip()) for ln in lines if " " in ln[2:].strip()}
    assert len(starts) == 1  # every description starts in one column, also after benchx_segmentation
    for name, text in packaged_names("medvlp.benchmarks.suites"):
        assert text.endswith((".", "!", "?", ")")) or not text, (name, text)
    demo = dict(packaged_names("medvlp.presets"))["demo"]
    assert demo.startswith("CPU-sized encoders for the demo:") and demo.endswith(".")
