"""Attacks through checkpoints, configs, suites and the environment: nothing may execute.

Each attack names a command that would create a marker file; the test asserts the marker never appears
and that the user sees one clear line (the CLI's exit code 2 and ``error:`` message).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from medvlp.cli import main
from medvlp.config import instantiate, persistable
from medvlp.method import load_method
from medvlp.registry import DATAMODULES, METHODS, ClassPathError, import_class_path

TINY = ["preset=tiny", "trainer.enable_progress_bar=false"]


def _touch_args(marker: Path) -> list[str]:
    return ["touch", str(marker)]


def _write_ckpt(path: Path, meta: dict) -> Path:
    torch.save({"state_dict": {}, "medvlp": meta}, path)  # passes weights_only=True loading
    return path


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0]
    return lines[0]


def test_checkpoint_metadata_class_path_is_never_called(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    ckpt = _write_ckpt(tmp_path / "evil.ckpt", {"method": "evil", "class_path": "os.system",
                                                 "hparams": {"command": f"touch {marker}"}})
    with pytest.raises(ValueError, match="not registered"):
        load_method(str(ckpt))
    with pytest.raises(ClassPathError, match="os.system"):  # even with the opt-in: not a VLPMethod
        load_method(str(ckpt), allow_class_path=True)
    assert main(["evaluate", f"ckpt={ckpt}", "data=phantom", f"out={tmp_path / 'out'}"]) == 2
    assert "not registered" in _one_error_line(capsys.readouterr().err)
    assert main(["evaluate", f"ckpt={ckpt}", "allow_class_path=true", f"out={tmp_path / 'out'}"]) == 2
    assert "not a subclass of medvlp.method.VLPMethod" in _one_error_line(capsys.readouterr().err)
    assert not marker.exists()


def test_nested_encoder_class_path_in_checkpoint_hparams_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = {"class_path": "subprocess.Popen", "init_args": {"args": _touch_args(marker)}}
    for key in ("image_encoder", "text_encoder"):
        ckpt = _write_ckpt(tmp_path / f"{key}.ckpt", {"method": "clip", "class_path": "medvlp.methods.clip.CLIP",
                                                       "hparams": {key: evil}})
        with pytest.raises(ClassPathError, match="subprocess.Popen.*torch.nn.modules.module.Module"):
            load_method(str(ckpt))
    assert not marker.exists()


def test_checkpoint_opt_in_accepts_only_method_subclasses(tmp_path: Path) -> None:
    ckpt = _write_ckpt(tmp_path / "dm.ckpt", {"method": "x", "class_path": "medvlp.datamodules.phantom.datamodule.PhantomDataModule",
                                               "hparams": {}})
    with pytest.raises(ClassPathError, match="VLPMethod"):
        load_method(str(ckpt), allow_class_path=True)


@pytest.mark.parametrize("args", [
    ["pretrain", "data=subprocess.Popen", "data.init_args.args=[touch,{marker}]"],
    ["pretrain", "method=subprocess.Popen", "method.init_args.args=[touch,{marker}]"],
    ["pretrain", "method=clip", "method.init_args.text_encoder.class_path=subprocess.Popen",
     "method.init_args.text_encoder.init_args.args=[touch,{marker}]"],
    ["pretrain", "method=clip", "method.init_args.image_encoder.class_path=os.system",
     "method.init_args.image_encoder.init_args.command='touch {marker}'"],
])
def test_config_class_path_to_a_non_subclass_is_refused(args: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    argv = [a.replace("{marker}", str(marker)) for a in args] + TINY + [f"run.dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "not a subclass of" in line
    assert not marker.exists()


def test_evaluate_and_suite_datasets_cannot_name_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    ckpt = _write_ckpt(tmp_path / "x.ckpt", {"method": "clip", "class_path": "medvlp.methods.clip.CLIP", "hparams": {}})
    assert main(["evaluate", f"ckpt={ckpt}", "data.name=subprocess.Popen",
                 f"data.init_args.args=[touch,{marker}]", f"out={tmp_path / 'out'}"]) == 2
    assert "not a subclass of" in _one_error_line(capsys.readouterr().err)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
output: {tmp_path / 'suite_out'}
methods: {{random: {{method: clip, pretrain: false}}}}
datasets: {{evil: {{name: subprocess.Popen, init_args: {{args: [touch, {marker}]}}}}}}
protocols: {{zero_shot: {{}}}}
""")
    assert main(["benchmark", f"suite={suite}"]) == 2
    assert "not a subclass of" in _one_error_line(capsys.readouterr().err)
    assert not marker.exists()


def test_registry_and_instantiate_check_before_calling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ClassPathError):
        instantiate({"class_path": "subprocess.Popen", "init_args": {"args": _touch_args(marker)}},
                    expected=torch.nn.Module)
    with pytest.raises(ClassPathError, match="must be a dotted"):
        import_class_path("os.system; rm -rf /", object)
    with pytest.raises(ClassPathError, match="LightningDataModule"):
        DATAMODULES.get("medvlp.methods.clip.CLIP")
    with pytest.raises(ClassPathError, match="VLPMethod"):
        METHODS.get("builtins.print")
    assert not marker.exists()


def test_suite_file_cannot_turn_off_weights_only_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for block in ("pretrain: {run: {weights_only_resume: false}}",
                  "methods: {clip: {overrides: [run.weights_only_resume=false]}}"):
        suite = tmp_path / "suite.yaml"
        methods = "" if block.startswith("methods") else "methods: {clip: {}}\n"
        suite.write_text(f"output: {tmp_path / 'out'}\n{methods}{block}\n"
                         "datasets: {phantom: {name: phantom}}\nprotocols: {zero_shot: {}}\n")
        assert main(["benchmark", f"suite={suite}"]) == 2
        assert "only the command line can" in _one_error_line(capsys.readouterr().err)
        assert not (tmp_path / "out" / "runs").exists()  # refused before any pretraining


def test_command_line_turns_off_weights_only_resume_with_a_warning(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from medvlp.benchmarks.suite.runner import UNSAFE_RESUME_KEY, method_config

    suite = {"name": "s", "output": str(tmp_path), "methods": {"clip": {}}, UNSAFE_RESUME_KEY: False}
    cfg = method_config(suite, "clip", {})
    assert cfg.run.weights_only_resume is False
    assert method_config({**suite, UNSAFE_RESUME_KEY: True}, "clip", {}).run.weights_only_resume is True


def test_environment_values_are_never_persisted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_dir = tmp_path / "s3cr3t-token-value"
    monkeypatch.setenv("MEDVLP_TEST_SECRET", str(secret_dir))
    monkeypatch.setenv("MEDVLP_TEST_MODALITY", "s3cr3t")
    runs = tmp_path / "runs"
    assert main(["pretrain", "method=clip", *TINY, f"run.root={runs}",
                 "data.init_args.cache_dir=${oc.env:MEDVLP_TEST_SECRET}"]) == 0
    written = [p for p in runs.rglob("*")]
    assert written and not any("s3cr3t" in str(p) for p in written)  # folder names
    for p in written:
        if p.is_file() and p.suffix in (".yaml", ".json", ".csv"):
            assert "s3cr3t" not in p.read_text(), p
    config = next(runs.rglob("config.yaml")).read_text()
    assert "${oc.env:MEDVLP_TEST_SECRET}" in config
    from medvlp.compose import compose
    from medvlp.train import run_dir

    cfg = compose(["method=clip", "data.init_args.modality=${oc.env:MEDVLP_TEST_MODALITY}", f"run.root={runs}"])
    assert "s3cr3t" not in str(run_dir(cfg))
    assert persistable(cfg)["data"]["init_args"]["modality"] == "${oc.env:MEDVLP_TEST_MODALITY}"


def test_env_interpolated_through_another_key_stays_unresolved(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    monkeypatch.setenv("MEDVLP_TEST_SECRET", "hunter2")
    cfg = OmegaConf.create({"a": "${oc.env:MEDVLP_TEST_SECRET}", "b": "${a}", "c": "x/${oc.env:MEDVLP_TEST_SECRET}",
                            "d": "${e}", "e": 5})
    assert persistable(cfg) == {"a": "${oc.env:MEDVLP_TEST_SECRET}", "b": "${oc.env:MEDVLP_TEST_SECRET}",
                                "c": "x/${oc.env:MEDVLP_TEST_SECRET}", "d": 5, "e": 5}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(umask: int, mode: int, tmp_path: Path) -> None:
    from medvlp.io import atomic_torch_save, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "b.ckpt")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.ckpt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
