"""Loaders over fixtures written in the exact published layouts, real label/report files shipped by
registry wheels (read from site-packages), and bad-input behaviour."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medvlp.cli import main
from medvlp.datamodules import (
    BraTSDataModule, BTCVDataModule, CheXpertDataModule, COVIDxDataModule, CREMIDataModule, CTRATEDataModule,
    LucchiDataModule, MIMICCXRDataModule, MSDDataModule, RSNAPneumoniaDataModule, SIIMDataModule, SNEMIDataModule,
)
from medvlp.datamodules.io.readers import DataError, read_image_2d, read_volume, rle_decode_siim
from medvlp.datamodules.tabular import apply_uncertainty
from medvlp.datamodules.xray.chest import chexpert_5x200, read_openi_reports
from tests import fixtures as fx


def _txv(name: str) -> Path:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None:
        pytest.skip("torchxrayvision wheel not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def _batch(dm, split="train"):
    return next(iter(dm.eval_dataloader(split, 4)))


# ------------------------------------------------------------------------------ X-ray
def test_mimic_layout_views_sections_and_empty_report_policy(tmp_path) -> None:
    root = fx.make_mimic(tmp_path / "mimic")
    dm = MIMICCXRDataModule(str(root), image_size=32)
    train = dm.records("train")
    assert dm.index_skips["no_sections"] == 1  # study 0: FINDINGS header with no text
    all_ids = {r["id"] for s in ("train", "val", "test") for r in dm.records(s)}
    assert len(all_ids) == 6  # 8 images − 1 lateral − 1 empty report
    b = _batch(dm)
    assert b["image"].shape[1:] == (1, 32, 32) and b["labels"].shape[1] == 14
    assert all("effusion" in t.lower() for t in b["text"])
    assert b["sections"]["impression"][0] == "Effusion."
    with pytest.raises(DataError, match="empty or missing FINDINGS/IMPRESSION"):
        MIMICCXRDataModule(str(root), empty_report="fail").records("train")
    assert train and not np.isnan(train[0]["labels"]).any()


def test_chexpert_layout_and_uncertainty_policies(tmp_path) -> None:
    root = fx.make_chexpert(tmp_path)
    dm = CheXpertDataModule(str(root), image_size=32, val_size=2)
    assert len(dm.records("val")) == 2 and len(dm.records("test")) == 4
    b = _batch(dm)
    assert b["labels"].shape == (4, 5)
    vals = np.array([[1, -1, np.nan, 0, -1]], float)
    names = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert apply_uncertainty(vals, names, "ones").tolist() == [[1, 1, 0, 0, 1]]
    assert apply_uncertainty(vals, names, "zeros").tolist() == [[1, 0, 0, 0, 0]]
    assert apply_uncertainty(vals, names, "mgca").tolist() == [[1, 0, 0, 0, 1]]
    assert np.isnan(apply_uncertainty(vals, names, "ignore")[0, 1])
    with pytest.raises(DataError, match="unknown label value 2.0 in column 'Edema'"):
        apply_uncertainty(np.array([[1, 0, 0, 2, 0]], float), names, "ones", where="x.csv")


def test_real_chexpert_csv_and_5x200_pools() -> None:
    df = pd.read_csv(_txv("chexpert_train.csv.gz"))
    assert len(df) == 223414 and (df["Frontal/Lateral"] == "Frontal").sum() == 191027
    sel = chexpert_5x200(df)
    assert len(sel) == 1000 and sel["5x200_class"].value_counts().eq(200).all()
    assert sel["Path"].is_unique


def test_chexpert_mgca_split_on_the_real_csv(tmp_path) -> None:
    real = _txv("chexpert_train.csv.gz")
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    (root / "train.csv.gz").symlink_to(real)
    (root / "valid.csv").write_text("Path,Frontal/Lateral," + ",".join(fx.LABELS14[:0] + ["Atelectasis", "Cardiomegaly",
                                    "Consolidation", "Edema", "Pleural Effusion"]) + "\n")
    dm = CheXpertDataModule(str(root), split_convention="mgca")
    val = {r["id"] for r in dm.records("val")}
    train = {r["id"] for r in dm.records("train")}
    five = set(chexpert_5x200(pd.read_csv(real))["Path"])
    assert 4000 < len(val) <= 5000 and not (val & train) and not (five & (val | train))
    assert val == {r["id"] for r in CheXpertDataModule(str(root), split_convention="mgca").records("val")}


def test_chexpert_5x200_test_set_and_packaged_prompts(tmp_path) -> None:
    from medvlp.benchmarks.protocols.linear_probe import is_one_hot

    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    (root / "train.csv.gz").symlink_to(_txv("chexpert_train.csv.gz"))
    (root / "valid.csv").write_text("Path,Frontal/Lateral,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion\n")
    dm = CheXpertDataModule(str(root), test_set="5x200")
    test = dm.records("test")
    labels = np.stack([r["labels"] for r in test])
    assert len(test) == 1000 and is_one_hot(labels) and labels.sum(0).tolist() == [200.0] * 5
    assert not {r["id"] for r in test} & {r["id"] for s in ("train", "val") for r in dm.records(s)}
    assert dm.class_prompts()["Edema"][0] == "There is pulmonary edema."
    assert dm.negative_prompts()["Cardiomegaly"] == ["The heart size is normal.", "No cardiomegaly."]


def test_mgca_split_conventions_covidx_siim(tmp_path) -> None:
    cov = COVIDxDataModule(str(fx.make_covidx(tmp_path / "covidx")), split_convention="mgca")
    assert len(cov.records("val")) == 2 and len(cov.records("train")) == 8  # 80/20 of 10 rows
    siim = SIIMDataModule(str(fx.make_siim(tmp_path / "siim")), split_convention="mgca")
    sizes = {s: len(siim.records(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 8 and sizes["train"] >= 5


def test_real_chest_radiograph_from_pydicom_data() -> None:
    if importlib.util.find_spec("data_store") is None and importlib.util.find_spec("pydicom_data") is None:
        pytest.skip("pydicom-data wheel not installed")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        pytest.skip("RG1_UNCI.dcm not available offline")
    import pydicom

    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img = read_image_2d(path)
    raw = ds.pixel_array.astype(float)
    assert img.shape == raw.shape and 0.0 <= img.min() and img.max() <= 1.0
    assert np.corrcoef(img[::8, ::8].ravel(), raw[::8, ::8].ravel())[0, 1] < -0.99  # inverted for display


def test_rsna_boxes_to_masks_monochrome1_and_real_label_file(tmp_path) -> None:
    root = fx.make_rsna(tmp_path / "rsna")
    dm = RSNAPneumoniaDataModule(str(root), image_size=32)
    recs = {r["id"]: r for s in ("train", "val", "test") for r in dm.records(s)}
    pos = recs["rsna-0001"]
    assert pos["labels"].tolist() == [1.0] and len(pos["boxes"]) == 2
    sample = dm.load(pos, augment=False)
    assert sample["mask"].sum() == 8 * 8 + 6 * 10  # boxes rasterised at native 32x32
    raw = read_image_2d(root / "stage_2_train_images" / "rsna-0000.dcm")
    import pydicom

    px = pydicom.dcmread(root / "stage_2_train_images" / "rsna-0000.dcm").pixel_array.astype(float)
    assert np.corrcoef(raw.ravel(), px.ravel())[0, 1] < -0.99  # MONOCHROME1 inverted
    real = pd.read_csv(_txv("kaggle_stage_2_train_labels.csv.zip"))
    assert len(real) == 30227 and real["patientId"].nunique() == 26684
    assert real.groupby("patientId")["Target"].max().sum() == 6012


def test_siim_rle_fixture_and_real_rle_file(tmp_path) -> None:
    root = fx.make_siim(tmp_path / "siim")
    dm = SIIMDataModule(str(root), image_size=32)
    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    pos = next(r for r in recs if r["labels"][0] == 1)
    assert dm.load(pos, False)["mask"].sum() == 8  # runs of 5 and 3 pixels
    m = rle_decode_siim("2 3 4 1", 4, 4)
    assert m[:, 0].tolist() == [0, 0, 1, 1] and m[:, 1].tolist() == [1, 0, 0, 0] and m.sum() == 4
    real = pd.read_csv(_txv("siim-pneumothorax-train-rle.csv.gz"))
    real.columns = [c.strip() for c in real.columns]
    assert len(real) == 12954 and real["ImageId"].nunique() == 12047
    enc = real["EncodedPixels"].str.strip()
    assert real.loc[enc != "-1", "ImageId"].nunique() == 2669
    for rle in enc[enc != "-1"].head(50):
        assert rle_decode_siim(rle).sum() > 0
    for bad in ("1 2 3", "5 -1", "1048570 100"):
        with pytest.raises(DataError):
            rle_decode_siim(bad)


def test_covidx_lists(tmp_path) -> None:
    dm = COVIDxDataModule(str(fx.make_covidx(tmp_path / "covidx")), image_size=32)
    assert len(dm.records("test")) == 4
    b = _batch(dm, "test")
    assert b["labels"].sum(1).tolist() == [1, 1, 1, 1]
    (tmp_path / "covidx" / "test_COVIDx9A.txt").write_text("only_two fields\n")
    with pytest.raises(DataError, match="line 1"):
        COVIDxDataModule(str(tmp_path / "covidx")).records("test")


def test_real_openi_reports() -> None:
    df = read_openi_reports(_txv("NLMCXR_reports.tgz"))
    assert len(df) == 3955
    assert ((df["findings"] != "") & (df["impression"] != "")).sum() == 3419


# ------------------------------------------------------------------------------ CT / MRI / EM
def test_ct_rate_reports_labels_and_double_rescale_trap(tmp_path) -> None:
    dm = CTRATEDataModule(str(fx.make_ct_rate(tmp_path / "ctrate")), volume_size=(8, 16, 16), window=(-1000, 1000))
    recs = dm.records("train") + dm.records("val")
    assert len(recs) == 6 and len(dm.records("test")) == 2
    assert all("Not given" not in r["text"] for r in recs)
    b = _batch(dm, "test")
    assert b["image"].shape == (2, 1, 8, 16, 16) and b["labels"].shape == (2, 18)
    # the stored-raw volume (+1024) and the already-HU volume must end identical after rescaling
    ds = dm.dataset("test", augment=False)
    assert torch.allclose(ds[0]["image"], ds[1]["image"], atol=1e-4)


def test_msd_dataset_json_filters_appledouble(tmp_path) -> None:
    dm = MSDDataModule(str(fx.make_msd(tmp_path / "Task03_Liver")), volume_size=(8, 16, 16))
    ids = [r["id"] for s in ("train", "val", "test") for r in dm.records(s)]
    assert len(ids) == 6 and not any(i.startswith("._") for i in ids)
    assert dm.segmentation_classes() == ["background", "liver"] and dm.window == (-175.0, 250.0)
    b = _batch(dm)
    assert b["mask"].shape[1:] == (1, 8, 16, 16) and set(b["mask"].unique().tolist()) <= {0, 1}


def test_btcv_rawdata_layout(tmp_path) -> None:
    dm = BTCVDataModule(str(fx.make_btcv(tmp_path / "btcv")), volume_size=(8, 16, 16))
    b = _batch(dm)
    assert set(b["mask"].unique().tolist()) <= {0, 1, 6}


def test_brats_both_namings_and_et_remap(tmp_path) -> None:
    dm = BraTSDataModule(str(fx.make_brats(tmp_path / "brats")), sequences=["flair", "t1ce"], volume_size=(8, 16, 16))
    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    assert {r["year"] for r in recs} == {2021, 2023} and all(len(r["image"]) == 2 for r in recs)
    ds = dm.dataset(recs[0]["split"], augment=False)
    s = ds[0]
    assert s["image"].shape[0] == 2 and 3 in s["mask"].unique().tolist() and 4 not in s["mask"].unique().tolist()
    assert s["labels"].tolist() == [0.0, 1.0, 1.0]


def test_em_loaders(tmp_path) -> None:
    cremi = CREMIDataModule(str(fx.make_cremi(tmp_path / "cremi")), samples=["A", "B"], volume_size=(4, 16, 16))
    b = _batch(cremi)
    assert b["image"].shape[1:] == (1, 4, 16, 16) and "instances" in b and b["mask"].sum() > 0
    snemi = SNEMIDataModule(str(fx.make_snemi(tmp_path / "snemi")), volume_size=(4, 16, 16))
    assert set(_batch(snemi)["instances"].unique().tolist()) <= {1, 7}
    lucchi = LucchiDataModule(str(fx.make_lucchi(tmp_path / "lucchi")), volume_size=(4, 16, 16))
    assert len(lucchi.records("test")) > 0 and set(_batch(lucchi, "test")["mask"].unique().tolist()) <= {0, 1}


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_file(tmp_path) -> None:
    with pytest.raises(DataError, match="missing.jpg: file not found"):
        read_image_2d(tmp_path / "missing.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="corrupt.jpg: cannot decode"):
        read_image_2d(corrupt)
    vol = np.zeros((4, 4, 4), np.float32)
    vol[1, 1, 1] = np.nan
    fx.write_nii(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(DataError, match="nan.nii.gz: 1 NaN/Inf"):
        read_volume(tmp_path / "nan.nii.gz")
    assert np.isfinite(read_volume(tmp_path / "nan.nii.gz", nonfinite="zero")[0]).all()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes((tmp_path / "nan.nii.gz").read_bytes()[:40])
    with pytest.raises(DataError, match="trunc.nii.gz"):
        read_volume(trunc)


def test_corrupt_sample_is_skipped_and_counted_or_fails(tmp_path) -> None:
    root = fx.make_covidx(tmp_path / "covidx")
    (root / "train" / "train_0.png").write_bytes(b"broken")
    dm = COVIDxDataModule(str(root), image_size=32, batch_size=16)
    ds = dm.dataset("train", augment=False)
    batches = [b for b in dm.eval_dataloader("train", 16) if b is not None]
    assert sum(len(b["meta"]) for b in batches) == len(dm.records("train")) - 1
    assert ds.skipped == 1
    strict = COVIDxDataModule(str(root), image_size=32, on_error="fail")
    with pytest.raises(DataError, match="train_0.png"):
        list(strict.eval_dataloader("train", 16))


def test_non_utf8_report_truncated_csv_duplicate_ids_and_skip_report(tmp_path) -> None:
    root = fx.make_mimic(tmp_path / "mimic")
    report = next((root / "files").rglob("s50414268.txt"))
    report.write_bytes(b"FINDINGS: caf\xe9 \xff\xfe broken")
    next((root / "files").rglob("s50414267.txt")).write_text("FINDINGS: Clear lungs.\n")  # only one bad report
    with pytest.raises(DataError, match="s50414268.txt: report is not UTF-8"):
        MIMICCXRDataModule(str(root), empty_report="fail").records("train")
    skipping = MIMICCXRDataModule(str(root))  # default skip: a per-study skip, counted by reason
    skipping.records("train")
    assert skipping.index_skips["decode"] == 1
    csv = root / "mimic-cxr-2.0.0-split.csv.gz"
    csv.write_bytes(csv.read_bytes()[:20])  # truncated gzip
    with pytest.raises(DataError, match="mimic-cxr-2.0.0-split.csv.gz: cannot parse CSV"):
        MIMICCXRDataModule(str(root)).records("train")
    cov = fx.make_covidx(tmp_path / "covidx")
    lines = (cov / "train_COVIDx9A.txt").read_text().splitlines()
    (cov / "train_COVIDx9A.txt").write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(DataError, match="duplicate sample ids"):
        COVIDxDataModule(str(cov)).records("train")
    (cov / "train_COVIDx9A.txt").write_text("\n".join(lines) + "\n")
    dm = COVIDxDataModule(str(cov), image_size=32)
    Path(dm.records("train")[0]["path"]).write_bytes(b"not a png")
    list(dm.eval_dataloader("train", 4))
    assert dm.skip_report() == {"train": 1}


def test_missing_columns_and_duplicate_ids(tmp_path) -> None:
    root = fx.make_rsna(tmp_path / "rsna")
    (root / "stage_2_train_labels.csv").write_text("patientId,x,y\n1,2,3\n")
    with pytest.raises(DataError, match="missing columns"):
        RSNAPneumoniaDataModule(str(root)).records("train")
    (root / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\na,1,1,1,1,3\n")
    with pytest.raises(DataError, match="row 2: Target must be 0 or 1"):
        RSNAPneumoniaDataModule(str(root)).records("train")


# ------------------------------------------------------------------------------ CLI acceptance
CASES = {
    "mimic_cxr": ("clip", fx.make_mimic, {"image_size": 32}),
    "chexpert": ("umcl", fx.make_chexpert, {"image_size": 32, "val_size": 2}),
    "rsna_pneumonia": ("umcl", fx.make_rsna, {"image_size": 32}),
    "siim_pneumothorax": ("umcl", fx.make_siim, {"image_size": 32}),
    "covidx": ("umcl", fx.make_covidx, {"image_size": 32}),
    "ct_rate": ("clip", fx.make_ct_rate, {"volume_size": "[8,16,16]"}),
    "msd": ("gtgm", fx.make_msd, {"volume_size": "[8,16,16]"}),
    "btcv": ("gtgm", fx.make_btcv, {"volume_size": "[8,16,16]"}),
    "brats": ("gtgm", fx.make_brats, {"volume_size": "[8,16,16]"}),
    "cremi": ("gtgm", fx.make_cremi, {"volume_size": "[4,16,16]", "samples": "[A,B]"}),
    "snemi": ("gtgm", fx.make_snemi, {"volume_size": "[4,16,16]"}),
    "lucchi": ("gtgm", fx.make_lucchi, {"volume_size": "[4,16,16]"}),
}


@pytest.mark.parametrize("data", sorted(CASES))
def test_pretrain_cli_runs_a_step_on_each_fixture(data: str, tmp_path: Path) -> None:
    method, make, extra = CASES[data]
    root = make(tmp_path / "data")
    if data == "chexpert":
        root = tmp_path / "data" / "CheXpert-v1.0-small"
    args = ["pretrain", f"method={method}", f"data={data}", "preset=tiny", f"data.init_args.root={root}",
            "trainer.max_steps=1", "trainer.enable_progress_bar=false", f"run.dir={tmp_path / 'run'}",
            "data.init_args.batch_size=2"]
    args += [f"data.init_args.{k}={v}" for k, v in extra.items()]
    if method == "gtgm":
        args.append("data.init_args.captions.type=template")
    assert main(args) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_chexpert_pretraining_splits_exclude_5x200_by_default(tmp_path) -> None:
    """5x200 is drawn from train.csv: the default hash split must keep those images out of train/val."""
    real = _txv("chexpert_train.csv.gz")
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    (root / "train.csv.gz").symlink_to(real)
    (root / "valid.csv").write_text("Path,Frontal/Lateral,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion\n")
    five = set(chexpert_5x200(pd.read_csv(real))["Path"])
    dm = CheXpertDataModule(str(root))
    used = {r["id"] for s in ("train", "val") for r in dm.records(s)}
    assert used and not five & used  # before exclude_test_ids all 1000 were in train/val
