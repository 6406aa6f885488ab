"""The plugin tutorial (docs/plugins.md) ships as a complete package, examples/plugin_siglip/: it installs
with ``pip install -e .`` into a fresh virtual environment from its own pyproject.toml, registers
``method=siglip`` through its entry point and passes medvlp's contract suite there; the page's shell
blocks run as written. The loss matches the paper's formula."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests import doc_blocks

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugin_siglip"
PAGE = ROOT / "docs" / "plugins.md"


def test_the_package_is_complete_and_the_page_shows_its_files() -> None:
    for rel in ("pyproject.toml", "my_siglip/__init__.py", "my_siglip/losses.py", "my_siglip/objective.py",
                "my_siglip/siglip.yaml", "tests/test_contract.py"):
        assert (PACKAGE / rel).is_file(), rel
    page = PAGE.read_text(encoding="utf-8")
    for rel in ("pyproject.toml", "my_siglip/losses.py", "my_siglip/objective.py", "my_siglip/siglip.yaml",
                "tests/test_contract.py"):
        assert f'--8<-- "examples/plugin_siglip/{rel}"' in page, rel  # included from the package, not copied
    assert 'siglip = "my_siglip.objective:SigLIP"' in (PACKAGE / "pyproject.toml").read_text()
    assert [lang for lang, _ in doc_blocks.blocks(PAGE)] == ["bash"]
    assert "pip install -e ." in doc_blocks.blocks(PAGE)[0][1]


def test_sigmoid_loss_matches_the_paper_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(str(PACKAGE))
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
    for mod in [m for m in sys.modules if m.startswith("my_siglip")]:
        del sys.modules[mod]


def fresh_venv(folder: Path) -> Path:
    """A new virtual environment that sees this environment's packages (torch, medvlp, ... offline) the way
    a system-site-packages venv sees the system's, and has a ``medvlp`` command of its own interpreter.

    ``python -m venv --system-site-packages`` from a venv links the *base* interpreter's site-packages, so
    this one's are added with a ``.pth`` (``site.addsitedir``: editable installs there keep working). The new
    venv's bundled, older setuptools is removed so that builds use this environment's.
    """
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    site_dir = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    (Path(site_dir) / "_medvlp_parent_env.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "setuptools"], check=True, capture_output=True)
    script = venv / "bin" / "medvlp"  # what installing medvlp in this venv would create
    script.write_text(f"#!{py}\nimport sys\nfrom medvlp.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return venv


@pytest.mark.slow
def test_tutorial_installs_in_a_fresh_venv_and_passes_the_contract_suite(tmp_path: Path) -> None:
    work = tmp_path / "plugin_siglip"
    shutil.copytree(PACKAGE, work, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "runs"))
    venv = fresh_venv(tmp_path)
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "PIP_NO_BUILD_ISOLATION": "0",  # offline: build with the installed setuptools (no download)
           "MEDVLP_CACHE": os.environ.get("MEDVLP_CACHE", str(tmp_path / "cache"))}
    out = doc_blocks.run(PAGE, work, env, python=str(venv / "bin" / "python"))[0]
    assert "method siglip: my_siglip.objective.SigLIP  [plugin my-siglip" in out  # found through the entry point
    assert "init_scale: float = 10.0; packaged default 10.0" in out
    assert "1 passed" in out  # the contract suite, inside the fresh venv
    assert (work / "runs" / "siglip" / "checkpoints" / "last.ckpt").is_file()
    assert "weight_decay: 0.1" in (work / "runs" / "siglip" / "config.yaml").read_text()  # the plugin's YAML
    import pandas as pd

    metrics = pd.read_csv(next((work / "runs" / "siglip").glob("logs/version_*/metrics.csv")))
    assert metrics["train/siglip_loss_step"].notna().any()
    assert not any("temperature" in c for c in metrics.columns)  # uses_temperature = False
    here = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('my_siglip'))"],
                          capture_output=True, text=True, check=True).stdout
    assert here.strip() == "None"  # installed into the fresh venv only
