"""``on_error: skip`` under real loaders: each bad file counted and logged once, a run with nothing (or
too little) readable stops within one epoch, and skipped samples are replaced so no batch — and no DDP
rank — shrinks."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from medvlp.batch import collate
from medvlp.datamodules import COVIDxDataModule
from medvlp.datamodules.base import RecordDataset, ReplaceSkipped
from medvlp.datamodules.io.readers import DataError
from tests import fixtures as fx


def _covidx(tmp_path: Path, broken: int, **kwargs: Any) -> COVIDxDataModule:
    root = fx.make_covidx(tmp_path / "covidx")
    for i in range(broken):
        (root / "train" / f"train_{i}.png").write_bytes(b"broken")
    return COVIDxDataModule(str(root), image_size=32, **kwargs)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_counted_once_over_epochs_and_workers_and_batches_keep_their_size(
        tmp_path: Path, workers: int, caplog: pytest.LogCaptureFixture) -> None:
    dm = _covidx(tmp_path, broken=3, batch_size=7, num_workers=workers)  # 7 train samples, 3 unreadable
    caplog.set_level(logging.WARNING)
    sizes = [len(b["meta"]) for _ in range(3) for b in dm.train_dataloader()]
    assert sizes == [7] * 3  # skipped samples are replaced, never a short batch
    assert dm.skip_report() == {"train+aug": 3}  # counted once, not once per epoch or per worker
    if workers == 0:  # worker processes log to their own stderr
        assert len([r for r in caplog.records if "skipped sample" in r.getMessage()]) == 3


def test_nothing_readable_stops_within_one_epoch_naming_count_and_first_errors(tmp_path: Path) -> None:
    dm = _covidx(tmp_path, broken=10, batch_size=4)
    with pytest.raises(DataError, match=r"4 of 7 samples are unreadable.*max_skip_fraction=0.5.*first errors: .*train_\d\.png"):
        next(iter(dm.train_dataloader()))
    lenient = _covidx(tmp_path / "b", broken=10, batch_size=4, max_skip_fraction=1.0)
    with pytest.raises(DataError, match=r"none of the 7 samples is readable.*first errors: .*train_\d\.png"):
        next(iter(lenient.train_dataloader()))


def test_skip_share_above_the_limit_stops(tmp_path: Path) -> None:
    dm = _covidx(tmp_path, broken=4, batch_size=3, max_skip_fraction=0.3)  # 4 of the 7 train samples
    with pytest.raises(DataError, match="3 of 7 samples are unreadable, more than max_skip_fraction=0.3"):
        list(dm.train_dataloader())
    with pytest.raises(ValueError, match="max_skip_fraction"):
        _covidx(tmp_path / "b", broken=0, max_skip_fraction=1.5)


def test_skips_on_one_rank_do_not_shrink_that_rank(tmp_path: Path) -> None:
    """What Lightning builds under DDP (a DistributedSampler over the loader's dataset): every bad sample
    falls on rank 0, yet both ranks see the same number of equally sized batches."""
    def load(r: dict[str, Any]) -> dict[str, Any]:
        if r["i"] in (0, 2, 4):
            raise DataError(f"img_{r['i']}.png: unreadable")
        return {"image": torch.full((1, 2, 2), float(r["i"]))}

    ds = ReplaceSkipped(RecordDataset([{"i": i} for i in range(12)], load, "skip", "toy/train"))
    per_rank = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        per_rank.append([b["image"].shape[0] for b in DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate)])
    assert per_rank[0] == per_rank[1] == [3, 3]
    assert ds.dataset.skipped == 3
