"""Evaluation does each piece of work once: one backbone forward per image for probe features, report
embeddings only when read, segmentation maps once per (weights, dataset, split), fine-tuning loads only the
fraction's rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medvlp.benchmarks.kit.features import FeatureCache
from medvlp.benchmarks.protocols.finetune import Finetune
from medvlp.benchmarks.kit.protocol import EvalContext
from medvlp.benchmarks.protocols.segmentation import Segmentation
from medvlp.benchmarks.kit.splits import fraction_rows
from tests.conftest import build_tiny


def _model_and_data(num_train: int = 16, num_test: int = 12):
    model, dm = build_tiny("clip", f"data.init_args.num_train={num_train}", f"data.init_args.num_test={num_test}",
                           "data.init_args.num_val=4", "data.init_args.image_size=32")
    return model.eval(), dm


def _count_backbone_calls(model) -> list[int]:
    calls = [0]
    model.image_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_features_one_backbone_forward_per_image_and_reports_only_when_read(tmp_path: Path) -> None:
    model, dm = _model_and_data()
    calls = _count_backbone_calls(model)
    cache = FeatureCache(tmp_path)
    train = cache.get(model, dm, "train")
    batches = len(dm.eval_dataloader("train", 64))
    assert calls[0] == batches  # was 2 per batch (image_representation, then encode_image)
    images = torch.cat([b["image"] for b in dm.eval_dataloader("train", 64)])
    with torch.no_grad():
        assert np.allclose(train.representation, model.image_representation(images).numpy(), atol=1e-5)
        assert np.allclose(train.image_embedding, model.encode_image(images).numpy(), atol=1e-5)
    test = cache.get(model, dm, "test")
    assert cache.counts["text_forwards"] == 0  # the probes' train reports are never encoded
    emb = test.text_embedding
    assert cache.counts["text_forwards"] == len(test.ids)
    with torch.no_grad():
        assert np.allclose(emb, model.encode_text(test.texts).numpy(), atol=1e-5)
    again = FeatureCache(tmp_path)  # a rerun reads both sides from disk
    assert np.array_equal(again.get(model, dm, "test").text_embedding, emb)
    assert again.counts == {"image_forwards": 0, "text_forwards": 0, "map_forwards": 0}


def test_segmentation_maps_once_per_split_reused_across_fractions_and_seeds(tmp_path: Path) -> None:
    model, dm = _model_and_data()
    cache = FeatureCache(tmp_path)
    ctx = EvalContext(model, dm, cache, {"epochs": 1, "batch_size": 4})
    seg = Segmentation()
    first = [seg.run(ctx, f, s).values[0].value for f in (0.5, 1.0) for s in (0, 1)]
    n = sum(len(dm.dataset(split, augment=False)) for split in ("train", "val", "test"))  # val: selection
    assert cache.counts["map_forwards"] == n  # was 4 × n: once per fraction × seed
    assert sorted(p.name for p in next(tmp_path.glob("*.maps")).iterdir())[:2] == ["instances.npy", "level0.npy"] or \
        (next(tmp_path.glob("*.maps")) / "level0.npy").is_file()
    reread = EvalContext(model, dm, FeatureCache(tmp_path), {"epochs": 1, "batch_size": 4})
    again = [seg.run(reread, f, s).values[0].value for f in (0.5, 1.0) for s in (0, 1)]
    assert isinstance(reread.features.maps(model, dm, "train").levels[0], np.memmap)
    assert again == first and reread.features.counts["map_forwards"] == 0


def test_finetune_loads_only_the_fraction_rows() -> None:
    model, dm = _model_and_data(num_train=32)
    ds = dm.dataset("train", augment=False)
    loads: list[str] = []
    real = ds.load
    ds.load = lambda rec: (loads.append(str(rec["id"])), real(rec))[1]
    result = Finetune().run(EvalContext(model, dm, FeatureCache(None), {"epochs": 1, "batch_size": 4}), 0.25, 0)
    rows, subset_hash = fraction_rows([str(r["id"]) for r in ds.records], 0.25, 0)
    assert sorted(loads) == sorted(str(ds.records[i]["id"]) for i in rows) and len(loads) == 8  # not all 32
    assert result.split_hash == subset_hash and 0.0 <= result.values[0].value <= 1.0
