"""BIMCV-R loader over a fixture written in the published layout (``CT*/ct/*.nii.gz`` + ``BIMCV-R.csv`` with the
columns of ``BIMCV_meta.csv``, or MedFinder's ``meta/curated_ct_report_path_En.csv``) and its bad-input policy."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medvlp.cli import main
from medvlp.datamodules import BIMCVRDataModule
from medvlp.datamodules.volume.bimcv_r import bids_ids
from medvlp.datamodules.io.readers import DataError
from tests.fixtures import write_nii

META_COLUMNS = ["PatientID", "ReportID", "Report", "Labels", "Localizations", "LabelsLocalizationsBySentence",
                "labelCUIS", "LocalizationsCUIS", "num", "path", "Report_en", "ct_path"]
SOURCE = "/raid/BIMCV_CT/BIMCV-COVID19-cIter_1_2_3/covid19_posi"  # the kind of absolute path the table holds


def _volume(i: int) -> np.ndarray:
    hu = np.full((16, 16, 8), -1000.0, np.float32)
    hu[4:12, 4:12, 2:6] = 40.0 + i
    return hu


def _row(patient: str, session: str, name: str, report_es: str, report_en: str, labels: str) -> dict[str, str]:
    folder = f"{SOURCE}/{patient}/{session}/mod-rx"
    return {"PatientID": patient, "ReportID": session, "Report": report_es, "Labels": labels,
            "Localizations": "['loc lobar']", "LabelsLocalizationsBySentence": "[]", "labelCUIS": "[C0032285]",
            "LocalizationsCUIS": "[C0225752]", "num": "2.0", "path": folder, "Report_en": report_en,
            "ct_path": f"{folder}/{name}"}


def make_bimcv_r(root: Path, patients: int = 10) -> Path:
    """Volumes in ``CT1/ct`` and ``CT2/ct`` (BIDS names, some ``acq-`` reconstructions), ``BIMCV-R.csv`` with
    one row per volume plus four rows the loader must skip: a volume that is not on disk, a row whose
    PatientID/ReportID do not match its volume (the published table has such rows), an empty English report and
    a second row naming an already listed volume."""
    rows = []
    k = 0
    for p in range(patients):
        for s in range(1 + p % 2):  # odd patients have two studies
            patient, session = f"sub-S{1000 + p}", f"ses-E{2000 + 10 * p + s}"
            acq = "_acq-1" if s else ""
            name = f"{patient}_{session}{acq}_run-{s + 1}_bp-chest_ct.nii.gz"
            write_nii(root / f"CT{1 + k % 2}" / "ct" / name, _volume(k))
            labels = "['COVID 19', ' pneumonia']" if p % 3 == 0 else "['nodule', ' pleural effusion', '']"
            rows.append(_row(patient, session, name, f"tac toracico {k} . nodulo pulmonar .",
                             f"Thoracic CT {k}. Pulmonary nodule.", labels))
            k += 1
    rows.append(_row("sub-S9", "ses-E9", "sub-S9_ses-E9_run-1_bp-chest_ct.nii.gz", "no hay", "missing", "[]"))
    good = rows[0]
    rows.append({**good, "PatientID": "sub-S4242", "ReportID": "ses-E4242", "Report_en": "A chest X-ray report."})
    name = "sub-S7000_ses-E7000_run-1_bp-chest_ct.nii.gz"
    write_nii(root / "CT1" / "ct" / name, _volume(99))
    rows.append(_row("sub-S7000", "ses-E7000", name, "texto", "   ", "[]"))
    rows.append({**rows[1], "Report_en": "A second report of the same volume."})
    with open(root / "BIMCV-R.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, META_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def _all(dm: BIMCVRDataModule) -> list[dict]:
    return [r for s in ("train", "val", "test") for r in dm.records(s)]


def test_bids_ids_from_volume_names() -> None:
    assert bids_ids("sub-S09754_ses-E22857_acq-1_run-2_bp-chest_ct.nii.gz") == ("sub-S09754", "ses-E22857")
    assert bids_ids("volume_12.nii.gz") is None


def test_published_layout_reports_labels_skips_and_patient_split(tmp_path) -> None:
    dm = BIMCVRDataModule(str(make_bimcv_r(tmp_path / "bimcv")), volume_size=(8, 16, 16))
    recs = _all(dm)
    assert len(recs) == 15  # 10 patients, 5 with two studies; the four bad rows are counted, not loaded
    assert dict(dm.index_skips) == {"missing_volume": 1, "id_mismatch": 1, "empty_report": 1, "duplicate_row": 1}
    by_id = {r["id"]: r for r in recs}
    first = by_id["sub-S1000_ses-E2000_run-1_bp-chest_ct"]
    assert first["text"] == "Thoracic CT 0. Pulmonary nodule." and first["image"].parent.name == "ct"
    assert dm.label_names[:2] == ["ground glass pattern", "pneumonia"]
    names = dm.label_names
    assert first["labels"][names.index("covid 19")] == 1 and first["labels"][names.index("pneumonia")] == 1
    assert first["labels"][names.index("nodule")] == 0
    other = by_id["sub-S1001_ses-E2010_run-1_bp-chest_ct"]  # "' pleural effusion'" matches despite the space
    assert other["labels"][names.index("pleural effusion")] == 1 and other["labels"].sum() == 2
    split_of: dict[str, set[str]] = {}
    for r in recs:
        split_of.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())  # both studies of a patient stay in one split
    batch = next(iter(dm.eval_dataloader("train", 4)))
    assert batch["image"].shape[1:] == (1, 8, 16, 16) and batch["labels"].shape[1] == 10
    assert all(t.startswith("Thoracic CT") for t in batch["text"])


def test_spanish_reports_and_keep_mismatched_ids(tmp_path) -> None:
    root = make_bimcv_r(tmp_path / "bimcv")
    es = BIMCVRDataModule(str(root), language="es")
    texts = [r["text"] for r in _all(es)]
    # 15 Spanish reports, plus the row whose English translation is empty but whose Spanish original is not
    assert sum(t.startswith("tac toracico") for t in texts) == 15 and "texto" in texts and len(texts) == 16
    keep = BIMCVRDataModule(str(root), id_mismatch="keep")
    _all(keep)  # the mismatched row is no longer dropped for its ids; it names an indexed volume, so it is a duplicate
    assert dict(keep.index_skips) == {"missing_volume": 1, "empty_report": 1, "duplicate_row": 2}


def test_medfinder_table_and_row_order_split(tmp_path) -> None:
    """MedFinder's table: only ``path`` (the volume file) and ``Report_en``; no labels, no ids."""
    root = tmp_path / "bimcv"
    (root / "meta").mkdir(parents=True)
    lines = ["path,Report_en"]
    for i in range(10):
        name = f"sub-S{i}_ses-E{i}_run-1_bp-chest_ct.nii.gz"
        write_nii(root / f"CT{1 + i // 5}" / "ct" / name, _volume(i))
        lines.append(f"/h3cstore/CT_retrieval/CT{1 + i // 5}/ct/{name},Report {i}.")
    (root / "meta" / "curated_ct_report_path_En.csv").write_text("\n".join(lines) + "\n")
    dm = BIMCVRDataModule(str(root), split_convention="medfinder", volume_size=(8, 16, 16))
    assert [r["text"] for r in dm.records("train")] == [f"Report {i}." for i in range(7)]
    assert [r["text"] for r in dm.records("val")] == ["Report 7."]
    assert [r["text"] for r in dm.records("test")] == ["Report 8.", "Report 9."]
    assert dm.label_names == [] and "labels" not in dm.records("train")[0]
    batch = next(iter(dm.eval_dataloader("test", 2)))
    assert batch["image"].shape == (2, 1, 8, 16, 16) and "labels" not in batch


def _rewrite(root: Path, column: str, value: str, row: int = 0) -> None:
    path = root / "BIMCV-R.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[row][column] = value
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, META_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_bad_input_errors_name_file_and_row(tmp_path) -> None:
    root = make_bimcv_r(tmp_path / "bimcv")
    with pytest.raises(DataError, match=r"row 17: volume sub-S9_ses-E9_run-1_bp-chest_ct.nii.gz not found"):
        BIMCVRDataModule(str(root), missing_volume="fail").records("train")
    with pytest.raises(DataError, match=r"row 18: PatientID/ReportID sub-S4242/ses-E4242 do not match"):
        BIMCVRDataModule(str(root), id_mismatch="fail").records("train")
    _rewrite(root, "Labels", "['nodule'")
    with pytest.raises(DataError, match=r"BIMCV-R.csv: row 2: Labels is not a list literal"):
        BIMCVRDataModule(str(root)).records("train")
    _rewrite(root, "Labels", "[]")
    _rewrite(root, "ct_path", f"{SOURCE}/sub-S1000/ses-E2000/mod-rx")
    with pytest.raises(DataError, match=r"row 2: column 'ct_path' must name a .nii/.nii.gz volume"):
        BIMCVRDataModule(str(root)).records("train")


def test_duplicate_volume_names_and_missing_table(tmp_path) -> None:
    root = make_bimcv_r(tmp_path / "bimcv")
    name = "sub-S1000_ses-E2000_run-1_bp-chest_ct.nii.gz"
    write_nii(root / "CT2" / "ct" / name, _volume(0))
    with pytest.raises(DataError, match=f"volume name {name} occurs twice"):
        BIMCVRDataModule(str(root)).records("train")
    (root / "BIMCV-R.csv").unlink()
    with pytest.raises(DataError, match=r"no BIMCV-R report table \(looked for BIMCV-R.csv"):
        BIMCVRDataModule(str(root)).records("train")
    with pytest.raises(DataError, match="file not found"):
        BIMCVRDataModule(str(root), reports_csv="meta/missing.csv").records("train")


def test_pretrain_cli_runs_a_step_on_bimcv_r(tmp_path) -> None:
    root = make_bimcv_r(tmp_path / "data")
    args = ["pretrain", "method=clip", "data=bimcv_r", "preset=tiny", f"data.init_args.root={root}",
            "data.init_args.volume_size=[8,16,16]", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
            f"run.dir={tmp_path / 'run'}", "data.init_args.batch_size=2"]
    assert main(args) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
