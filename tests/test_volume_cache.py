"""3D ``cache: disk`` shared by ranks: rank 0 builds every item's cache file, the other rank waits and
decodes nothing (2 gloo processes); the cache folder is keyed by the preprocessing spec."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from medvlp.datamodules import MSDDataModule
from tests import fixtures as fx

KW = {"volume_size": [8, 16, 16], "window": [-175.0, 250.0], "cache": "disk"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, cache: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dm = MSDDataModule(root, cache_dir=cache, **KW)
    ds = dm.dataset("train", augment=False)
    files_after_build = len(list(Path(cache).rglob("*.pt")))
    sample = ds[0]
    out[rank] = {"built": dm.cache_built["train"], "files": files_after_build, "n": len(ds),
                 "shape": tuple(sample["image"].shape)}
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch + MONAI: ~50 s on 2 busy cores
def test_disk_cache_is_built_by_rank_zero_and_shared(tmp_path: Path) -> None:
    root = str(fx.make_msd(tmp_path / "msd", n=6))
    cache = tmp_path / "cache"
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), root, str(cache), out), nprocs=2, join=True)
        res = dict(out)
    n = res[0]["n"]
    assert res[0]["built"] == n and res[1]["built"] == 0  # rank 1 never decoded a volume for the cache
    assert res[1]["files"] == n  # ... and found every cache file written when it passed the barrier
    assert res[0]["shape"] == res[1]["shape"] == (1, 8, 16, 16)
    spec_dirs = [p for p in cache.iterdir() if p.is_dir()]
    assert len(spec_dirs) == 1  # cache_dir/<spec hash>/
    other = MSDDataModule(root, cache_dir=str(cache), **{**KW, "volume_size": [8, 32, 32]})
    other.dataset("train", augment=False)[0]
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # another spec never reads stale files


def test_paper_preset_caches_volumes_on_disk_by_default(tmp_path: Path, monkeypatch) -> None:
    from medvlp.compose import compose

    for data in ("ct_rate", "msd", "btcv", "brats"):
        assert compose([f"data={data}", "preset=paper"])["data"]["init_args"]["cache"] == "disk"
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "cache"))
    dm = MSDDataModule(str(fx.make_msd(tmp_path / "msd", n=4)), volume_size=[8, 16, 16], cache="disk")
    dm.dataset("train", augment=False)[0]
    assert dm.cache_dir == tmp_path / "cache" / "volumes" / "msd" and any(dm.cache_dir.rglob("*.pt"))
