"""Registry, entry-point plugins (a real package installed from tests/plugin_pkg), CLI and configs."""
from __future__ import annotations

import datetime

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medvlp.cli import main
from medvlp.config import instantiate, load_yaml, merge
from medvlp.registry import METHODS, Registry, import_class_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("plugin_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "tests" / "plugin_pkg")], check=True)
    return target


def _run(args: list[str], plugin: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{plugin}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "medvlp.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_installed_plugin_is_listed_and_trains(plugin_path: Path, tmp_path: Path) -> None:
    out = _run(["list"], plugin_path, tmp_path)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "toy_infonce" in ln)
    assert "plugin medvlp-toy-plugin" in line
    out = _run(["pretrain", "method=toy_infonce", "preset=tiny", "trainer.enable_progress_bar=false",
                f"run.dir={tmp_path / 'run'}"], plugin_path, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert "temperature: 0.2" in (tmp_path / "run" / "config.yaml").read_text()  # the plugin's defaults_file


def test_list_shows_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("clip", "asg", "unimedi", "gtgm", "umcl", "phantom", "mixed", "zero_shot", "linear_probe",
                 "retrieval", "segmentation"):
        assert name in out


def test_unknown_method_error_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "method=nope", "preset=tiny"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_registry_duplicates_and_class_paths() -> None:
    reg: Registry[object] = Registry("thing", "medvlp.none", "medvlp")
    reg.register("a")(int)
    with pytest.raises(KeyError, match="duplicate"):
        reg.register("a")(float)
    assert reg.get("collections.OrderedDict").__name__ == "OrderedDict"
    assert METHODS.get("medvlp.methods.clip.CLIP") is METHODS.get("clip")
    with pytest.raises(ValueError, match="no_such"):
        import_class_path("medvlp.no_such.Thing", object)


def test_configs_cannot_execute_code(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("x: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(Exception):
        load_yaml(evil)
    assert not (tmp_path / "pwned").exists()
    assert not Path("pwned").exists()
    cfg = merge({"a": {"b": 1}}, overrides=["a.b=2", "a.c=x"])
    assert cfg.a.b == 2 and cfg.a.c == "x"
    obj = instantiate({"class_path": "datetime.timedelta", "init_args": {"days": 2}}, expected=datetime.timedelta)
    assert obj.days == 2


def test_config_command_prints_composed_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "method=asg", "preset=tiny", "method.init_args.local_dim=7"]) == 0
    out = capsys.readouterr().out
    assert "local_dim: 7" in out and "irl_loss: 5.0" in out


def test_evaluate_command_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    run = tmp_path / "run"
    assert main(["pretrain", "method=clip", "preset=tiny", "trainer.enable_progress_bar=false", f"run.dir={run}"]) == 0
    assert main(["evaluate", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "data=phantom",
                 "data.init_args.num_train=16", "data.init_args.num_test=8", "data.init_args.image_size=32",
                 "protocols=[zero_shot,retrieval,finetune]", "protocol_params.finetune.epochs=1",
                 f"out={tmp_path / 'eval'}"]) == 0
    df = pd.read_csv(tmp_path / "eval" / "results.csv")
    assert set(df["protocol"]) == {"zero_shot", "retrieval", "finetune"}
    assert df["checkpoint"].str.endswith("last.ckpt").all()


def test_auto_precision_uses_bf16_only_where_it_is_native(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from medvlp import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.resolve_precision("16-mixed", "cpu") == "16-mixed"  # explicit values pass through
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert train.resolve_precision("auto", "auto") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert train.resolve_precision("auto", "gpu") == "bf16-mixed"
