"""A third-party objective exposed through the ``medvlp.methods`` entry point (plugin test)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from medvlp.losses import clip_loss
from medvlp.method import VLPMethod


class ToyInfoNCE(VLPMethod):
    """Image→text InfoNCE only, to prove plugins are discovered, listed, trained and benchmarked."""

    name = "toy_infonce"
    #: default init_args shipped with the plugin (read by ``medvlp.compose`` like methods/<name>.yaml)
    defaults_file = "toy.yaml"

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        img = self.encode_image(batch["image"], normalize=False)
        txt = self.encode_text(batch["text"], normalize=False)
        return {"toy_loss": clip_loss(img, txt, self.temperature)}
