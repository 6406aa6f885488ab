"""Acceptance: `medvlp benchmark` on a suite where an MGCA-layout and a BiomedCLIP-layout checkpoint are
evaluated side by side with a medvlp-trained model."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from medvlp.cli import main
from tests.pretrained_fixtures import biomedclip_checkpoint, mgca_checkpoint, write_tokenizer


def test_benchmark_suite_with_released_checkpoints(tmp_path: Path) -> None:
    tok = write_tokenizer(tmp_path / "tokenizer")
    mgca_checkpoint(tmp_path / "mgca.ckpt", depth=1, text_depth=1)
    biomedclip_checkpoint(tmp_path / "open_clip_pytorch_model.bin", depth=1, text_depth=1)
    suite = {
        "name": "released", "output": str(tmp_path / "out"), "preset": "tiny",
        "pretrain": {"trainer": {"max_steps": 2, "enable_progress_bar": False}},
        "methods": {
            "clip": {"method": "clip"},
            "mgca_release": {"method": "mgca", "ckpt": {"format": "mgca", "path": str(tmp_path / "mgca.ckpt"),
                                                         "tokenizer": str(tok)}},
            "biomedclip_release": {"method": "biomedclip",
                                   "ckpt": {"format": "biomedclip", "path": str(tmp_path / "open_clip_pytorch_model.bin"),
                                            "tokenizer": str(tok)}},
        },
        "datasets": {"phantom_xray": {"name": "phantom", "init_args": {
            "modality": "xray", "num_train": 16, "num_val": 8, "num_test": 16, "image_size": 32, "batch_size": 8}}},
        "protocols": {"zero_shot": {}, "retrieval": {}, "linear_probe": {"fractions": [1.0], "seeds": [0]}},
    }
    path = tmp_path / "released.yaml"
    path.write_text(yaml.safe_dump(suite))
    assert main(["benchmark", f"suite={path}"]) == 0
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(df["label"]) == {"clip", "mgca_release", "biomedclip_release"}
    for label in ("mgca_release", "biomedclip_release"):
        rows = df[df["label"] == label]
        assert set(rows["protocol"]) == {"zero_shot", "retrieval", "linear_probe"}
        assert rows["value"].notna().all()
    assert df.loc[df["label"] == "mgca_release", "checkpoint"].iloc[0] == f"mgca:{tmp_path / 'mgca.ckpt'}"
    # evaluate takes the same spec from the command line
    assert main(["evaluate", "ckpt.format=biomedclip", f"ckpt.path={tmp_path / 'open_clip_pytorch_model.bin'}",
                 f"ckpt.tokenizer={tok}", "data.name=phantom", "data.init_args.num_train=16", "data.init_args.num_val=8",
                 "data.init_args.num_test=16", "data.init_args.image_size=32", "protocols=[retrieval]",
                 f"out={tmp_path / 'eval'}"]) == 0
    ev = pd.read_csv(tmp_path / "eval" / "results.csv")
    assert set(ev["label"]) == {"biomedclip ViTEncoder(d=48, L=1)"} and set(ev["protocol"]) == {"retrieval"}
