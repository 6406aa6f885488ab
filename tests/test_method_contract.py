"""One contract suite run over every registered method (built-ins and installed plugins)."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from medvlp.method import load_method
from medvlp.registry import METHODS
from tests.conftest import build_tiny, first_batch

ALL_METHODS = METHODS.names()


@pytest.fixture(scope="module", params=ALL_METHODS)
def built(request: pytest.FixtureRequest):
    torch.manual_seed(0)
    method, dm = build_tiny(request.param)
    return request.param, method, dm


def test_losses_are_finite_scalars(built) -> None:
    name, method, dm = built
    terms = method._losses(first_batch(dm))
    loss_terms = {k: v for k, v in terms.items() if k.endswith("_loss")}
    assert loss_terms, f"{name} returned no *_loss terms"
    for k, v in loss_terms.items():
        assert v.ndim == 0 and math.isfinite(float(v)), (name, k, v)


def test_gradients_reach_both_encoders(built) -> None:
    name, method, dm = built
    method.train()
    method.zero_grad()
    method._total(method._losses(first_batch(dm)), "train").backward()

    def has_grad(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)

    assert has_grad(method.image_encoder), f"{name}: no gradient in the image encoder"
    text_trainable = any(p.requires_grad for p in method.text_encoder.parameters())
    if text_trainable:
        assert has_grad(method.text_encoder), f"{name}: no gradient in the trainable text encoder"
    assert has_grad(method.text_proj), f"{name}: no gradient in the text projection"


def test_encode_image_shapes_2d_and_3d(built) -> None:
    name, method, _ = built
    method.eval()
    dims = method.image_encoder.spatial_dims
    with torch.no_grad():
        if 2 in dims:
            assert method.encode_image(torch.randn(2, 1, 32, 32)).shape == (2, method.embed_dim)
            maps = method.image_feature_maps(torch.randn(2, 1, 32, 32))
            assert maps and all(m.ndim == 4 for m in maps)
        if 3 in dims:
            assert method.encode_image(torch.randn(2, 1, 16, 32, 32)).shape == (2, method.embed_dim)
            maps = method.image_feature_maps(torch.randn(2, 1, 16, 32, 32))
            assert maps and all(m.ndim == 5 for m in maps)
        emb = method.encode_text(["No pleural effusion.", "Right lower lobe consolidation."])
    assert emb.shape == (2, method.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_fast_dev_run_and_checkpoint_round_trip(built, tmp_path) -> None:
    name, method, dm = built
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(method, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_method(str(path))
    assert type(loaded) is type(method)
    method.eval()
    x = first_batch(dm)
    image = x["image"] if "image" in x else next(iter(x.values()))["image"]
    with torch.no_grad():
        assert torch.allclose(method.encode_image(image), loaded.encode_image(image), atol=1e-5)


def test_clip_encoder_handles_2d_and_3d() -> None:
    method, _ = build_tiny("clip", "method.init_args.image_encoder.spatial_dims=[2,3]",
                           "method.init_args.image_encoder.img_size_3d=[16,32,32]")
    method.eval()
    with torch.no_grad():
        assert method.encode_image(torch.randn(2, 1, 32, 32)).shape == (2, 16)
        assert method.encode_image(torch.randn(2, 1, 16, 32, 32)).shape == (2, 16)
