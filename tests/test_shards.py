"""Streaming tar shards: round trip, rank/worker splitting, per-epoch order, pretraining from shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp.cli import main
from medvlp.datamodules import PhantomDataModule, ShardDataModule, write_shards


def _make(tmp_path: Path) -> Path:
    dm = PhantomDataModule("xray", num_train=32, num_val=4, num_test=4, image_size=32)
    ds = dm.dataset("train", augment=False)
    paths = write_shards((ds[i] for i in range(len(ds))), tmp_path / "shards", samples_per_shard=8)
    assert len(paths) == 4
    return tmp_path / "shards"


def test_shards_round_trip_workers_and_epochs(tmp_path: Path) -> None:
    folder = _make(tmp_path)
    dm = ShardDataModule(train=str(folder), image_size=32, batch_size=4, num_workers=2, shuffle_buffer=8)
    loader = dm.train_dataloader()
    epoch1 = [m["id"] for b in loader for m in b["meta"]]
    epoch2 = [m["id"] for b in loader for m in b["meta"]]
    assert len(epoch1) == len(set(epoch1)) == 32 and set(epoch1) == set(epoch2)
    assert epoch1 != epoch2  # new seeded order each epoch
    b = next(iter(dm.eval_dataloader("train", 4)))
    assert b["image"].shape == (4, 1, 32, 32) and len(b["text"]) == 4 and b["labels"].shape == (4, 5)
    ref = PhantomDataModule("xray", num_train=32, num_val=4, num_test=4, image_size=32).dataset("train", augment=False)
    by_id = {ref[i]["meta"]["id"]: ref[i] for i in range(len(ref))}
    first = b["meta"][0]["id"]
    assert torch.allclose(b["image"][0], by_id[first]["image"], atol=2e-2)  # stored as float16
    assert b["text"][0] == by_id[first]["text"]


def test_pretrain_from_shards(tmp_path: Path) -> None:
    folder = _make(tmp_path)
    args = ["pretrain", "method=clip", "data=shards", "preset=tiny", f"data.init_args.train={folder}",
            f"data.init_args.val={folder}", "data.init_args.image_size=32", "trainer.max_steps=2",
            "trainer.enable_progress_bar=false", f"run.dir={tmp_path / 'run'}"]
    assert main(args) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_every_rank_gets_the_same_batches_with_uneven_shards(tmp_path: Path) -> None:
    """2 ranks × 2 workers over 9 shards of uneven size (26 samples): equal per-rank batch counts (else
    DDP deadlocks), loader settings honoured, and persistent workers still see each new epoch's order."""
    dm = PhantomDataModule("xray", num_train=26, num_val=4, num_test=4, image_size=32)
    ds = dm.dataset("train", augment=False)
    folder = tmp_path / "uneven"
    assert len(write_shards((ds[i] for i in range(len(ds))), folder, samples_per_shard=3)) == 9
    counts, ids = [], []
    for rank in (0, 1):
        shards = ShardDataModule(train=str(folder), image_size=32, batch_size=2, num_workers=2, shuffle_buffer=4,
                                 persistent_workers=True)
        loader = shards.train_dataloader()
        assert loader.persistent_workers and loader.dataset.samples_per_epoch == 26
        loader.dataset.rank, loader.dataset.world_size = rank, 2
        epochs = [[m["id"] for b in loader for m in b["meta"]] for _ in range(2)]
        counts.append([len(e) for e in epochs])
        ids.append(epochs)
        assert epochs[0] != epochs[1]  # the epoch reaches persistent workers
    assert counts[0] == counts[1] == [12, 12]  # 13 samples per rank: 7 + 6 per worker → 3 + 3 batches of 2
    assert len(set(ids[0][0]) | set(ids[1][0])) >= 20  # ranks read mostly different samples


@pytest.mark.parametrize("arr", [np.arange(224 * 200, dtype=np.uint8).reshape(224, 200),
                                 np.linspace(0, 1, 60, dtype=np.float16).reshape(3, 4, 5),
                                 np.arange(7, dtype=np.int64), np.array(3.5, dtype=np.float32),
                                 np.asfortranarray(np.ones((3, 2), np.float32))])
def test_load_npy_matches_np_load_without_copying(arr) -> None:
    import io as _io

    from medvlp.datamodules.io.shards import load_npy

    buf = _io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = bytearray(buf.getvalue())
    got = load_npy(memoryview(data))
    np.testing.assert_array_equal(got, arr)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    if arr.flags.c_contiguous and arr.ndim:
        assert got.flags.writeable and np.shares_memory(got, np.frombuffer(data, np.uint8))  # a view, no copy
