"""``medvlp evaluate``: benchmark protocols on one checkpoint."""
from __future__ import annotations

from pathlib import Path

from medvlp.cli.args import Key, Parsed

NAME = "evaluate"
SUMMARY = "run protocols on one checkpoint (ckpt=PATH data=D protocols=[..])"
HELP = """medvlp evaluate ckpt=PATH [data=NAME] [data.init_args.K=V] [protocols=[a,b]]
                [protocol_params.<protocol>.<key>=V] [out=DIR] [device=cpu|cuda] [label=NAME]

Run benchmark protocols on one checkpoint; rows go to <out>/results.csv, labelled "<method> <backbone>"
from the checkpoint's metadata unless label= is given."""
KEYS = {
    "ckpt": Key(dict, required=True, help="a medvlp checkpoint path, or {format, path} of a released model"),
    "data": Key(dict, {"name": "phantom"}, help="a datamodule name or {name, init_args}"),
    "protocols": Key(list, ["zero_shot", "retrieval", "linear_probe"], help="protocol names"),
    "protocol_params": Key(dict, {}, help="<protocol>: {key: value} parameters"),
    "out": Key(str, "results/evaluate", help="output folder"),
    "device": Key(str, help="cpu or cuda (default: cuda when available)"),
    "label": Key(str, help="row label (default: from the checkpoint)"),
    "allow_class_path": Key(bool, False, help="accept a checkpoint whose method is a class path"),
}
PASSTHROUGH = False


def check_ckpt(ckpt: object) -> None:
    """Refuse a checkpoint path that does not exist, before any model, data or protocol is built.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: for a mapping without ``path``.
    """
    if isinstance(ckpt, dict):
        if "path" not in ckpt or "format" not in ckpt:
            raise ValueError(f"ckpt must be a path or {{format, path}}, got {ckpt!r}")
        ckpt = ckpt["path"]
    if not Path(str(ckpt)).expanduser().exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")


def run(parsed: Parsed) -> int:
    """Evaluate the checkpoint."""
    check_ckpt(parsed.options["ckpt"])
    from medvlp.benchmarks.suite.runner import evaluation_suite, run_suite  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    o = parsed.options
    suite = evaluation_suite(o["ckpt"], o["data"], o["protocols"], o["protocol_params"], o["out"], o["label"],
                             o["allow_class_path"])
    print(f"results: {run_suite(suite, o['device'])}")
    return 0
