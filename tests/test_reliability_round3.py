"""Reliability, round 3: run folders resume only their own config, names never escape the output folder,
decompression bombs are refused from the header, environment values are never persisted, a config file
cannot turn weights-only resume off, refused inputs give one line, and failed writes exit 2."""
from __future__ import annotations

import errno
import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp.cli import main
from tests.test_csv_manifest import ARGS_2D, make_2d_fixture

TINY = ["preset=tiny", "trainer.enable_progress_bar=false", "trainer.logger=csv"]
BAD_NAMES = ["../../../x", "/abs/x", "a\x00b", "x" * 300, ".hidden", "a/b"]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if " error: " in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _pretrain(*args: str) -> int:
    return main(["pretrain", "method=clip", *TINY, *args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny CLIP run (2 steps) on the phantom; tests copy it before changing it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert _pretrain(f"run.dir={run}") == 0
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    # the stored config names its own folder: point it at the copy
    cfg = (dst / "config.yaml").read_text().replace(str(src), str(dst))
    (dst / "config.yaml").write_text(cfg)
    return dst


# ----------------------------------------------------------------------------- 1. resume only the same config
def test_default_run_folder_depends_on_the_data_spec(tmp_path: Path) -> None:
    from medvlp.compose import compose
    from medvlp.train import run_dir

    a = make_2d_fixture(tmp_path / "a")
    b = make_2d_fixture(tmp_path / "b", n=36)
    dirs = [run_dir(compose(["method=clip", "data=csv", f"data.init_args.manifest={m}", *ARGS_2D, "preset=tiny",
                             f"run.root={tmp_path / 'runs'}"])) for m in (a, b)]
    assert dirs[0] != dirs[1] and all(d.name.startswith("clip_csv-") for d in dirs)
    named = compose(["method=clip", "preset=tiny", f"run.root={tmp_path / 'runs'}", "run.name=mine"])
    assert run_dir(named) == tmp_path / "runs" / "mine"


def test_second_manifest_in_the_same_folder_is_refused_not_resumed(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The two-manifest trap: a run of manifest B in manifest A's folder used to 'pretrain' in seconds with 0 new
    steps, exit 0, and rewrite config.yaml to name B."""
    a = make_2d_fixture(tmp_path / "a")
    b = make_2d_fixture(tmp_path / "b", n=36)
    run = tmp_path / "run"
    common = ["data=csv", *ARGS_2D, f"run.dir={run}"]
    assert _pretrain(*common, f"data.init_args.manifest={a}") == 0
    stored = (run / "config.yaml").read_text()
    ckpt_bytes = (run / "checkpoints" / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert _pretrain(*common, f"data.init_args.manifest={b}") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "data.init_args.manifest" in line and str(a) in line and str(b) in line
    assert "run.name=" in line and "run.resume=false" in line and "run.overwrite=true" in line
    assert (run / "config.yaml").read_text() == stored  # not rewritten to name the new manifest
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == ckpt_bytes

    # overwrite: a fresh run, the old one moved aside inside the run folder (nothing deleted)
    assert _pretrain(*common, f"data.init_args.manifest={b}", "run.overwrite=true") == 0
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "last.ckpt").read_bytes() == ckpt_bytes
    assert str(b) in (run / "config.yaml").read_text()
    # the same config resumes, also with more steps (max_steps may change on resume)
    assert _pretrain(*common, f"data.init_args.manifest={b}", "trainer.max_steps=3") == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_3d_manifest_after_2d_names_the_other_run(finished_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_csv_manifest import ARGS_3D, make_3d_fixture

    run = _copy_run(finished_run, tmp_path / "run")
    manifest = make_3d_fixture(tmp_path / "vol")
    capsys.readouterr()
    assert _pretrain("data=csv", f"data.init_args.manifest={manifest}", *ARGS_3D, f"run.dir={run}") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "different config" in line and "data.name: 'phantom' (stored) vs 'csv' (new)" in line
    assert "state dict" not in line


def test_suite_does_not_score_the_old_model_on_an_edited_manifest(tmp_path: Path) -> None:
    from medvlp.benchmarks.suite.runner import method_config, obtain_model

    a = make_2d_fixture(tmp_path / "a")
    b = make_2d_fixture(tmp_path / "b", n=36)
    import yaml

    init = {a_.split("=", 1)[0].split(".")[-1]: yaml.safe_load(a_.split("=", 1)[1]) for a_ in ARGS_2D}
    suite = {"name": "s", "output": str(tmp_path / "out"), "preset": "tiny",
             "pretrain": {"trainer": {"max_steps": 2, "enable_progress_bar": False}}}

    def entry(manifest: Path) -> dict:
        return {"method": "clip", "data": {"name": "csv", "init_args": {**init, "manifest": str(manifest)}}}

    _, ckpt, _ = obtain_model(entry(a), "clip", method_config(suite, "clip", entry(a)))
    assert Path(ckpt).is_file()
    with pytest.raises(ValueError, match="data.init_args.manifest.*run.overwrite=true"):
        obtain_model(entry(b), "clip", method_config(suite, "clip", entry(b)))
    _, again, _ = obtain_model(entry(a), "clip", method_config(suite, "clip", entry(a)))  # same config: reused
    assert again == ckpt


# ----------------------------------------------------------------------------- 2. names never become paths
def test_suite_names_that_would_escape_the_output_folder_are_refused(tmp_path: Path) -> None:
    from medvlp.benchmarks.suite.runner import method_config
    from medvlp.benchmarks.suite.schema import check_suite
    from medvlp.validate import ConfigError

    for bad in BAD_NAMES:
        for section in ("methods", "datasets", "protocols"):
            suite = {"name": "s", "output": str(tmp_path / "out"), "methods": {"clip": {}},
                     "datasets": {"phantom": {"name": "phantom"}}, "protocols": {"zero_shot": {}}}
            suite[section] = {bad: suite[section][next(iter(suite[section]))]}
            with pytest.raises(ConfigError) as info:
                check_suite(suite)
            msg = str(info.value)
            assert "\n" not in msg and section in msg and ("characters" in msg or "dot" in msg or "only" in msg), msg
        with pytest.raises(ValueError, match="suite method label"):
            method_config({"name": "s", "output": str(tmp_path / "out")}, bad, {"method": "clip"})
    assert not any(p for p in tmp_path.rglob("*") if p.is_file())


def test_run_name_must_be_a_safe_folder_name(tmp_path: Path) -> None:
    from medvlp.compose import compose
    from medvlp.train import run_dir

    for bad in BAD_NAMES:
        cfg = compose(["method=clip", "preset=tiny", f"run.root={tmp_path}", f"run.name={json.dumps(bad)}"]) \
            if "\x00" not in bad else None
        if cfg is None:
            continue  # a NUL cannot be passed on a command line; the name check itself is tested below
        with pytest.raises(ValueError, match="run.name"):
            run_dir(cfg)
    from medvlp.paths import check_name, slug

    with pytest.raises(ValueError, match="run.name"):
        check_name("a\x00b", "run.name")
    for bad in BAD_NAMES:
        s = slug(bad)
        assert check_name(s, "slug") == s and "/" not in s and not s.startswith(".")
    assert slug("../x") != slug("/x") and slug("clip") == "clip"


def test_report_figures_of_hostile_dataset_names_stay_in_the_output_folder(tmp_path: Path) -> None:
    import pandas as pd

    from medvlp.benchmarks.report.tables import add_columns, plot, summarize

    outside = tmp_path / "outside"
    out = tmp_path / "report"
    out.mkdir()
    rows = []
    for ds in (f"../{outside.name}/x", str(outside / "abs"), "a\x00b", "y" * 300, ".hidden"):
        for lab in ("clip", "gloria"):
            for metric in ("auroc", "acc"):
                for frac in (0.1, 1.0):
                    for seed in (0, 1):
                        rows.append({"dataset": ds, "label": lab, "protocol": ds, "params": "{}",  # key from data too
                                     "fraction": frac, "metric": metric, "value": 0.7 + 0.01 * seed})
    paths = plot(add_columns(summarize(pd.DataFrame(rows))), out)
    assert paths
    for p in paths:
        assert p.parent == out and p.is_file() and not p.name.startswith("."), p
    assert not outside.exists()
    assert {p.resolve() for p in tmp_path.rglob("*.png")} == {p.resolve() for p in paths}


# ----------------------------------------------------------------------------- 3. decompression bombs
_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from medvlp.datamodules.io.readers import DataError, read_image_2d, read_volume
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    soft = int(sys.argv[3]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (soft, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    try:
        (read_volume if sys.argv[1] == "3d" else read_image_2d)(sys.argv[2])
        print("ACCEPTED")
    except (DataError, MemoryError) as exc:
        print("REFUSED", exc)
    print("GROWTH_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
""")


def _read_in_capped_process(kind: str, path: Path, cap_mb: int) -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, kind, str(path), str(cap_mb)], capture_output=True,
                         text=True, timeout=300, env=env)
    out = res.stdout.strip().splitlines()
    assert res.returncode == 0 and out, res.stderr[-2000:]
    return out[0], float(out[-1].split()[1])


def _nifti_bomb(path: Path, side: int) -> Path:
    """A .nii.gz of side³ uint8 zeros, streamed to disk (a few hundred KB on disk)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((side, side, side))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(hdr.binaryblock + b"\x00" * 4)
        chunk = bytes(side * side * 16)
        for _ in range(side // 16):
            fh.write(chunk)
        fh.write(bytes(side * side * (side % 16)))
    return path


def test_nifti_bomb_is_refused_from_the_header_under_a_memory_cap(tmp_path: Path) -> None:
    bomb = _nifti_bomb(tmp_path / "zeros.nii.gz", 640)  # 262 M voxels > 512³: 1 GB as float32
    assert bomb.stat().st_size < 2_000_000
    first, growth = _read_in_capped_process("3d", bomb, cap_mb=1500)
    assert first.startswith("REFUSED") and "zeros.nii.gz" in first and "(640, 640, 640)" in first, first
    assert "134,217,728" in first and "max_voxels" in first, first
    assert growth < 100, growth


def test_png_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("L", (9000, 6000)).save(big)  # 54 Mpx, below PIL's own bomb limit (89 Mpx)
    first, growth = _read_in_capped_process("2d", big, cap_mb=1500)
    assert first.startswith("REFUSED") and "big.png" in first and "(6000, 9000)" in first, first
    assert "50,000,000" in first and "max_pixels" in first, first
    assert growth < 60, growth


def test_hdf5_tiff_dicom_headers_are_checked_against_the_limits(tmp_path: Path) -> None:
    import h5py
    import tifffile

    from medvlp.datamodules.io.readers import DataError, read_image_2d, read_volume
    from tests.fixtures import write_dicom

    with h5py.File(tmp_path / "v.h5", "w") as f:  # chunked and never written: a few KB on disk
        f.create_dataset("img", shape=(600, 600, 600), dtype="f4", chunks=(8, 64, 64), compression="gzip")
    with pytest.raises(DataError, match=r"v.h5: header shape \(600, 600, 600\).*over the limit"):
        read_volume(f"{tmp_path / 'v.h5'}:img")
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((20, 64, 64), np.uint8), compression="zlib")
    with pytest.raises(DataError, match=r"v.tif: header shape \(20, 64, 64\) is 81,920 voxels.*1,000"):
        read_volume(tmp_path / "v.tif", max_voxels=1000)
    assert read_volume(tmp_path / "v.tif")[0].shape == (20, 64, 64)  # under the default limit
    write_dicom(tmp_path / "x.dcm", np.zeros((64, 48), np.uint16))
    with pytest.raises(DataError, match=r"x.dcm: header shape \(1, 64, 48\) is 3,072 pixels.*max_pixels"):
        read_image_2d(tmp_path / "x.dcm", max_pixels=1000)
    assert read_image_2d(tmp_path / "x.dcm").shape == (64, 48)


def test_volume_skip_message_names_file_shape_and_limit(tmp_path: Path) -> None:
    from monai.transforms import Compose

    from medvlp.datamodules.io.readers import DataError
    from medvlp.datamodules.volume.base import ReadVolumed, VolumeDataModule
    from tests.fixtures import write_nii

    write_nii(tmp_path / "v.nii.gz", np.zeros((40, 40, 40), np.float32))
    with pytest.raises(Exception) as info:
        Compose([ReadVolumed(["image"], max_voxels=1000)])({"image": str(tmp_path / "v.nii.gz")})
    cause: BaseException | None = info.value
    while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None and "v.nii.gz" in str(cause) and "(40, 40, 40)" in str(cause) and "1,000" in str(cause)
    import inspect

    assert "max_voxels" in inspect.signature(VolumeDataModule.__init__).parameters


# ----------------------------------------------------------------------------- 4. secrets
def _tiny_text_model(folder: Path) -> Path:
    from medvlp.encoders.text import _build_tiny

    tok, model = _build_tiny(32)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("resolver", ["env", "decode", "decode_quoted", "create"])
def test_no_environment_value_is_persisted_anywhere(resolver: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from medvlp.method import load_method

    secret = "s3cr3t-planted-value"
    model_dir = _tiny_text_model(tmp_path / f"{secret}-model")
    cache_dir = tmp_path / f"{secret}-cache"
    monkeypatch.setenv("MEDVLP_T_MODEL", str(model_dir))
    monkeypatch.setenv("MEDVLP_T_DIR", str(cache_dir))
    monkeypatch.setenv("MEDVLP_T_TEXT", f"{{model: {model_dir}, tiny_hidden_size: 32, max_length: 64}}")
    planted = {
        "env": ["method.init_args.text_encoder.model=${oc.env:MEDVLP_T_MODEL}",
                "data.init_args.cache_dir=${oc.env:MEDVLP_T_DIR}"],
        "decode": ["method.init_args.text_encoder.model=${oc.decode:${oc.env:MEDVLP_T_MODEL}}",
                   "data.init_args.cache_dir=${oc.decode:${oc.env:MEDVLP_T_DIR}}"],
        "decode_quoted": ["method.init_args.text_encoder.model=${oc.decode:'${oc.env:MEDVLP_T_MODEL}'}"],
        "create": ["method.init_args.text_encoder=${oc.create:${oc.env:MEDVLP_T_TEXT}}"],
    }[resolver]
    run = tmp_path / "run"
    assert _pretrain(f"run.dir={run}", *planted) == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "summary.json", "last.ckpt", "hparams.yaml", "metrics.csv"} <= names, names
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    assert "${oc.env:MEDVLP_T_" in (run / "config.yaml").read_text()
    model = load_method(str(run / "checkpoints" / "last.ckpt"))  # the environment is read again on load
    assert model.text_encoder.model_name == str(model_dir)


# ----------------------------------------------------------------------------- 5. weights-only resume
def test_config_file_cannot_turn_off_weights_only_resume(finished_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy_run(finished_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    _plant_pickle(run / "checkpoints" / "last.ckpt", marker)
    cfg = tmp_path / "unsafe.yaml"
    cfg.write_text("run: {weights_only_resume: false}\n")
    capsys.readouterr()
    assert _pretrain("-c", str(cfg), f"run.dir={run}", "trainer.max_steps=3") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "unsafe.yaml" in line and "weights_only_resume" in line and "only the command line" in line
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, path)


# ----------------------------------------------------------------------------- 6. one line, not a traceback
def test_refused_inputs_give_one_line_naming_what_was_refused(finished_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'trainer: !!python/object/apply:os.system ["touch {marker}"]\n')
    cases = [
        (["config", "-c", str(evil)], ["evil.yaml", "!!python", "line 1"]),
        (["config", "trainer.max_steps=[1,2"], ["trainer.max_steps=[1,2", "not valid YAML"]),
        (["config", "trainer.max_steps=${python:print(1)}"], ["trainer.max_steps", "python"]),
        (["config", "trainer.max_steps=${python:x}"], ["trainer.max_steps", "unknown resolver 'python'"]),
        (["pretrain", *TINY, f"run.dir={tmp_path / 'p'}", "trainer.profiler={class_path: os.system}"],
         ["os.system", "Profiler"]),
        (["report", f"results={tmp_path / 'none.csv'}", "n_boot=abc"], ["n_boot"]),
    ]
    for args, words in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        line = _one_error_line(capsys.readouterr().err)
        for w in words:
            assert w in line, (args, line)
    assert not marker.exists()


def test_planted_pickle_on_resume_is_one_line(finished_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy_run(finished_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    _plant_pickle(run / "checkpoints" / "last.ckpt", marker)
    capsys.readouterr()
    assert _pretrain(f"run.dir={run}", "trainer.max_steps=3") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "last.ckpt" in line and "not a weights-only checkpoint" in line and "system" in line
    assert not marker.exists()


def test_export_with_a_pickled_text_model_is_refused_in_one_line(finished_run: Path, tmp_path: Path) -> None:
    from medvlp.pretrained.export import export, from_pretrained

    out = export(finished_run / "checkpoints" / "last.ckpt", tmp_path / "export")
    marker = tmp_path / "pwned"
    torch.save({"payload": _Payload(marker)}, out / "text" / "pytorch_model.bin")
    with pytest.raises(ValueError) as info:
        from_pretrained(str(out))
    msg = str(info.value)
    assert "\n" not in msg and "text/pytorch_model.bin" in msg and "refused" in msg and "pickle" in msg
    assert not marker.exists()


# ----------------------------------------------------------------------------- 7. full disk
def _full_disk_open(real_open: object) -> object:
    class Full:
        def __init__(self, fh: object) -> None:
            self.fh = fh

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(self.fh, name)

        def __enter__(self) -> "Full":
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()  # type: ignore[attr-defined]

    def fake(path: object, mode: str = "r", *a: object, **k: object) -> object:
        fh = real_open(path, mode, *a, **k)  # type: ignore[operator]
        return Full(fh) if "w" in mode and "last.ckpt" in str(path) else fh

    return fake


def test_full_disk_during_the_checkpoint_write_is_one_line_and_exit_2(finished_run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """torch writes through the file object; its zip writer turned the OSError into
    "[enforce fail at inline_container.cc] . unexpected pos"."""
    import builtins

    from medvlp import io

    run = _copy_run(finished_run, tmp_path / "run")
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    monkeypatch.setattr(io, "open", _full_disk_open(builtins.open), raising=False)
    capsys.readouterr()
    assert _pretrain(f"run.dir={run}", "trainer.max_steps=3") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot write {run / 'checkpoints' / 'last.ckpt'}: no space left on device" in line, line
    assert "enforce fail" not in line
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


def test_every_failed_write_exits_2(finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from medvlp import io

    def no_space(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", no_space)  # results, features, shards and exports write through medvlp.io
    capsys.readouterr()
    assert main(["export", f"ckpt={finished_run / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'e'}"]) == 2
    assert "no space left on device" in _one_error_line(capsys.readouterr().err)
    from medvlp.cli.main import exit_code
    from medvlp.errors import WriteError

    assert exit_code(WriteError(errno.ENOSPC, "cannot write x: no space left on device")) == 2
    assert exit_code(OSError(errno.ENOSPC, "No space left on device", "/x/features.npz")) == 2
    assert exit_code(OSError(errno.EROFS, "Read-only file system")) == 2
    assert exit_code(RuntimeError("non-finite loss")) == 1


def test_nifti_header_declaring_huge_extensions_is_refused(tmp_path: Path) -> None:
    import nibabel as nib

    from medvlp.datamodules.io.readers import DataError, read_volume

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 2 ** 30  # 1 GiB of "extensions" before the data
    path = tmp_path / "ext.nii.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\x01\x00\x00\x00")
    with pytest.raises(DataError, match=r"ext.nii.gz: header declares 1,073,741,824 bytes.*16,777,216"):
        read_volume(path)
    from medvlp.datamodules.io.readers import MAX_HEADER_BYTES

    assert MAX_HEADER_BYTES == 16 * 2 ** 20  # the limit the README documents
