"""The documentation cannot drift from the code: the generated reference covers every command, key,
method, datamodule, protocol, preset and suite; every page is in the site's navigation; every command
line shown in the docs and the README names commands, keys and protocols that exist; every built page
has a title."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))

import gen_ref  # noqa: E402


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return gen_ref.pages()


def _nav_files(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for v in node.values() for f in _nav_files(v)]
    return []


def _mkdocs() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # !!python/name tags, if any
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_cli_reference_covers_every_command_and_key(generated: dict[str, str]) -> None:
    from medvlp.cli.main import COMMANDS, command_module

    cli = generated["reference/cli.md"]
    for name in COMMANDS:
        mod = command_module(name)
        assert f"## medvlp {name}\n" in cli, name
        section = cli.split(f"## medvlp {name}\n", 1)[1].split("\n## medvlp ", 1)[0]
        assert mod.HELP.strip() in section
        for key, spec in mod.KEYS.items():
            row = next((ln for ln in section.splitlines() if ln.startswith(f"| `{key}` |")), None)
            assert row is not None, f"{name}: key {key} undocumented"
            if spec.default is not None:
                assert gen_ref.cell(repr(spec.default)) in row, (name, key)
    documented = set(re.findall(r"^## medvlp (\w+)$", cli, re.M))
    assert documented == set(COMMANDS)  # and nothing that does not exist


def test_config_reference_covers_every_default_and_preset(generated: dict[str, str]) -> None:
    from medvlp.compose import DEFAULTS
    from medvlp.describe import packaged_names
    from medvlp.method import VLPMethod
    from medvlp.validate import init_parameters

    cfg = generated["reference/config.md"]
    for key, _ in gen_ref.flatten(DEFAULTS):
        assert f"| `{key}` |" in cfg, key
    for name, _ in packaged_names("medvlp.presets"):
        assert f"### {name}\n" in cfg
    for arg in init_parameters(VLPMethod)[0]:
        assert f"| `{arg}` |" in cfg, arg


def test_every_component_has_its_page_and_its_row(generated: dict[str, str]) -> None:
    from medvlp.describe import packaged_names
    from medvlp.registry import BENCHMARKS, DATAMODULES, METHODS

    comps = generated["reference/components.md"]
    for reg in (METHODS, DATAMODULES, BENCHMARKS):
        for e in gen_ref.builtin(reg.entries()):
            assert f"`{e.name}`" in comps, e.name
    for e in gen_ref.builtin(METHODS.entries()):
        page = generated[f"methods/{e.name}.md"]
        assert page.startswith(f"# {e.name}\n") and "## Arguments" in page and "## Paper preset" in page
    for e in gen_ref.builtin(BENCHMARKS.entries()):
        assert f"protocols/{e.name}.md" in generated
    for kind in ("presets", "suites"):
        for name, _ in packaged_names(f"medvlp.{'benchmarks.suites' if kind == 'suites' else 'presets'}"):
            assert f"| `{name}` |" in comps
    # every datamodule is documented on its family page, and no marker names one that does not exist
    assert gen_ref.documented_datamodules() == {e.name for e in gen_ref.builtin(DATAMODULES.entries())}


def test_every_page_is_in_the_navigation_and_every_nav_entry_exists(generated: dict[str, str]) -> None:
    nav = set(_nav_files(_mkdocs()["nav"]))
    written = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")
               if p.relative_to(DOCS).parts[0] not in gen_ref.GENERATED_DIRS or p.name == "index.md"}
    written = {w for w in written if not w.startswith(("methods/", "reference/"))}  # generated folders
    pages = written | set(generated)
    assert pages - nav == set(), "pages missing from mkdocs.yml nav"
    assert nav - pages == set(), "nav entries without a page"
    for title in ("getting-started.md", "methods/index.md", "datasets/index.md", "protocols/index.md",
                  "suites.md", "statistics.md", "experiments.md", "weights.md", "plugins.md", "scale.md",
                  "failure.md", "measured.md", "architecture.md", "python-api.md", "reference/cli.md",
                  "reference/config.md", "reference/components.md"):
        assert title in nav, title


# ---------------------------------------------------------------------------------- command lines in the docs
def _shown_command_lines() -> list[tuple[str, str]]:
    """``(source, command line)`` of every ``medvlp …`` line of the shell blocks of the hand-written pages and
    the README (continuation lines joined, comments dropped)."""
    sources = [ROOT / "README.md"] + [p for p in DOCS.rglob("*.md")
                                      if p.relative_to(DOCS).parts[0] not in ("methods", "reference")]
    out = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split(" #", 1)[0].strip()
                if line.startswith("medvlp "):
                    out.append((str(path.relative_to(ROOT)), line))
    return out


def test_documented_command_lines_name_existing_commands_keys_and_protocols() -> None:
    from medvlp.cli.args import parse
    from medvlp.cli.main import COMMANDS, command_module
    from medvlp.compose import compose
    from medvlp.registry import BENCHMARKS

    lines = _shown_command_lines()
    assert len(lines) >= 15, lines  # the pages do show commands
    for source, line in lines:
        tokens = shlex.split(line)[1:]
        command, rest = tokens[0], [t for t in tokens[1:] if t != "--debug"]
        assert command in COMMANDS, f"{source}: {line}"
        mod = command_module(command)
        parsed = parse(command, rest, mod.KEYS, passthrough=mod.PASSTHROUGH)  # unknown own keys raise here
        for name in parsed.options.get("protocols") or []:
            assert name in BENCHMARKS, f"{source}: {line}: protocol {name}"
        if command in ("pretrain", "config") and not source.endswith("plugins.md"):  # the plugin's lines run in
            compose(parsed.rest)  # test_tutorial.py, where it is installed; every other config key shown exists
        if command in ("benchmark",) and parsed.options.get("suite"):
            from medvlp.benchmarks.suite.runner import load_suite

            load_suite(parsed.options["suite"], parsed.rest)


# ---------------------------------------------------------------------------------- the built site
def _built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``site/`` when `make docs` built it after the last change to the hand-written sources, else a fresh
    build (the generated pages are rewritten by every build, so they do not count)."""
    import os

    site = ROOT / "site"
    hand_written = [ROOT / "mkdocs.yml", *DOCS.glob("*.py"),
                    *(p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] not in ("methods", "reference"))]
    newest = max(p.stat().st_mtime for p in hand_written)
    if (site / "index.html").is_file() and (site / "index.html").stat().st_mtime >= newest:
        return site
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_every_built_page_has_a_title(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("mkdocs")
    site = _built_site(tmp_path_factory)
    pages = [p for p in site.rglob("*.html") if p.name != "404.html"]
    assert len(pages) >= 40
    for page in pages:
        html = page.read_text(encoding="utf-8")
        title = re.search(r"<title>(.*?)</title>", html, re.S)
        assert title and title.group(1).strip(), page
        if page.name != "index.html" or page.parent != site:  # the home page's title is the site's name
            assert title.group(1).strip() != "medvlp", f"{page}: no page title"
        assert re.search(r"<h1[^>]*>.+?</h1>", html, re.S), f"{page}: no heading"
    assert "fonts.googleapis" not in (site / "index.html").read_text()  # offline: no web fonts
