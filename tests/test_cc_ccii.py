"""CC-CCII (NCP / CP / Normal chest CT scans as slice folders) on fixtures in the CNCB release layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlp.datamodules.volume.cc_ccii import CCCCIIDataModule
from medvlp.datamodules.io.readers import DataError
from tests.fixtures import make_cc_ccii


def _dm(root, **kw):
    return CCCCIIDataModule(str(root), volume_size=(3, 16, 16), batch_size=2, **kw)


def test_cc_ccii_reads_slice_folders_as_volumes_in_numeric_slice_order_with_one_hot_labels(tmp_path) -> None:
    root = make_cc_ccii(tmp_path / "ccii")
    dm = _dm(root, val_fraction=0.0, test_fraction=0.0)
    recs = dm.records("train")
    assert len(recs) == 13 and dm.label_names == ["NCP", "CP", "Normal"]  # 12 patients, one with two scans
    by_id = {r["id"]: r for r in recs}
    assert by_id["NCP/1/1500"]["labels"].tolist() == [1, 0, 0] and by_id["Normal/203/3002"]["labels"].tolist() == [0, 0, 1]
    rec = by_id["CP/101/2000"]
    sample = dm.load(rec, augment=False)
    assert sample["image"].shape == (1, 3, 16, 16) and "text" not in sample
    grey = (sample["image"] * 0.25 + 0.5) * 255  # undo the window [0, 255] and the (x - 0.5) / 0.25 scaling
    # slices 1.png, 2.png, 10.png hold 40·rank + 10 (CP): numeric order, not name order (1, 10, 2)
    assert grey.mean(dim=(0, 2, 3)).tolist() == pytest.approx([10.0, 50.0, 90.0], abs=1e-3)
    assert torch.equal(sample["labels"], torch.tensor([0.0, 1.0, 0.0])) and sample["label_names"] == ["NCP", "CP", "Normal"]
    batch = next(iter(dm.eval_dataloader("train", 2)))
    assert batch["image"].shape == (2, 1, 3, 16, 16) and batch["labels"].shape == (2, 3)


def test_cc_ccii_walks_the_class_folders_without_the_table(tmp_path) -> None:
    root = make_cc_ccii(tmp_path / "ccii")
    (root / "unzip_filenames.csv").unlink()
    dm = _dm(root, val_fraction=0.0, test_fraction=0.0)
    assert sorted(r["id"] for r in dm.records("train")) == sorted(r["id"] for r in _dm(
        make_cc_ccii(tmp_path / "with_table"), val_fraction=0.0, test_fraction=0.0).records("train"))


def test_cc_ccii_split_is_by_patient_and_seeded(tmp_path) -> None:
    root = make_cc_ccii(tmp_path / "ccii", n_patients=8)
    dm = _dm(root, val_fraction=0.25, test_fraction=0.25, seed=3)
    splits = {s: dm.records(s) for s in ("train", "val", "test")}
    patients = {s: {r["patient"] for r in recs} for s, recs in splits.items()}
    assert all(patients.values()) and sum(len(r) for r in splits.values()) == 25
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    assert {r["id"] for r in splits["test"]} == {r["id"] for r in _dm(root, val_fraction=0.25, test_fraction=0.25,
                                                                    seed=3).records("test")}
    assert {r["id"] for r in splits["test"]} != {r["id"] for r in _dm(root, val_fraction=0.25, test_fraction=0.25,
                                                                    seed=4).records("test")}


def test_cc_ccii_counts_empty_and_missing_scans_and_rejects_unknown_classes(tmp_path) -> None:
    root = make_cc_ccii(tmp_path / "ccii")
    for f in (root / "Normal" / "201" / "3000").iterdir():
        f.unlink()  # a scan folder with no slice
    with open(root / "unzip_filenames.csv", "a") as fh:
        fh.write("NCP-13.zip,NCP,9,9999,40\n")  # a row whose zip was never extracted
    dm = _dm(root, val_fraction=0.0, test_fraction=0.0)
    ids = {r["id"] for r in dm.records("train")}
    assert len(ids) == 12 and "Normal/201/3000" not in ids
    assert dict(dm.index_skips) == {"empty_scan": 1, "missing_scan": 1}
    with open(root / "unzip_filenames.csv", "a") as fh:
        fh.write("COVID-1.zip,COVID,10,10000,3\n")
    with pytest.raises(DataError, match=r"unzip_filenames.csv: row 16: label 'COVID' is not one of NCP, CP, Normal"):
        _dm(root).records("train")


def test_cc_ccii_unreadable_slice_is_an_error_naming_the_file(tmp_path) -> None:
    root = make_cc_ccii(tmp_path / "ccii")
    bad = root / "CP" / "101" / "2000" / "2.png"
    bad.write_bytes(b"not a png")
    dm = _dm(root, val_fraction=0.0, test_fraction=0.0, on_error="fail")
    rec = next(r for r in dm.records("train") if r["id"] == "CP/101/2000")
    with pytest.raises(DataError, match=r"CP/101/2000/2\.png: cannot read slice"):
        dm.load(rec, augment=False)
    ds = dm.build_dataset("train", augment=False)
    i = next(k for k, r in enumerate(ds.records) if r["id"] == "CP/101/2000")
    with pytest.raises(DataError, match=r"2\.png: cannot read slice"):
        ds[i]
    assert np.isfinite(dm.load(dm.records("train")[0], augment=False)["image"].numpy()).all()


def test_cc_ccii_scan_with_fewer_slices_than_n_slice_is_a_counted_skip_or_an_error(tmp_path) -> None:
    """A partly extracted zip leaves a scan folder short of the table's ``n_slice``: never a silently shorter volume."""
    root = make_cc_ccii(tmp_path / "ccii")
    (root / "NCP" / "2" / "1001" / "10.png").unlink()
    dm = _dm(root, val_fraction=0.0, test_fraction=0.0)
    assert "NCP/2/1001" not in {r["id"] for r in dm.records("train")} and dm.index_skips["incomplete_scan"] == 1
    with pytest.raises(DataError, match=r"row 4: n_slice is 3 but .*NCP/2/1001 holds 2 slice images"):
        _dm(root, incomplete_scan="fail").records("train")
    kept = {r["id"] for r in _dm(root, incomplete_scan="keep", val_fraction=0.0, test_fraction=0.0).records("train")}
    assert "NCP/2/1001" in kept
