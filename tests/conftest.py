"""Shared fixtures: an isolated phantom cache, offline hub settings, and tiny configs per method."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def phantom_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test generates phantom data into one session-scoped temp folder."""
    path = tmp_path_factory.mktemp("medvlp_cache")
    os.environ["MEDVLP_CACHE"] = str(path)
    return path


def tiny_config(method: str, *overrides: str) -> dict[str, Any]:
    """Composed config (plain dict) for ``method`` with the tiny preset and its example data."""
    from omegaconf import OmegaConf

    from medvlp.compose import compose
    from medvlp.config import to_container

    cfg = compose([f"method={method}", "preset=tiny"])  # data: the method's example_data
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return to_container(cfg)


def build_tiny(method: str, *overrides: str) -> tuple[Any, Any]:
    """(method, datamodule) built from :func:`tiny_config`."""
    from medvlp.train import build_datamodule_from_config, build_method

    cfg = tiny_config(method, *overrides)
    dm = build_datamodule_from_config(cfg)
    dm.prepare_data()
    return build_method(cfg, dm), dm


def first_batch(dm: Any) -> Any:
    """First training batch (unwrapping CombinedLoader's tuple)."""
    batch = next(iter(dm.train_dataloader()))
    return batch[0] if isinstance(batch, tuple) else batch
