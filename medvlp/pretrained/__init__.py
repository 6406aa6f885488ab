"""Weights in and out: released-checkpoint formats, pretrained initialisation helpers, export and
``from_pretrained``.

Nothing here is imported by ``import medvlp``; :func:`medvlp.load` and :func:`medvlp.from_pretrained` import
it on first use.
"""
from __future__ import annotations

from typing import Any


def load(format: str, path: str, **options: Any) -> Any:
    """Load a released checkpoint (``format`` from :data:`medvlp.pretrained.formats.FORMATS`, ``medvlp`` or
    ``export``) as a model exposing ``encode_image``/``encode_text``/``image_representation``/
    ``image_feature_maps``; see :func:`medvlp.pretrained.formats.load_checkpoint`."""
    from medvlp.pretrained.formats import load_checkpoint  # lazy: `import medvlp` stays cheap; the weights code loads on first use

    return load_checkpoint(format, path, **options)
