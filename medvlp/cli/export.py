"""``medvlp export``: a checkpoint as a portable folder (config.json + model.safetensors + text/)."""
from __future__ import annotations

from medvlp.cli.args import Key, Parsed

NAME = "export"
SUMMARY = "portable folder: config.json + model.safetensors + text/ (ckpt=PATH out=DIR [format=hf|timm])"
HELP = """medvlp export ckpt=PATH out=DIR [format=hf|timm] [allow_class_path=true]

Write a portable folder: config.json (method, hyperparameters, preprocessing, library versions),
model.safetensors (no optimizer state, no pickle) and text/ (text model + tokenizer); load it with
medvlp.from_pretrained(DIR). format=timm writes the 2D ViT image encoder as a timm state dict."""
KEYS = {
    "ckpt": Key(str, required=True, help="a medvlp checkpoint (.ckpt)"),
    "out": Key(str, required=True, help="the folder to write"),
    "format": Key(str, "hf", help="hf (medvlp folder) or timm (2D ViT state dict)"),
    "allow_class_path": Key(bool, False, help="accept a checkpoint whose method is a class path, not a registered name"),
}
PASSTHROUGH = False


def run(parsed: Parsed) -> int:
    """Export the checkpoint."""
    from medvlp.pretrained.export import export  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    o = parsed.options
    print(f"exported: {export(o['ckpt'], o['out'], format=o['format'], allow_class_path=o['allow_class_path'])}")
    return 0
