"""The house plan holds: no import cycle among modules, the layering contracts of ``pyproject.toml`` hold,
and every module opens with a docstring that states its job."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("medvlp", "methods", "datamodules", "benchmarks", "perf")


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package installed plainly (no editable mapping), so its files lie where their module names say."""
    site = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(site), str(ROOT)], check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "TMPDIR": str(build), "PIP_NO_INDEX": "1"}, cwd=build)
    return site


def _cycles(site: Path) -> list[list[str]]:
    code = f"""
import json, sys
sys.path.insert(0, {str(site)!r})
import grimp
g = grimp.build_graph("medvlp")
mods = sorted(g.modules)
edges = {{m: sorted(set(g.find_modules_directly_imported_by(m)) & set(mods)) for m in mods}}
print(json.dumps(edges))
"""
    import json

    edges = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                      cwd=site.parent).stdout)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for m in edges:
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle_among_modules(plain_install: Path) -> None:
    """Function-level imports count: a cycle hidden inside a function is still a cycle."""
    assert _cycles(plain_install) == []


def test_layering_contracts_hold(plain_install: Path) -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                          cwd=plain_install.parent, env={"PYTHONPATH": str(plain_install), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_module_opens_with_a_docstring(folder: str) -> None:
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / folder).rglob("*.py"))
               if "__pycache__" not in p.parts and not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


#: third-party packages a function may import lazily (heavy to import, optional, or only needed on one path)
LAZY_OK = {"transformers", "sklearn", "matplotlib", "monai", "scipy", "h5py", "pydicom", "nibabel", "tifffile",
           "nilearn", "safetensors", "huggingface_hub", "tqdm", "wandb", "tensorboard", "tensorboardX", "submitit",
           "skimage", "open_clip", "timm", "torchvision"}


def _function_level_imports() -> list[tuple[str, int, str, str]]:
    rows = []
    for folder in FOLDERS[:-1]:  # the installed package (perf/ is a script)
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            src = path.read_text()
            lines = src.splitlines()
            for fn in ast.walk(ast.parse(src)):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        mod = node.module or "" if isinstance(node, ast.ImportFrom) else node.names[0].name
                        text = "\n".join(lines[node.lineno - 1:node.end_lineno])
                        rows.append((str(path.relative_to(ROOT)), node.lineno, mod, text))
    return rows


def test_function_level_imports_are_heavy_optional_or_give_their_reason() -> None:
    """An import inside a function is for a heavy or optional dependency, or says why it is lazy
    (``# lazy: <reason>``); never a way around an import cycle."""
    bad = [f"{path}:{line} imports {mod}" for path, line, mod, text in _function_level_imports()
           if mod.split(".")[0] not in LAZY_OK and "# lazy:" not in text and "noqa" not in text]
    assert bad == []
