"""One contract suite run over every registered method (built-ins and installed plugins), through the
checks shipped in :mod:`medvlp.testing` (the same ones a plugin's CI runs with ``check_method``)."""
from __future__ import annotations

import pytest
import torch

from medvlp import testing
from medvlp.registry import METHODS

ALL_METHODS = METHODS.names()


@pytest.fixture(scope="module", params=ALL_METHODS)
def built(request: pytest.FixtureRequest):
    torch.manual_seed(0)
    method, dm = testing.build_tiny(request.param)
    return request.param, method, dm


def test_losses_are_finite_scalars(built) -> None:
    _, method, dm = built
    testing.check_losses(method, dm)


def test_gradients_reach_both_encoders(built) -> None:
    _, method, dm = built
    testing.check_gradients(method, dm)


def test_encode_image_and_text_shapes(built) -> None:
    _, method, dm = built
    testing.check_encoders(method, dm)


def test_fast_dev_run_and_checkpoint_round_trip(built, tmp_path) -> None:
    _, method, dm = built
    testing.check_fit_and_checkpoint(method, dm, tmp_path)


def test_clip_encoder_handles_2d_and_3d() -> None:
    method, _ = testing.build_tiny("clip", "method.init_args.image_encoder.spatial_dims=[2,3]",
                                   "method.init_args.image_encoder.img_size_3d=[16,32,32]")
    method.eval()
    with torch.no_grad():
        assert method.encode_image(torch.randn(2, 1, 32, 32)).shape == (2, 16)
        assert method.encode_image(torch.randn(2, 1, 16, 32, 32)).shape == (2, 16)
    testing.check_encoders(method)  # both dimensionalities from the encoder's reference grid


class NoKwargs(METHODS.get("clip")):  # type: ignore[misc]
    """Breaks the contract: drops the base-class arguments that presets inject."""

    def __init__(self, i2t_weight: float = 0.5) -> None:
        super().__init__(i2t_weight=i2t_weight)


def test_check_method_names_the_broken_rule() -> None:
    with pytest.raises(testing.ContractError, match=r"__init__ must take \*\*kwargs"):
        testing.check_method(NoKwargs, checks=("construct",))
