"""The method contract, shipped with the package so that a plugin's own CI can run it.

.. code-block:: python

    from medvlp.testing import check_method

    def test_contract(tmp_path):
        check_method("my_pkg.objective.MyMethod", tmp_dir=tmp_path)   # or the class, or a registered name

Each check raises :class:`ContractError` (an ``AssertionError``) naming the method and what is wrong.
The checks build the method with the ``tiny`` preset on its ``example_data`` (random weights, no
download): constructor accepts the injected encoder/optimizer arguments, losses are finite scalars under
``*_loss`` keys, gradients reach both encoders, ``encode_image``/``encode_text`` shapes and norms (2D
and/or 3D as the encoder supports), a Lightning ``fast_dev_run`` and a checkpoint round trip through
:func:`medvlp.method.load_method`.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from medvlp.compose import compose
from medvlp.config import to_container
from medvlp.train import build_datamodule_from_config, build_method
from medvlp.validate import ConfigError
import lightning as L
from medvlp.method import load_method

CHECKS = ("construct", "losses", "gradients", "encoders", "fit_and_checkpoint")


class ContractError(AssertionError):
    """A method breaks the contract; the message names the method and the broken rule."""


def method_name(method: str | type) -> str:
    """Registered name or class path of ``method`` (a class becomes ``module.QualName``)."""
    return method if isinstance(method, str) else f"{method.__module__}.{method.__qualname__}"


def tiny_config(method: str | type, *overrides: str) -> dict[str, Any]:
    """Composed config (plain dict, validated) for ``method`` with the ``tiny`` preset and its example data."""

    return to_container(compose([f"method={method_name(method)}", "preset=tiny", *overrides]))


def build_tiny(method: str | type, *overrides: str) -> tuple[Any, Any]:
    """``(method, datamodule)`` built from :func:`tiny_config`, data prepared."""

    try:
        cfg = tiny_config(method, *overrides)
    except ConfigError as exc:
        if "unknown key method.init_args." in str(exc):
            raise ContractError(f"{method_name(method)}: {exc}; __init__ must take **kwargs and pass them to "
                                "super().__init__(**kwargs) (presets set the base-class arguments)") from exc
        raise
    dm = build_datamodule_from_config(cfg)
    dm.prepare_data()
    try:
        model = build_method(cfg, dm)
    except TypeError as exc:
        raise ContractError(
            f"{method_name(method)}: the constructor rejected medvlp's arguments ({exc}); __init__ must take "
            "**kwargs and pass them to super().__init__(**kwargs) (presets inject image_encoder, text_encoder, "
            "embed_dim, optimizer, ...)") from exc
    return model, dm


def first_batch(dm: Any) -> Any:
    """First training batch (unwrapping ``CombinedLoader``'s tuple)."""
    batch = next(iter(dm.train_dataloader()))
    return batch[0] if isinstance(batch, tuple) else batch


def _fail(model: Any, message: str) -> ContractError:
    return ContractError(f"{type(model).__name__}: {message}")


def check_losses(model: Any, dm: Any) -> None:
    """``compute_losses`` returns finite scalar ``*_loss`` terms."""
    terms = model._losses(first_batch(dm))
    loss_terms = {k: v for k, v in terms.items() if k.endswith("_loss")}
    if not loss_terms:
        raise _fail(model, f"compute_losses returned no '*_loss' key (got {sorted(terms)})")
    for k, v in loss_terms.items():
        if not (isinstance(v, torch.Tensor) and v.ndim == 0 and math.isfinite(float(v.detach()))):
            raise _fail(model, f"loss term {k!r} must be a finite scalar tensor, got {v!r}")


def check_gradients(model: Any, dm: Any) -> None:
    """The summed loss sends gradients into the image encoder, the (trainable) text encoder and the text
    projection."""
    model.train()
    model.zero_grad()
    model._total(model._losses(first_batch(dm)), "train").backward()

    def has_grad(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)

    if not has_grad(model.image_encoder):
        raise _fail(model, "no gradient reaches the image encoder")
    if any(p.requires_grad for p in model.text_encoder.parameters()) and not has_grad(model.text_encoder):
        raise _fail(model, "no gradient reaches the trainable text encoder")
    if not has_grad(model.text_proj):
        raise _fail(model, "no gradient reaches the text projection")


def _input_size(enc: Any, dims: int, data_image: torch.Tensor | None) -> tuple[int, ...] | None:
    """Spatial input size for ``dims``: the data's, else the encoder's reference grid × patch size."""
    if data_image is not None and data_image.ndim == dims + 2:
        return tuple(data_image.shape[2:])
    grid = getattr(enc, "ref_grid", {}).get(str(dims))
    embed = getattr(enc, "patch_embed", {})
    if grid is None or str(dims) not in embed:
        return None
    return tuple(g * p for g, p in zip(grid, embed[str(dims)].patch_size))


def check_encoders(model: Any, dm: Any = None) -> None:
    """``encode_image`` gives ``(B, embed_dim)`` for every supported dimensionality, feature maps have the
    right rank, and ``encode_text`` gives unit-norm ``(B, embed_dim)`` embeddings."""
    model.eval()
    enc = model.image_encoder
    batch = first_batch(dm) if dm is not None else {}
    images = [b["image"] for b in batch.values()] if batch and "image" not in batch else [batch.get("image")]
    with torch.no_grad():
        for d in getattr(enc, "spatial_dims", (2,)):
            size = next((s for s in (_input_size(enc, d, im) for im in images) if s), None)
            if size is None:
                continue
            shape = (2, getattr(enc, "in_channels", 1), *size)
            out = model.encode_image(torch.randn(*shape))
            if tuple(out.shape) != (2, model.embed_dim):
                raise _fail(model, f"encode_image on {d}D input {shape} gave {tuple(out.shape)}, expected (2, {model.embed_dim})")
            maps = model.image_feature_maps(torch.randn(*shape))
            if not maps or any(m.ndim != d + 2 for m in maps):
                raise _fail(model, f"image_feature_maps on {d}D input must return ({d + 2})-dim maps")
        emb = model.encode_text(["No pleural effusion.", "Right lower lobe consolidation."])
    if tuple(emb.shape) != (2, model.embed_dim) or not torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-4):
        raise _fail(model, f"encode_text must return unit-norm (2, {model.embed_dim}) embeddings, got {tuple(emb.shape)}")


def check_fit_and_checkpoint(model: Any, dm: Any, tmp_dir: str | Path) -> None:
    """A Lightning ``fast_dev_run`` fit, then ``load_method`` rebuilds an identical model from the checkpoint."""


    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_dir))
    trainer.fit(model, datamodule=dm)
    path = Path(tmp_dir) / "contract.ckpt"
    trainer.save_checkpoint(str(path))
    loaded = load_method(str(path), allow_class_path=True)  # plugins named by class path, not registered
    if type(loaded) is not type(model):
        raise _fail(model, f"checkpoint reloads as {type(loaded).__name__}")
    model.eval()
    batch = first_batch(dm)
    image = batch["image"] if "image" in batch else next(iter(batch.values()))["image"]
    with torch.no_grad():
        if not torch.allclose(model.encode_image(image), loaded.encode_image(image), atol=1e-5):
            raise _fail(model, "the reloaded checkpoint encodes images differently (hyperparameters or state not saved)")


def check_method(method: str | type, *overrides: str, tmp_dir: str | Path | None = None,
                 checks: tuple[str, ...] = CHECKS) -> list[str]:
    """Run the contract on ``method`` (a registered name, a class path or the class).

    Args:
        method: what to check.
        *overrides: extra ``key=value`` config overrides (e.g. for a method that needs other data).
        tmp_dir: folder for the checkpoint (default: a temporary folder).
        checks: a subset of :data:`CHECKS`.

    Returns:
        The names of the checks that passed (all of ``checks``).

    Raises:
        ContractError: the first broken rule, naming the method.
    """
    torch.manual_seed(0)
    model, dm = build_tiny(method, *overrides)
    steps: dict[str, Callable[[], None]] = {
        "construct": lambda: None,
        "losses": lambda: check_losses(model, dm),
        "gradients": lambda: check_gradients(model, dm),
        "encoders": lambda: check_encoders(model, dm),
    }
    passed = []
    for name in checks:
        if name == "fit_and_checkpoint":
            if tmp_dir is None:
                with tempfile.TemporaryDirectory() as d:
                    check_fit_and_checkpoint(model, dm, d)
            else:
                check_fit_and_checkpoint(model, dm, tmp_dir)
        else:
            steps[name]()
        passed.append(name)
    return passed
