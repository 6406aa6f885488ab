"""Checkpoints, configs and suites written by release 0.1.0 (before the package layout changed) still load.

The fixtures in ``tests/data/legacy`` were written by that release: every class path it could put into a
checkpoint or config (``class_paths.txt``), a tiny CLIP checkpoint, and a suite that names old module paths.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule
from torch import nn

from medvlp.benchmarks.kit.protocol import Protocol
from medvlp.registry import import_class_path

LEGACY = Path(__file__).parent / "data" / "legacy"
CLASS_PATHS = [line.strip() for line in (LEGACY / "class_paths.txt").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("path", CLASS_PATHS)
def test_every_class_path_of_the_old_release_resolves_to_the_same_class(path: str) -> None:
    cls = import_class_path(path, (nn.Module, LightningDataModule, Protocol, Callback))
    assert cls.__name__ == path.rpartition(".")[2]


def test_old_module_path_is_still_refused_for_the_wrong_kind() -> None:
    from medvlp.registry import ClassPathError

    with pytest.raises(ClassPathError, match="not a subclass"):
        import_class_path("medvlp.datamodules.ct.MSDDataModule", nn.Module)


def test_a_checkpoint_of_the_old_release_loads_and_embeds() -> None:
    from medvlp.method import load_method

    model = load_method(str(LEGACY / "clip_tiny.ckpt"))
    with torch.no_grad():
        z = model.encode_text(["no acute cardiopulmonary process"])
    assert z.shape[-1] == 16 and torch.isfinite(z).all()


def test_a_suite_of_the_old_release_runs_and_reproduces_its_numbers(tmp_path: Path, monkeypatch) -> None:
    from medvlp.benchmarks.suite.runner import run_suite

    for name in ("suite.yaml", "clip_tiny.ckpt"):
        shutil.copy(LEGACY / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    from medvlp.benchmarks.suite.runner import load_suite

    out = run_suite(load_suite("suite.yaml", [f"output={tmp_path / 'out'}"]), device="cpu")
    rows = list(csv.DictReader(open(out)))
    expected = {(r["label"], r["protocol"], r["metric"]): float(r["value"])
                for r in csv.DictReader(open(LEGACY / "expected_results.csv")) if r["label"] == "released"}
    got = {(r["label"], r["protocol"], r["metric"]): float(r["value"]) for r in rows if r["label"] == "released"}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    assert {r["label"] for r in rows} == {"released", "trained"}
