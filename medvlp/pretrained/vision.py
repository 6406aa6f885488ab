"""Image encoders rebuilt from a checkpoint's shapes (ViT from timm-layout keys, ResNet-50 from
torchvision-layout keys)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from medvlp.pretrained.surgery import layout_error, square_grid
from medvlp.encoders.vit import ViTEncoder
from medvlp.pretrained.vit import load_into_encoder, to_timm_layout
from medvlp.encoders.resnet import ResNetEncoder
from medvlp.pretrained.model import load_strict


def vit_from_timm(sd: Mapping[str, torch.Tensor], num_heads: int, source: str, in_channels: int = 3) -> nn.Module:
    """A 2D :class:`~medvlp.encoders.ViTEncoder` sized from a timm-layout state dict and loaded from it."""

    sd = to_timm_layout(sd, source)
    w = sd["patch_embed.proj.weight"]
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = square_grid(sd["pos_embed"].shape[1] - 1, source)
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    enc = ViTEncoder(in_channels=in_channels, embed_dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     spatial_dims=[2], img_size_2d=grid[0] * patch, patch_size_2d=patch)
    with torch.no_grad():
        load_into_encoder(enc, sd, source)
    return enc.eval()


def resnet_from_torchvision(sd: Mapping[str, torch.Tensor], source: str, spatial_dims: int = 2) -> nn.Module:
    """A :class:`~medvlp.encoders.resnet.ResNetEncoder` (blocks per stage read from the keys), loaded strictly
    (the classifier ``fc`` is not part of the encoder and must have been removed by the caller)."""

    if "conv1.weight" not in sd or "layer4.0.conv1.weight" not in sd:
        raise layout_error(source, "not a torchvision ResNet state dict", ["conv1.weight", "layer4.0.conv1.weight"], sd)
    layers = [1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")) for i in range(1, 5)]
    enc = ResNetEncoder(in_channels=int(sd["conv1.weight"].shape[1]), spatial_dims=spatial_dims, layers=layers)
    load_strict(enc, sd, source, "image encoder")
    return enc.eval()
