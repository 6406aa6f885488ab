"""Every shell and Python block of the getting-started page and of the Python API page runs as written,
in page order, from an empty folder (the plugin tutorial's blocks run in tests/test_tutorial.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests import doc_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _env(tmp_path: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # where `medvlp` is installed next to this interpreter
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "MEDVLP_CACHE": os.environ.get("MEDVLP_CACHE", str(tmp_path / "cache")),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.slow
def test_getting_started_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "fresh"
    work.mkdir()
    outputs = doc_blocks.run(DOCS / "getting-started.md", work, _env(tmp_path))
    assert len(outputs) == 4  # write the manifest, pretrain, evaluate, report
    assert (work / "mydata" / "manifest.csv").is_file()
    assert (work / "runs" / "mine" / "checkpoints" / "last.ckpt").is_file()
    import pandas as pd

    results = pd.read_csv(work / "results" / "mine" / "results.csv")
    assert {"zero_shot", "retrieval", "linear_probe"} <= set(results["protocol"])
    assert (work / "results" / "mine" / "report" / "report.html").is_file()
    assert "## Headline" in outputs[-1]


@pytest.mark.slow
def test_python_api_page_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "fresh"
    work.mkdir()
    outputs = doc_blocks.run(DOCS / "python-api.md", work, _env(tmp_path))
    assert len(outputs) == 4
    similarity = float(outputs[2].strip().splitlines()[-1])
    assert -1.0 <= similarity <= 1.0
    assert "LOAD REPORT" not in outputs[2]  # no third-party noise on a plain load
    assert outputs[3].strip().splitlines()[-1] == "(2, 16)"  # tiny preset: embed_dim 16


def test_every_page_with_executed_blocks_has_blocks() -> None:
    for page in ("getting-started.md", "python-api.md", "plugins.md"):
        assert doc_blocks.blocks(DOCS / page), page
