"""Everyday CLI use: config validation with suggestions, one-line errors, help/version/list, loggers,
callbacks and plugins from config, one log line per message and the progress description."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback

from medvlp.cli import main
from medvlp.compose import compose
from medvlp.validate import ConfigError

class RecordingCallback(Callback):
    """A user callback named by ``trainer.callbacks``: writes a file when training starts."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        Path(self.path).write_text("started")


@pytest.mark.parametrize("override, expected", [
    ("run.sed=3", "unknown key run.sed (did you mean run.seed?)"),
    ("trainer.max_stpes=5", "unknown key trainer.max_stpes (did you mean trainer.max_steps?)"),
    ("method.init_args.temprature=0.1", "unknown key method.init_args.temprature (did you mean method.init_args.temperature?)"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc' is str, expected int"),
    ("run.resume=maybe", "run.resume='maybe' is str, expected bool"),
    ("method.init_args.embed_dim=1.5", "method.init_args.embed_dim=1.5 is float, expected int"),
    ("data.init_args.batch_sise=4", "unknown key data.init_args.batch_sise (did you mean data.init_args.batch_size?)"),
    ("method.init_args.optimizer.lrr=1", "unknown key method.init_args.optimizer.lrr (did you mean method.init_args.optimizer.lr?)"),
    ("method.init_args.image_encoder.dept=2", "did you mean method.init_args.image_encoder.depth?"),
    ("logger=tensorbord", "trainer.logger='tensorbord' is not a logger shorthand (did you mean tensorboard?)"),
    ("trainr.max_steps=1", "unknown key trainr (did you mean trainer?)"),
    ("trainer.callbacks=[{class_path: datetime.timedelta}]", "not a subclass of lightning.pytorch.callbacks.callback.Callback"),
])
def test_user_errors_are_one_line_with_a_suggestion(override: str, expected: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", "preset=tiny", override, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not run.exists()  # failed before any work


def test_errors_are_collected_and_debug_shows_the_traceback() -> None:
    with pytest.raises(ConfigError) as info:
        compose(["preset=tiny", "run.sed=1", "method.init_args.temprature=1"])
    assert "run.sed" in str(info.value) and "temprature" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean run.seed"):
        main(["config", "preset=tiny", "run.sed=1", "--debug"])


def test_mixed_children_and_method_specific_args_are_checked() -> None:
    compose(["method=asg", "preset=tiny", "method.init_args.local_temperature=0.2"])  # valid: no error
    with pytest.raises(ConfigError, match=r"datamodules\.ct\.init_args\.image_sise \(did you mean"):
        compose(["method=unimedi", "preset=tiny", "data.init_args.image_sise=8"])


def test_suite_keys_and_protocol_parameters_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["benchmark", "suite=smoke", f"output={tmp_path / 'out'}"]
    assert main([*args, "protocols.retrieval.k=[1]"]) == 2
    assert "unknown key protocols.retrieval.k (did you mean protocols.retrieval.ks?)" in capsys.readouterr().err
    assert main([*args, "protocols.linear_probe.c=2"]) == 2
    assert "did you mean protocols.linear_probe.C?" in capsys.readouterr().err
    assert main([*args, "datasets.phantom_xray.init_args.num_trian=3", "methods.clip.init_arg={}"]) == 2
    err = capsys.readouterr().err
    assert "did you mean datasets.phantom_xray.init_args.num_train?" in err
    assert "did you mean methods.clip.init_args?" in err
    assert main([*args, "pretrain.trainer.max_stepz=1"]) == 2  # the merged per-method run config
    assert "did you mean trainer.max_steps?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["list", "pretrain", "config", "evaluate", "benchmark", "report", "demo"])
def test_command_help_exits_zero(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"medvlp {command}" in capsys.readouterr().out


def test_version_and_list_details(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("medvlp 0.")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "presets:" in out and "tiny" in out and "suites:" in out and "smoke" in out
    assert main(["list", "method=asg"]) == 0
    out = capsys.readouterr().out
    assert "local_temperature: float = " in out and "τ of ARSA" in out  # signature default + docstring
    assert "temperature: float = 0.07" in out  # inherited from the base class through **kwargs
    assert main(["list", "protocol=linear_probe"]) == 0
    assert "C: inverse L2 strength" in capsys.readouterr().out
    assert main(["list", "method=nope"]) == 2


def test_runtime_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["benchmark", f"suite={tmp_path / 'missing.yaml'}"]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and err.count("\n") == 1


def test_logger_false_trains_without_a_logger(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", "preset=tiny", "trainer.logger=false", "trainer.enable_progress_bar=false",
                 f"run.dir={run}"]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not (run / "logs").exists()
    import json

    prov = json.loads((run / "summary.json").read_text())["provenance"]
    assert set(prov) == {"versions", "git_commit", "host", "python", "device"}
    assert prov["versions"]["lightning"] and prov["versions"]["medvlp"]


def _tfrecord_scalars(path: Path) -> dict[str, list[float]]:
    """Scalars of a TensorBoard event file, parsed from its TFRecord framing."""
    try:
        from tensorboardX.proto.event_pb2 import Event
    except ImportError:
        from tensorboard.compat.proto.event_pb2 import Event  # type: ignore[no-redef]
    data, pos, out = path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append(v.simple_value)
    return out


def test_tensorboard_logger_callbacks_and_lr_monitor(tmp_path: Path) -> None:
    import importlib.util

    if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        pytest.skip("tensorboard extra not installed (pip install 'medvlp[tensorboard]')")
    run, marker = tmp_path / "run", tmp_path / "callback_ran"
    assert main(["pretrain", "preset=tiny", "trainer.max_steps=3", "logger=[csv,tensorboard]",
                 "trainer.enable_progress_bar=false",
                 f"trainer.callbacks=[{{class_path: tests.test_cli_config.RecordingCallback, init_args: {{path: '{marker}'}}}}]",
                 f"run.dir={run}"]) == 0
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    scalars = _tfrecord_scalars(events[0])
    assert len(scalars["train/loss_step"]) == 3 and all(v == v for v in scalars["train/loss_step"])
    assert any(k.startswith("lr-AdamW") for k in scalars)  # LearningRateMonitor on by default
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    assert marker.read_text() == "started"


def test_lightning_messages_have_one_handler_and_progress_has_no_negative_epochs() -> None:
    import logging
    from types import SimpleNamespace

    from medvlp.cli.main import setup_logging
    from medvlp.train import StepProgressBar

    setup_logging()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        assert not [h for h in lg.handlers if isinstance(h, logging.StreamHandler)] and lg.propagate, name
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=100)
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_wandb_offline_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb extra not installed (pip install 'medvlp[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    assert main(["pretrain", "preset=tiny", "logger=wandb", "trainer.enable_progress_bar=false", f"run.dir={run}"]) == 0
    assert list((run / "wandb").glob("offline-run-*"))


def test_unit_progress_counts_and_estimates() -> None:
    from medvlp.progress import UnitProgress, format_seconds

    p = UnitProgress(5)
    assert p.step("a", seconds=None, n=2).startswith("unit 2/5 (a): elapsed ")  # skipped units: no timing
    assert p.step("a", seconds=None).endswith("ETA ?")
    assert p.step("b", seconds=30.0).endswith("ETA 30s")
    assert format_seconds(3725) == "1h02m" and format_seconds(65) == "1m05s"
