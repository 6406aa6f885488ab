"""SigLIP as a medvlp objective."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from medvlp.method import VLPMethod
from my_siglip.losses import sigmoid_loss


class SigLIP(VLPMethod):
    """SigLIP (Zhai et al. 2023, arXiv 2303.15343): a sigmoid loss over every image-text pair of the batch.

    Deviations: negatives are per device (SigLIP's chunked cross-device loss is not implemented).

    Args:
        init_scale: initial ``t`` (paper: 10).
        init_bias: initial ``b`` (paper: -10).
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "siglip"
    required_keys: ClassVar[frozenset[str]] = frozenset({"image", "text"})
    loss_terms: ClassVar[tuple[str, ...]] = ("siglip_loss",)
    uses_temperature: ClassVar[bool] = False
    defaults_file: ClassVar[str] = "siglip.yaml"  # shipped next to this module

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        img = self.encode_image(batch["image"])
        txt = self.encode_text(batch["text"])
        return {"siglip_loss": sigmoid_loss(img, txt, self.log_scale, self.bias),
                "scale": self.log_scale.exp().detach()}
