"""Generate the documentation's reference pages from the code, so they cannot drift from it.

Written into ``docs/`` (ignored by git) before every build by ``docs/hooks.py``:

* ``reference/cli.md``: every command of :data:`medvlp.cli.main.COMMANDS` with its ``HELP``, ``SUMMARY`` and
  every key it declares (type, default, help);
* ``reference/config.md``: the built-in defaults (:data:`medvlp.compose.DEFAULTS`), the presets and the
  arguments of the method base class and encoders (signatures and docstrings, as ``medvlp list`` shows them);
* ``reference/components.md``: the tables of methods, datamodules, protocols, presets and suites from the
  registries (what ``medvlp list`` prints);
* ``methods/<name>.md``: one page per registered method (class docstring, arguments, packaged YAML and
  paper config);
* ``protocols/<name>.md``: one page per registered protocol (class docstring and declared parameters).

Hand-written pages may hold a marker ``<!-- gen:datamodule NAME -->``, which :func:`expand_markers` replaces
with that datamodule's summary and argument table.

Run ``python docs/gen_ref.py`` to write the pages without building the site.
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

DOCS = Path(__file__).resolve().parent
#: folders under docs/ that this script owns (wholly generated)
GENERATED_DIRS = ("reference", "methods", "protocols")
MARKER = re.compile(r"<!-- gen:(datamodules|protocols|methods|packages|datamodule)(?: (\S+))? -->")
#: the repository's folders that hold the installed package (package_dir in setup.cfg) and the perf script
PACKAGE_FOLDERS = {"medvlp": "medvlp", "methods": "medvlp.methods", "datamodules": "medvlp.datamodules",
                   "benchmarks": "medvlp.benchmarks", "perf": "perf"}


# ---------------------------------------------------------------------------------------------- text helpers
def rst_to_md(text: str) -> str:
    """Sphinx roles and double back-ticks of the docstrings as Markdown code spans."""
    text = re.sub(r":(?:class|func|meth|data|attr|mod|obj):`~?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`"
                  if m.group(0).count("~") else f"`{m.group(1)}`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def cell(text: Any) -> str:
    """One Markdown table cell: one line, pipes escaped, ``<``/``>`` outside code spans as entities (so
    ``<run>/last.ckpt`` is text, not an HTML tag)."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table."""
    header = list(header)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def code(value: Any) -> str:
    """A value as inline code (``—`` for none)."""
    return "—" if value in (None, "") else f"`{value}`"


def docstring_body(obj: Any) -> str:
    """A class docstring without its ``Args:`` section, as Markdown (sections become bold paragraph leads)."""
    doc = inspect.getdoc(obj) or ""
    keep, skipping = [], False
    for line in doc.splitlines():
        if re.match(r"^(Args|Arguments|Parameters|Attributes):\s*$", line):
            skipping = True
            continue
        if skipping and line and not line.startswith(" "):
            skipping = False
        if not skipping:
            keep.append(line)
    body = "\n".join(keep).strip()
    body = re.sub(r"^(\w[\w /-]*):\s*$", r"**\1:**", body, flags=re.M)  # "Returns:" style headers
    # a list needs a blank line before it in Markdown
    body = re.sub(r"([^\n])\n(\* |- )", r"\1\n\n\2", body)
    return rst_to_md(body)


# ---------------------------------------------------------------------------------------------- CLI reference
def cli_reference() -> str:
    """Every command, its help text and every key it declares."""
    from medvlp.cli.main import COMMANDS, command_module

    out = ["# CLI reference", "",
           "Generated from the command modules (`medvlp/cli/<command>.py`: `SUMMARY`, `HELP`, `KEYS`). "
           "Every command takes `key=value` tokens; commands marked *config* also take `-c FILE` and pass every "
           "other key to the run config (see [the configuration reference](config.md)). `medvlp COMMAND --help` "
           "prints the same text.", ""]
    out.append(table(["command", "what it does"],
                     [[f"[`medvlp {n}`](#medvlp-{n})", command_module(n).SUMMARY] for n in COMMANDS]))
    for name in COMMANDS:
        mod = command_module(name)
        out += [f"## medvlp {name}", "", cell(mod.SUMMARY), "", "```text", mod.HELP.strip(), "```", ""]  # HELP verbatim
        if mod.KEYS:
            out.append(table(["key", "type", "default", "required", "help"],
                             [[f"`{k}`", spec.type.__name__, code(None if spec.default is None else repr(spec.default)),
                               "yes" if spec.required else "", spec.help] for k, spec in mod.KEYS.items()]))
        else:
            out.append("This command declares no keys of its own.\n")
        if mod.PASSTHROUGH:
            out.append("*config*: other `key=value` tokens and `-c FILE` go to the run config, validated against "
                       "its keys before any work.\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- config reference
def flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``[(dotted key, value)]`` of a nested mapping's leaves."""
    if isinstance(tree, dict) and tree:
        return [kv for k, v in tree.items() for kv in flatten(v, f"{prefix}{k}.")]
    return [(prefix[:-1], tree)]


def class_arguments(cls: type) -> str:
    """An argument table of ``cls`` from its signature and docstrings (as ``medvlp list`` shows them)."""
    from medvlp.describe import class_arguments as arguments_of

    args, open_ = arguments_of(cls)
    rows = [[f"`{a.name}`", a.type, code(a.default), rst_to_md(a.description)] for a in args]
    text = table(["argument", "type", "default", "description"], rows)
    return text + ("\nFurther keyword arguments are passed on (see the class docstring).\n" if open_ else "")


#: the classes whose arguments a run config sets directly (method base, encoders)
CONFIG_CLASSES = {
    "method.init_args (every method)": "medvlp.method.VLPMethod",
    "method.init_args.image_encoder (default)": "medvlp.encoders.vit.ViTEncoder",
    "method.init_args.text_encoder": "medvlp.encoders.text.TextEncoder",
}


def _import(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def config_reference() -> str:
    """The built-in defaults, presets and the arguments of the classes a config sets."""
    from medvlp.compose import DEFAULTS, SHORTHANDS
    from medvlp.describe import packaged_names

    out = ["# Configuration reference", "",
           "Generated from `medvlp.compose.DEFAULTS`, the packaged presets and the signatures and docstrings of "
           "the classes below. How layers compose: [Configuring runs](../configuration.md).", "",
           "## Built-in defaults", ""]
    out.append(table(["key", "default"], [[f"`{k}`", code(repr(v))] for k, v in flatten(DEFAULTS)]))
    out += ["", "Shorthands: " + ", ".join(f"`{k}=` → `{v}`" for k, v in SHORTHANDS.items())
            + ", `preset=`, `suite=`.", "", "## Presets", ""]
    for name, first in packaged_names("medvlp.presets"):
        text = resources.files("medvlp.presets").joinpath(f"{name}.yaml").read_text()
        out += [f"### {name}", "", cell(first), "", "```yaml", text.strip(), "```", ""]
    for title, path in CONFIG_CLASSES.items():
        cls = _import(path)
        out += [f"## {title}", "", f"`{path}`: {cell(rst_to_md(_summary(cls)))}", "", class_arguments(cls), ""]
    out += ["## Method and datamodule arguments", "",
            "Each method's own arguments are on its page under [Methods](../methods/index.md); each datamodule's "
            "on its family's page under [Datasets](../datasets/index.md) and in "
            "[Components](components.md#datamodules).", ""]
    return "\n".join(out)


def _summary(obj: Any) -> str:
    from medvlp.describe import summary

    return summary(obj)


# ---------------------------------------------------------------------------------------------- components
def registries() -> dict[str, Any]:
    """The three registries by title."""
    from medvlp.registry import BENCHMARKS, DATAMODULES, METHODS

    return {"methods": METHODS, "datamodules": DATAMODULES, "protocols": BENCHMARKS}


def builtin(entries: Iterable[Any]) -> list[Any]:
    """Entries that ship with medvlp (not a plugin installed in this environment)."""
    return [e for e in entries if e.source.startswith("builtin")]


def components_reference() -> str:
    """The tables ``medvlp list`` prints, with each class's summary."""
    from medvlp.describe import packaged_names

    regs = registries()
    out = ["# Components", "", "Generated from the registries (what `medvlp list` prints); "
           "`medvlp list method=NAME | data=NAME | protocol=NAME` prints one component's arguments.", ""]
    for title, reg in regs.items():
        link = {"methods": "../methods/{}.md", "protocols": "../protocols/{}.md"}.get(title)
        rows = []
        for e in builtin(reg.entries()):
            name = f"[`{e.name}`]({link.format(e.name)})" if link else f"`{e.name}`"
            rows.append([name, f"`{e.obj.__module__}.{e.obj.__qualname__}`", rst_to_md(_summary(e.obj))])
        out += [f"## {title.capitalize()}", "", table(["name", "class", "summary"], rows), ""]
    for title, package in (("Presets", "medvlp.presets"), ("Suites", "medvlp.benchmarks.suites")):
        out += [f"## {title}", "", table(["name", "description"], [[f"`{n}`", d] for n, d in packaged_names(package)]),
                ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- methods
def _yaml_text(package: str, name: str) -> str | None:
    ref = resources.files(package).joinpath(name)
    return ref.read_text() if ref.is_file() else None


_DEVIATIONS = re.compile(r"^(?:\*\*)?(Deviations[^:\n]*|Design choices[^:\n]*):(?:\*\*)?[ ]?", re.M)


def split_deviations(body: str) -> tuple[str, list[str]]:
    """``(body without it, rows)`` of a docstring's "Deviations …:" / "Design choices:" part: its bullets, or
    the clauses of its paragraph (split at ``;``), one table row each."""
    m = _DEVIATIONS.search(body)
    if not m:
        return body, []
    before, rest = body[:m.start()], body[m.end():]
    rest = rest.lstrip("\n")
    if rest.startswith(("* ", "- ")):
        items, keep = [], []
        chunks = re.split(r"\n\n(?=[*-] )", rest)
        for i, chunk in enumerate(chunks):
            first, sep, tail = chunk.partition("\n\n")
            items.append(" ".join(first[2:].split()))
            if sep:  # the list ends here; the rest is body text
                keep = [tail, *chunks[i + 1:]]
                break
        return (before + "\n\n".join(keep)).strip(), items
    para, sep, tail = rest.partition("\n\n")
    return (before + tail).strip(), _clauses(" ".join(para.split()))


def _clauses(text: str) -> list[str]:
    """``text`` split at ``;`` outside parentheses."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == ";" and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [c.strip() for c in out if c.strip()]


def method_page(name: str) -> str:
    """One method: objective and deviations (class docstring), arguments, packaged defaults, paper config."""
    from medvlp.describe import arguments
    from medvlp.registry import METHODS

    cls = METHODS.get(name)
    args, open_ = arguments("method", name)
    body, deviations = split_deviations(docstring_body(cls))
    out = [f"# {name}", "", f"`{cls.__module__}.{cls.__qualname__}` — `medvlp pretrain method={name}`", "",
           body, "", "## Deviations and choices", ""]
    out.append(table(["#", "deviation from the official code or paper, or a choice the paper leaves open"],
                     [[i + 1, d] for i, d in enumerate(deviations)]) if deviations else
               "The class docstring lists none beyond those stated above.\n")
    out.append("")
    facts = [["loss terms", ", ".join(f"`{t}`" for t in getattr(cls, "loss_terms", ()) or ()) or "—"],
             ["required batch keys", ", ".join(f"`{k}`" for k in sorted(getattr(cls, "required_keys", ()))) or "—"]]
    example = getattr(cls, "example_data", None)
    if example:
        facts.append(["example data (used when no `data=` is given)", code(yaml.safe_dump(example,
                      default_flow_style=True, width=10_000).strip())])
    out += ["## Facts", "", table(["", ""], facts), "", "## Arguments", "",
            "Method-specific arguments (the shared ones are in the "
            "[configuration reference](../reference/config.md)); *packaged* is the value in the method's YAML.", ""]
    own = [a for a in args if a.name in inspect.signature(cls.__init__).parameters]
    out.append(table(["argument", "type", "default", "packaged", "description"],
                     [[f"`{a.name}`", a.type, code(a.default), code(a.packaged), rst_to_md(a.description)]
                      for a in own]) if own else "No arguments beyond the shared ones.\n")
    defaults = _yaml_text("medvlp.methods", f"{name}.yaml")
    if defaults:
        out += ["", f"## Packaged defaults (`methods/{name}.yaml`)", "", "```yaml", defaults.strip(), "```", ""]
    paper = _yaml_text("medvlp.methods", f"{name}.paper.yaml")
    if paper:
        out += [f"## Paper preset (`methods/{name}.paper.yaml`, `preset=paper`)", "",
                f"`medvlp config method={name} preset=paper` prints the composed paper setup.", "",
                "```yaml", paper.strip(), "```", ""]
    else:
        out += ["## Paper preset", "", "No method-specific paper config: `preset=paper` applies the generic "
                "paper preset (see the [configuration reference](../reference/config.md#paper)).", ""]
    return "\n".join(out)


def methods_table(prefix: str = "") -> str:
    """The methods overview table (links relative to ``prefix``)."""
    from medvlp.registry import METHODS

    rows = [[f"[`{e.name}`]({prefix}{e.name}.md)", rst_to_md(_summary(e.obj)),
             ", ".join(f"`{k}`" for k in sorted(getattr(e.obj, "required_keys", ())))]
            for e in builtin(METHODS.entries())]
    return table(["method", "summary", "batch keys"], rows)


def methods_index() -> str:
    """The methods overview page."""
    return "\n".join(["# Methods", "", "One page per registered method, generated from its class docstring "
                      "(objective, sources, deviations) and its packaged YAML files.", "", methods_table()])


# ---------------------------------------------------------------------------------------------- protocols
def protocol_kind(cls: type) -> str:
    """``reference`` for the protocols that follow a published code base, else ``generic``."""
    return "reference" if ".reference." in cls.__module__ else "generic"


ELEMENTS_HERE = "<!-- elements -->"
_ELEMENT = re.compile(r"^\* ([A-Za-z][\w /-]{0,30}): (.*)$")


def element_table(body: str) -> tuple[str, list[list[str]]]:
    """``(body without it, rows)``: the docstring's bullet list of ``* element: how`` items (a reference
    protocol's element-by-element account of the official code) as ``[element, how]`` rows."""
    paras = body.split("\n\n")
    rows, keep, taken = [], [], False
    for para in paras:
        m = _ELEMENT.match(" ".join(para.split())) if para.startswith("* ") and not taken else None
        if m:
            if not rows:
                keep.append(ELEMENTS_HERE)  # the table goes where the list was
            rows.append([m.group(1), m.group(2)])
            continue
        if rows:
            taken = True
        keep.append(para)
    return "\n\n".join(keep), rows


def protocol_page(name: str) -> str:
    """One protocol: its docstring (what it does, element by element against the official code for the
    reference protocols) and its declared parameters."""
    from medvlp.describe import protocol_parameters
    from medvlp.registry import BENCHMARKS

    cls = BENCHMARKS.get(name)
    module_doc = rst_to_md(inspect.getdoc(sys.modules[cls.__module__]) or "")
    params = protocol_parameters(name)
    out = [f"# {name}", "", f"`{cls.__module__}.{cls.__qualname__}` — {protocol_kind(cls)} protocol "
           f"(`protocols: {{key: {{protocol: {name}}}}}` in a suite, or `medvlp evaluate protocols=[{name}]`).", "",
           f"*Module:* {cell(module_doc.split(chr(10) + chr(10))[0])}", ""]
    body, elements = element_table(docstring_body(cls))
    if elements:
        against = " against the official code" if protocol_kind(cls) == "reference" else ""
        body = body.replace(ELEMENTS_HERE, f"**Element by element{against}:**\n\n"
                            + table(["element", "what this protocol does"], elements))
    out += [body, "", "## Parameters", ""]
    out.append(table(["parameter", "meaning"], [[f"`{k}`", rst_to_md(v)] for k, v in params.items()])
               if params else "This protocol declares no parameters.\n")
    out.append("\n`fractions` and `seeds` (label fractions and seeds) apply to the protocols that use them.\n")
    return "\n".join(out)


def protocols_table() -> str:
    """The protocols overview table (generic and reference)."""
    from medvlp.registry import BENCHMARKS

    rows = [[f"[`{e.name}`]({e.name}.md)", protocol_kind(e.obj), rst_to_md(_summary(e.obj))]
            for e in builtin(BENCHMARKS.entries())]
    return table(["protocol", "kind", "summary"], rows)


# ---------------------------------------------------------------------------------------------- datamodules
def datamodule_section(name: str) -> str:
    """A datamodule's summary and argument table (for the ``gen:datamodule`` markers)."""
    from medvlp.describe import arguments
    from medvlp.registry import DATAMODULES

    cls = DATAMODULES.get(name)
    args, open_ = arguments("data", name)
    text = table(["argument", "type", "default", "packaged", "description"],
                 [[f"`{a.name}`", a.type, code(a.default), code(a.packaged), rst_to_md(a.description)] for a in args])
    more = "\nFurther keyword arguments are passed on (see the class docstring).\n" if open_ else ""
    return (f"**`data={name}`** — `{cls.__module__}.{cls.__qualname__}`: {cell(rst_to_md(_summary(cls)))}\n\n"
            f"??? info \"Options of `{name}` (`data.init_args.*`)\"\n\n"
            + "\n".join("    " + ln if ln else "" for ln in (text + more).splitlines()) + "\n")


def datamodules_table() -> str:
    """Every built-in datamodule with its summary."""
    from medvlp.registry import DATAMODULES

    return table(["`data=`", "class", "summary"],
                 [[f"`{e.name}`", f"`{e.obj.__module__}.{e.obj.__qualname__}`", rst_to_md(_summary(e.obj))]
                  for e in builtin(DATAMODULES.entries())])


def packages_table(root: Path = DOCS.parent) -> str:
    """Every package and module of the layout with its one job: the first sentence of its own docstring (so
    the layout page cannot drift from the code)."""
    import ast

    rows = []
    for folder, dotted in PACKAGE_FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" in path.parts or path.name == "__main__.py":
                continue
            rel = path.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([dotted, *parts])
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            kind = "package" if path.name == "__init__.py" else "module"
            rows.append((f"`{path.relative_to(root)}`", f"`{name}`", kind, rst_to_md(first)))
    return table(["file", "import as", "kind", "its job"], rows)


def expand_markers(markdown: str) -> str:
    """Replace the markers of a hand-written page: ``<!-- gen:datamodule NAME -->`` (that datamodule's
    section), ``<!-- gen:protocols -->``, ``<!-- gen:datamodules -->`` (overview tables)."""
    def sub(m: re.Match[str]) -> str:
        kind, name = m.group(1), m.group(2)
        if kind == "datamodule":
            return datamodule_section(name)
        return {"protocols": protocols_table, "datamodules": datamodules_table, "packages": packages_table,
                "methods": lambda: methods_table("methods/")}[kind]()

    return MARKER.sub(sub, markdown)


def documented_datamodules(docs: Path = DOCS) -> set[str]:
    """Datamodule names that a ``gen:datamodule`` marker of a hand-written page documents."""
    return {m.group(2) for p in docs.rglob("*.md") if p.parts[len(docs.parts)] not in GENERATED_DIRS
            for m in MARKER.finditer(p.read_text(encoding="utf-8")) if m.group(1) == "datamodule"}


# ---------------------------------------------------------------------------------------------- all pages
def pages() -> dict[str, str]:
    """``{path relative to docs/: Markdown}`` of every generated page."""
    from medvlp.registry import BENCHMARKS, METHODS

    out = {"reference/cli.md": cli_reference(), "reference/config.md": config_reference(),
           "reference/components.md": components_reference(), "methods/index.md": methods_index()}
    for e in builtin(METHODS.entries()):
        out[f"methods/{e.name}.md"] = method_page(e.name)
    for e in builtin(BENCHMARKS.entries()):
        out[f"protocols/{e.name}.md"] = protocol_page(e.name)
    return out


def write(docs: Path = DOCS) -> list[str]:
    """Write the generated pages (only files whose content changed); stale generated pages are removed.

    Returns:
        The paths written or removed, relative to ``docs``.
    """
    generated = pages()
    changed = []
    for rel, text in generated.items():
        path = docs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(rel)
    for folder in ("reference", "methods"):
        for path in (docs / folder).glob("*.md"):
            if str(path.relative_to(docs)) not in generated:
                path.unlink()
                changed.append(str(path.relative_to(docs)))
    for path in (docs / "protocols").glob("*.md"):
        rel = str(path.relative_to(docs))
        if rel not in generated and path.name != "index.md":  # protocols/index.md is hand-written
            path.unlink()
            changed.append(rel)
    return changed


if __name__ == "__main__":
    for rel in write():
        print(f"wrote docs/{rel}")
