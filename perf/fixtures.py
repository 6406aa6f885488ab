"""Synthetic datasets in published layouts for the performance benchmark (written to a temporary folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

COVIDX_CLASSES = ("normal", "pneumonia", "COVID-19")


def write_covidx(root: Path, n_train: int, image: Callable[[int], np.ndarray], quality: int = 95,
                 n_test: int = 2) -> Path:
    """A COVIDx folder (``<split>/<id>.jpg`` plus ``<split>_COVIDx9A.txt``) whose ``i``-th JPEG is ``image(i)``."""
    for split, count in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True)
        lines = []
        for i in range(count):
            Image.fromarray(image(i)).save(root / split / f"{split}_{i}.jpg", quality=quality)
            lines.append(f"p{i} {split}_{i}.jpg {COVIDX_CLASSES[i % 3]} src")
        (root / f"{split}_COVIDx9A.txt").write_text("\n".join(lines) + "\n")
    return root
