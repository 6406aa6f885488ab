"""MONAI Swin transformer (the SwinUNETR encoder) behind the :class:`ImageFeatures` interface."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from medvlp.encoders.vit import ImageFeatures


class SwinEncoder(nn.Module):
    """SwinUNETR's ``SwinTransformer`` trunk (GTGM's backbone: feature_size 48, depths 2-4-2-2).

    Args:
        in_channels: image channels.
        feature_size: first-stage width (48 in GTGM); the pooled width is ``16 · feature_size``.
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: attention window.
        spatial_dims: 2 or 3 (a single value; Swin has no shared 2D/3D trunk).
        grad_checkpointing: MONAI ``use_checkpoint``.
        **_: ignored encoder hints (image sizes) so datamodule hints can be applied uniformly.
    """

    def __init__(self, in_channels: int = 1, feature_size: int = 48, depths: Sequence[int] = (2, 4, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, spatial_dims: int | Sequence[int] = 3,
                 grad_checkpointing: bool = False, **_: object) -> None:
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        sd = spatial_dims if isinstance(spatial_dims, int) else int(list(spatial_dims)[0])
        self.spatial_dims = (sd,)
        self.swin = SwinTransformer(in_chans=in_channels, embed_dim=feature_size, window_size=(window_size,) * sd,
                                    patch_size=(2,) * sd, depths=tuple(depths), num_heads=tuple(num_heads),
                                    spatial_dims=sd, use_checkpoint=grad_checkpointing)
        self.embed_dim = feature_size * 2 ** len(depths)
        self.norm = nn.LayerNorm(self.embed_dim)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> ImageFeatures:
        """Encode ``(B, C, *spatial)``; ``token_mask`` is not supported."""
        if token_mask is not None:
            raise ValueError("SwinEncoder does not support token masking")
        maps = self.swin(x, normalize=True)
        last = maps[-1]
        tokens = self.norm(last.flatten(2).transpose(1, 2))
        feats = ImageFeatures(pooled=tokens.mean(1), tokens=tokens, grid=tuple(last.shape[2:]), hidden=[])
        feats["maps"] = list(maps[1:])  # type: ignore[typeddict-unknown-key]
        return feats
