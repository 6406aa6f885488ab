"""Phantom data properties, batch schema, atomic IO and safe checkpoint loading."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from medvlp.batch import check_required_keys, collate
from medvlp.datamodules import PhantomDataModule
from medvlp.datamodules.phantom.render import render_xray
from medvlp.io import atomic_write_text, safe_load
from medvlp.method import NonFiniteLossError
from tests.conftest import build_tiny


def test_phantom_is_deterministic_and_findings_change_the_image(tmp_path) -> None:
    a = render_xray(np.random.default_rng([0, 5]), 64)
    b = render_xray(np.random.default_rng([0, 5]), 64)
    assert np.array_equal(a.image, b.image)
    # cardiomegaly widens the bright heart: compare mean heart-region width across many cases
    widths = {True: [], False: []}
    for i in range(60):
        c = render_xray(np.random.default_rng([1, i]), 64)
        widths[bool(c.labels[2])].append(c.boxes[10, 2] - c.boxes[10, 0])
    assert np.mean(widths[True]) > 1.3 * np.mean(widths[False])


def test_phantom_reports_name_positive_findings_and_regions() -> None:
    dm = PhantomDataModule("xray", num_train=32, num_val=4, num_test=4, image_size=32, cache_dir=None)
    ds = dm.dataset("train", augment=False)
    for i in range(len(ds)):
        s = ds[i]
        for f in s["meta"]["findings"]:
            assert f["label"].split()[-1].lower()[:5] in s["text"].lower() or f["label"] == "Cardiomegaly"
        assert s["image"].shape == (1, 32, 32) and s["regions"].shape == (12, 4)


def test_phantom_text_is_impression_then_findings_by_default() -> None:
    kwargs = dict(num_train=8, num_val=2, num_test=2, image_size=32)
    default = PhantomDataModule("xray", **kwargs).dataset("train", augment=False)[0]
    full = PhantomDataModule("xray", text_sections=None, **kwargs).dataset("train", augment=False)[0]
    impression = default["sections"]["impression"]
    assert default["text"] == f"{impression} {default['sections']['findings']}"
    assert full["text"].startswith("EXAMINATION:") and full["text"].rstrip().endswith(impression)
    with pytest.raises(ValueError, match="text_sections"):
        PhantomDataModule("xray", text_sections=["indication"])


@pytest.mark.parametrize("modality,shape", [("ct", (1, 16, 32, 32)), ("mri", (1, 16, 32, 32)), ("em", (1, 16, 32, 32))])
def test_phantom_volumes(modality: str, shape: tuple[int, ...]) -> None:
    dm = PhantomDataModule(modality, num_train=4, num_val=2, num_test=2, volume_size=shape[1:], batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, *shape) and batch["mask"].shape == (2, *shape)
    assert torch.isfinite(batch["image"]).all() and len(batch["text"]) == 2


def test_collate_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="'image'"):
        collate([{"image": torch.zeros(1, 4, 4)}, {"image": torch.zeros(1, 5, 5)}])
    with pytest.raises(KeyError, match="regions"):
        check_required_keys({"image": 1, "text": 2}, {"image", "regions"}, "ASG")


def test_crafted_pickle_checkpoint_does_not_execute(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(RuntimeError, match="weights-only"):
        safe_load(path)
    assert not marker.exists()


def test_atomic_write_leaves_no_temp_files(tmp_path) -> None:
    atomic_write_text(tmp_path / "a.txt", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_nan_guard_names_the_loss_term_and_step() -> None:
    method, dm = build_tiny("clip")
    with pytest.raises(NonFiniteLossError, match="'clip_loss'.*step 0"):
        method._total({"clip_loss": torch.tensor(float("nan"))}, "train")
