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


# ------------------------------------------------------------------------------------------- report rendering
def _retrieval_results(folder: Path, n: int = 10) -> Path:
    """Two methods on ``n`` test pairs: recall@10 is 1.0 for both (K = N), recall@1 differs."""
    from medvlp.benchmarks.kit.protocol import recall_recipe
    from medvlp.benchmarks.suite.results import ResultStore

    store = ResultStore(folder / "results.csv")
    rng = np.random.default_rng(0)
    for label, good in (("random_init", 0.1), ("clip", 0.6)):
        ranks = np.where(rng.random(n) < good, 0, rng.integers(1, n, n))
        rows = [dict(label=label, dataset="d", protocol="retrieval", protocol_name="retrieval", params="{}",
                     fraction=1.0, pretrain_seed=0, subset_seed=0, seed=0, metric=m,
                     value=float(np.mean(ranks < k)), flags="", definition=f"image→text recall@{k}")
                for m, k in (("i2t_R@10", 10), ("i2t_R@1", 1))]
        store.add(rows, {"ranks": ranks, "ids": np.arange(n).astype(str)},
                  {"i2t_R@10": recall_recipe("ranks", 10, n), "i2t_R@1": recall_recipe("ranks", 1, n)})
    return folder / "results.csv"


def test_headline_skips_a_metric_at_its_ceiling_and_never_bolds_a_tie(tmp_path: Path) -> None:
    from medvlp.benchmarks.report.tables import headline_table, report, saturated

    md = report(_retrieval_results(tmp_path), plots=False, n_boot=200)
    head = md.split("## Headline", 1)[1].split("\n\n")[2]
    assert "i2t_R@1 " in head and "i2t_R@10" not in head  # recall@10 of 10 pairs is 1.0 for everyone
    import pandas as pd

    tie = pd.DataFrame({"label": ["a", "b"], "dataset": "d", "column": "retrieval", "metric": "m", "n_test": 10,
                        "mean": [1.0, 1.0], "lo": [1.0, 1.0], "hi": [1.0, 1.0], "n": 1, "degenerate": False,
                        "flags": "", "protocol": "retrieval", "protocol_name": "retrieval", "params": "{}",
                        "fraction": 1.0, "higher_is_better": True})
    assert saturated(tie)
    table, _ = headline_table(tie, pd.DataFrame(), None)
    assert not any("**" in str(v) for v in table.to_numpy().ravel())  # a tie is no best


def test_report_renders_bold_in_latex_and_html_and_definitions_without_markdown(tmp_path: Path) -> None:
    from medvlp.benchmarks.report.tables import report

    report(_retrieval_results(tmp_path), plots=False, n_boot=200)
    tex = (tmp_path / "table.tex").read_text()
    assert r"\textbf{" in tex and "**" not in tex
    page = (tmp_path / "report.html").read_text()
    assert "**" not in page and "<b>d retrieval i2t_R@1</b>" in page


def test_wide_tables_are_split_in_latex_and_html() -> None:
    import pandas as pd

    from medvlp.benchmarks.report.tables import MAX_COLUMNS, _html_table, to_latex

    table = pd.DataFrame([[f"{i}.000" for i in range(16)]], index=pd.Index(["clip"], name="method"),
                         columns=[f"col{i}" for i in range(16)])
    tex = to_latex(table)
    assert tex.count(r"\begin{tabular}") == -(-16 // MAX_COLUMNS)
    assert all(line.count("&") <= MAX_COLUMNS for line in tex.splitlines())
    assert _html_table(table).count("<table>") == -(-16 // (2 * MAX_COLUMNS))


def test_figures_promise_only_what_they_draw_and_label_each_fraction(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from medvlp.benchmarks.report.tables import add_columns, plot

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    rows = []
    for label in ("a", "b"):
        for metric in ("dice", "dice_mgca_per_image"):  # segmentation: no chance level
            rows.append(dict(label=label, dataset="d", protocol="segmentation", protocol_name="segmentation",
                             params="{}", fraction=1.0, metric=metric, mean=0.5, std=0.0, n=1, lo=0.4, hi=0.6,
                             chance=np.nan, degenerate=False, flags="", samples="[]", higher_is_better=True))
        for frac in (0.01, 0.03, 0.1, 0.3, 1.0):
            rows.append(dict(label=label, dataset="d", protocol="linear_probe", protocol_name="linear_probe",
                             params="{}", fraction=frac, metric="auc", mean=0.6, std=0.0, n=1, lo=0.5, hi=0.7,
                             chance=0.5, degenerate=False, flags="", samples="[]", higher_is_better=True))
    plot(add_columns(pd.DataFrame(rows)), tmp_path)
    titles = [ax.get_title() for fig in figures for ax in fig.axes]
    seg = next(t for t in titles if "segmentation" in t and "whiskers" in t)
    assert "chance" not in seg
    curve = next(ax for fig in figures for ax in fig.axes if ax.get_xscale() == "log")
    labels = [t.get_text() for t in curve.get_xticklabels() if t.get_text()]
    assert labels == ["0.01", "0.03", "0.1", "0.3", "1"]
    assert not [t.get_text() for t in curve.get_xticklabels(minor=True) if t.get_text()]


# ------------------------------------------------------------------------------------------- docstrings
def test_each_argument_has_its_own_description_and_skip_keys_are_explained() -> None:
    from medvlp.datamodules.base import VLPDataModule
    from medvlp.datamodules.io.csv_manifest import CSVDataModule
    from medvlp.describe import docstring_args

    args = docstring_args(CSVDataModule)
    assert args["val_fraction"] == "hash-split validation share."
    assert args["test_fraction"] == "hash-split test share."
    doc = VLPDataModule.skip_report.__doc__ or ""
    assert "``train+aug``" in doc and "index:<reason>" in doc
