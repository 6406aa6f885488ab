"""ResNet-50 image encoder for 2D and 3D inputs (MONAI ``ResNet``, torchvision key layout).

The parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
...; ResNet v1.5: the stride sits in the 3×3 convolution), which is the layout GLoRIA, ConVIRT and MGCA
release their ResNet-50 image encoders in. ``spatial_dims=3`` gives the same network with 3D kernels
(MONAI's ``Conv[Conv.CONV, dims]``), used for volumetric data.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNet

from medvlp.encoders.vit import ImageFeatures


class ResNetEncoder(ResNet):
    """ResNet (bottleneck blocks; ResNet-50 by default) behind the :class:`ImageFeatures` interface.

    ``pooled`` is the global average of the last stage (2048-d for ResNet-50), ``tokens`` its positions
    row-major over ``grid``, and ``maps`` the four stage outputs (strides 4, 8, 16, 32) for segmentation
    decoders.

    Args:
        in_channels: image channels.
        spatial_dims: 2 or 3 (one value; a list such as ``[2]`` is accepted for config symmetry with ViT).
        layers: bottleneck blocks per stage (ResNet-50: 3, 4, 6, 3).
        init_from: a torchvision-layout ResNet state dict file (``fc`` dropped; a 3-channel ``conv1`` is
            summed for 1-channel inputs), loaded by :func:`medvlp.pretrained.init.load_initial_weights`.
        **_: ignored encoder hints (image sizes) so datamodule hints apply uniformly.
    """

    def __init__(self, in_channels: int = 1, spatial_dims: int | Sequence[int] = 2,
                 layers: Sequence[int] = (3, 4, 6, 3), init_from: str | None = None, **_: object) -> None:
        sd = spatial_dims if isinstance(spatial_dims, int) else int(list(spatial_dims)[0])
        if sd not in (2, 3):
            raise ValueError(f"ResNetEncoder: spatial_dims must be 2 or 3, got {spatial_dims}")
        super().__init__(block="bottleneck", layers=list(layers), block_inplanes=[64, 128, 256, 512], spatial_dims=sd,
                         n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B",
                         bias_downsample=False, feed_forward=False)
        self.spatial_dims = (sd,)
        self.in_channels = in_channels
        self.embed_dim = 512 * 4
        self.init_from = str(init_from) if init_from else None  # loaded by medvlp.pretrained.init, not here

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs ``layer1..layer4``."""
        if x.ndim - 2 != self.spatial_dims[0]:
            raise ValueError(f"ResNetEncoder was built for {self.spatial_dims[0]}D inputs, got shape {tuple(x.shape)}")
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> ImageFeatures:  # type: ignore[override]
        """Encode ``(B, C, *spatial)``; ``token_mask`` is not supported."""
        if token_mask is not None:
            raise ValueError("ResNetEncoder does not support token masking")
        maps = self.stages(x)
        last = maps[-1]
        tokens = last.flatten(2).transpose(1, 2)
        pooled = F.adaptive_avg_pool2d(last, 1).flatten(1) if last.ndim == 4 else last.mean(dim=(2, 3, 4))
        feats = ImageFeatures(pooled=pooled, tokens=tokens, grid=tuple(last.shape[2:]), hidden=[])
        feats["maps"] = maps  # type: ignore[typeddict-unknown-key]
        return feats
