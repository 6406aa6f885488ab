"""``medvlp`` command line: list, pretrain, evaluate, benchmark, report, demo.

Every command takes OmegaConf dot-list overrides (``key=value``) and ``-c FILE`` config files; see
README "CLI" for the keys.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from omegaconf import OmegaConf

USAGE = """medvlp COMMAND [-c FILE] [key=value ...] [--debug]

commands:
  list                         registered methods, datamodules, benchmark protocols, presets and suites
  list method=M | data=D | protocol=P    arguments, types and defaults of one component
  pretrain  method=M data=D    pretrain one method (resumes from <run>/checkpoints/last.ckpt)
  evaluate  ckpt=PATH data=D protocols=[..]   run protocols on one checkpoint
  export    ckpt=PATH out=DIR [format=hf|timm]  portable folder: config.json + model.safetensors + text/
  benchmark suite=NAME|PATH    methods x datasets x protocols x fractions x seeds -> results.csv
  report    results=PATH       headline table with 95 % CIs and significance vs a reference, tables, plots, report.html
  demo                         benchmark suite=quickstart, then report (the main job)
  experiments [names=[..]]     controlled experiments on the phantom (exp_* suites) -> claims with CIs
  prepare   data=D out=DIR     convert a dataset into resumable, checksummed training shards
  config    method=M data=D    print the composed config without running

options: medvlp COMMAND --help, medvlp --version, --debug (full traceback on errors)
"""

COMMAND_HELP = {
    "list": """medvlp list [method=NAME | data=NAME | protocol=NAME]

Without arguments: every registered method, datamodule and benchmark protocol (with the package it comes
from), the packaged presets and suites. With method=/data=/protocol=: that component's arguments, types,
defaults and descriptions (from its docstring).""",
    "pretrain": """medvlp pretrain [method=NAME] [data=NAME] [preset=demo|tiny|paper] [-c FILE] [key=value ...]

Pretrain one method; the run folder is run.dir or <run.root>/<method>_<data>. Keys: method.init_args.*,
data.init_args.* (see `medvlp list method=NAME`), trainer.* (any lightning.Trainer argument;
trainer.logger/callbacks/plugins take {class_path, init_args} lists), run.* (dir, root, seed, resume,
checkpoint_every_n_steps, weights_only_resume, lr_monitor). logger=csv|tensorboard|wandb|[csv,tensorboard]
is short for trainer.logger. The config is validated before any work.""",
    "config": """medvlp config [method=NAME] [data=NAME] [preset=NAME] [-c FILE] [key=value ...]

Print the composed (and validated) config that `medvlp pretrain` with the same arguments would run.""",
    "evaluate": """medvlp evaluate ckpt=PATH [data=NAME] [data.init_args.K=V] [protocols=[a,b]]
                [protocol_params.<protocol>.<key>=V] [out=DIR] [device=cpu|cuda]

Run benchmark protocols on one checkpoint; rows go to <out>/results.csv.""",
    "export": """medvlp export ckpt=PATH out=DIR [format=hf|timm] [allow_class_path=true]

Write a portable folder: config.json (method, hyperparameters, preprocessing, library versions),
model.safetensors (no optimizer state, no pickle) and text/ (text model + tokenizer); load it with
medvlp.from_pretrained(DIR). format=timm writes the 2D ViT image encoder as a timm state dict.""",
    "benchmark": """medvlp benchmark suite=NAME|PATH [key=value ...] [device=cpu|cuda]

Run a suite (methods x datasets x protocols x fractions x seeds) into <output>/results.csv; finished units
are skipped on rerun. The suite's keys and protocol parameters are validated before any work.""",
    "report": """medvlp report results=PATH [out=DIR]

Markdown/LaTeX/CSV tables (mean ± std over seeds) and PNG plots from a results CSV.""",
    "prepare": """medvlp prepare data=NAME data.init_args.root=DIR out=DIR [size=256] [samples_per_shard=1000]
               [workers=N] [splits=[train,val,test]] [progress=true]

Convert a record dataset once into WebDataset shards with sidecar checksums and a manifest (out/index.json);
a rerun keeps verified shards and rewrites only the rest; corrupt inputs are counted and named.""",
    "demo": """medvlp demo [key=value ...]

`medvlp benchmark suite=quickstart`, then `medvlp report` into results/quickstart, then one summary line
per controlled experiment from its last stored run (`medvlp experiments` runs them).""",
    "experiments": """medvlp experiments [names=[exp_a,exp_b]] [run=false] [out=results/experiments] [n_boot=2000]
                   [key=value ...]

Run the controlled-experiment suites (default: every packaged exp_* suite; stored units are skipped),
then compute each claim's outcome from the stored results (Δ with a two-level bootstrap CI over
pretraining seeds and test samples) into <out>/claims.md and claims.csv. run=false only summarises.""",
}


def _list(args: Sequence[str]) -> int:
    from medvlp.describe import describe, list_all

    if not args:
        print(list_all())
        return 0
    for tok in args:
        kind, _, name = tok.partition("=")
        if not name:
            raise ValueError(f"list: expected method=NAME, data=NAME or protocol=NAME, got {tok!r}")
        print(describe(kind, name))
    return 0


def setup_logging() -> None:
    """One handler (ours) on the root logger; Lightning's own console handler is removed so every message
    prints once."""
    logging.basicConfig(level=os.environ.get("MEDVLP_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    import lightning  # noqa: F401  (adds its handler at import)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler):
                lg.removeHandler(h)
        lg.propagate = True


def _version() -> str:
    import importlib.metadata

    from medvlp import __version__

    libs = []
    for lib in ("torch", "lightning", "transformers", "monai"):
        try:
            libs.append(f"{lib} {importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            libs.append(f"{lib} not installed")
    return f"medvlp {__version__} ({', '.join(libs)})"


def run_command(command: str, rest: list[str]) -> int | None:
    """Run one command; ``None`` when ``command`` is unknown."""
    if command == "list":
        return _list(rest)
    if command in ("pretrain", "config"):
        from medvlp.compose import compose

        cfg = compose(rest)
        if command == "config":
            print(OmegaConf.to_yaml(cfg))
            return 0
        from medvlp.train import pretrain

        print(f"checkpoint: {pretrain(cfg)}")
        return 0
    if command == "export":
        from medvlp.pretrained.export import export_command

        return export_command(rest)
    if command == "evaluate":
        from medvlp.benchmarks.suite.runner import evaluate_command

        return evaluate_command(rest)
    if command == "benchmark":
        from medvlp.benchmarks.suite.runner import benchmark_command

        return benchmark_command(rest)
    if command == "report":
        from medvlp.benchmarks.report.tables import report_command

        return report_command(rest)
    if command == "experiments":
        from medvlp.benchmarks.suite.experiments import experiments_command

        return experiments_command(rest)
    if command == "prepare":
        from medvlp.datamodules.io.prepare import prepare_command

        return prepare_command(rest)
    if command == "demo":
        from medvlp.benchmarks.suite.runner import benchmark_command
        from medvlp.benchmarks.report.tables import report_command

        from medvlp.benchmarks.suite.experiments import stored_summaries

        code = benchmark_command(["suite=quickstart", *rest])
        code = code or report_command(["results=results/quickstart/results.csv", "out=results/quickstart"])
        if not code:
            print("\ncontrolled experiments (last stored run; `make experiments` runs them):")
            for line in stored_summaries():
                print(f"- {line}")
        return code
    return None


#: user errors: one line, exit 2 (config, usage, missing files or classes)
USER_ERRORS: tuple[type[BaseException], ...] = (KeyError, ValueError, TypeError, FileNotFoundError, ImportError)
#: errors while running a user's action (I/O, a failing run): one line, exit 1
RUN_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, ArithmeticError)


def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medvlp`` console script.

    Errors from the user's config or inputs print one line (``medvlp <command>: error: ...``) and exit
    with 2 (config/usage) or 1 (a run that failed); ``--debug`` re-raises them with the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMAND_HELP and any(a in ("-h", "--help") for a in rest):
        print(COMMAND_HELP[command])
        return 0
    if command != "list":
        setup_logging()
    try:
        code = run_command(command, rest)
    except USER_ERRORS + RUN_ERRORS as exc:
        if debug:
            raise
        print(f"medvlp {command}: error: {_message(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2 if isinstance(exc, USER_ERRORS) else 1
    if code is None:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
