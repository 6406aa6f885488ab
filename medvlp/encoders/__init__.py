"""Image and text encoders plus projection heads.

Every image encoder returns an :class:`ImageFeatures` dict (``pooled``, ``tokens``, ``grid``,
``hidden``) so methods and benchmarks never branch on the architecture or the number of spatial dims.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from medvlp.encoders.heads import ProjectionHead
from medvlp.encoders.text import TextEncoder
from medvlp.encoders.vit import ImageFeatures, ViTEncoder
from medvlp.config import instantiate, to_container

DEFAULT_IMAGE_ENCODER = "medvlp.encoders.vit.ViTEncoder"
DEFAULT_TEXT_ENCODER = "medvlp.encoders.text.TextEncoder"


def build_encoder(spec: Mapping[str, Any] | nn.Module, default_class_path: str) -> nn.Module:
    """Build an encoder from ``{class_path, init_args}`` or a bare mapping of init args.

    A bare mapping (no ``class_path``) is passed to ``default_class_path``. A ``class_path`` must name an
    ``nn.Module`` subclass (checked before it is called).
    """

    if isinstance(spec, nn.Module):
        return spec
    spec = dict(to_container(spec) or {})
    if "class_path" not in spec:
        spec = {"class_path": default_class_path, "init_args": spec}
    return instantiate(spec, expected=nn.Module)


__all__ = [
    "ImageFeatures",
    "ProjectionHead",
    "TextEncoder",
    "ViTEncoder",
    "build_encoder",
    "DEFAULT_IMAGE_ENCODER",
    "DEFAULT_TEXT_ENCODER",
]
