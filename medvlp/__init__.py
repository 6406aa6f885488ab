"""medvlp: medical vision-language pretraining methods side by side.

Importing the package is cheap: methods, datamodules and benchmarks register themselves when the
registry is first queried (see :mod:`medvlp.registry`).
"""
from __future__ import annotations

from medvlp.version import __version__

__all__ = ["__version__", "from_pretrained", "load"]


def load(format: str, path: str, **options: object) -> object:
    """A released or medvlp checkpoint as a model with ``encode_image``/``encode_text``/...; ``format`` is
    a checkpoint format (``mgca``, ``biomedclip``, ...), ``medvlp`` or ``export`` (see the documentation's
    "Weights in and out" page)."""
    from medvlp.pretrained import load as _load  # lazy: `import medvlp` stays cheap; the weights code loads on first use

    return _load(format, path, **options)


def from_pretrained(path_or_repo: str, **kwargs: object) -> tuple[object, object]:
    """``(model, preprocess)`` from a ``medvlp export`` folder (or a hub repo when online)."""
    from medvlp.pretrained.export import from_pretrained as _from_pretrained  # lazy: `import medvlp` stays cheap; the weights code loads on first use

    return _from_pretrained(path_or_repo, **kwargs)
