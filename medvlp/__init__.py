"""medvlp: medical vision-language pretraining methods side by side.

Importing the package is cheap: methods, datamodules and benchmarks register themselves when the
registry is first queried (see :mod:`medvlp.registry`).
"""
from __future__ import annotations

__version__ = "0.1.0"
