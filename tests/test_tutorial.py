"""The README tutorial "Write your own objective" is run as written: its files are extracted, the
contract check passes, and the CLI lists and pretrains the method with its shipped defaults."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from medvlp.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def tutorial_files() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Write your own objective"):]
    section = section[: section.index("\n## ")]
    return {m.group(1): m.group(2) for m in re.finditer(r"```\w+ file=(\S+)\n(.*?)```", section, re.S)}


@pytest.fixture()
def tutorial_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    files = tutorial_files()
    assert {"my_siglip/losses.py", "my_siglip/objective.py", "my_siglip/siglip.yaml", "setup.cfg",
            "tests/test_contract.py"} <= set(files)
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    (tmp_path / "my_siglip" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("my_siglip")]:
        del sys.modules[mod]


def test_tutorial_contract_and_pretraining(tutorial_package: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {}
    exec(compile((tutorial_package / "tests" / "test_contract.py").read_text(), "test_contract.py", "exec"), namespace)
    namespace["test_siglip_meets_the_medvlp_contract"](tmp_path)  # type: ignore[operator]

    method = "my_siglip.objective.SigLIP"
    assert main(["list", f"method={method}"]) == 0
    out = capsys.readouterr().out
    assert "init_scale: float = 10.0" in out and "packaged default {'lr': 0.0001" in out
    run = tmp_path / "run"
    assert main(["pretrain", f"method={method}", "preset=tiny", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
                 f"run.dir={run}"]) == 0
    assert "weight_decay: 0.1" in (run / "config.yaml").read_text()  # the plugin's defaults_file
    metrics = pd.read_csv(next(run.glob("logs/version_*/metrics.csv")))
    assert "train/siglip_loss_step" in metrics.columns and metrics["train/siglip_loss_step"].notna().any()
    assert not any("temperature" in c for c in metrics.columns)  # uses_temperature = False


def test_sigmoid_loss_matches_the_paper_formula(tutorial_package: Path) -> None:
    import torch
    import torch.nn.functional as F

    from my_siglip.losses import sigmoid_loss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    expected = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            expected -= float(torch.log(torch.sigmoid(z * (t * img[i] @ txt[j] + b))))
    assert sigmoid_loss(img, txt, t.log(), b).item() == pytest.approx(expected / 4, rel=1e-5)
