"""Messy real-world files: MIMIC-CXR report variants, enum typos, 4D volumes, NaNs, full disks, scale."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp.datamodules import MIMICCXRDataModule, MSDDataModule
from medvlp.datamodules.io.readers import DataError
from medvlp.datamodules.tabular import duplicate_ids
from medvlp.reports import parse_sections
from tests import fixtures as fx

# (report text, expected findings, expected impression); None = section absent
REPORT_VARIANTS: list[tuple[str, str | None, str | None]] = [
    ("FINAL REPORT\n EXAMINATION: CHEST\n \n FINDINGS: Small left effusion.\n \n IMPRESSION: Effusion.\n",
     "Small left effusion.", "Effusion."),
    ("Findings: Lungs are clear.\nImpression: Normal.\n", "Lungs are clear.", "Normal."),  # mixed case
    ("FINDINGS:No pneumothorax.\nIMPRESSION:No acute process.\n", "No pneumothorax.", "No acute process."),  # no space
    ("FINDINGS:\n LUNGS: Clear.\n HEART: Mildly enlarged.\n PLEURA: No effusion.\n \n IMPRESSION: Cardiomegaly.\n",
     "LUNGS: Clear. HEART: Mildly enlarged. PLEURA: No effusion.", "Cardiomegaly."),  # sub-headers stay
    ("FINDINGS AND IMPRESSION: Right lower lobe opacity.\n", "Right lower lobe opacity.", "Right lower lobe opacity."),
    ("FINDINGS: Lines and tubes in place.\n IMPRESSION: Stable.\n ADDENDUM: Findings called to Dr. X.\n",
     "Lines and tubes in place.", "Stable. Findings called to Dr. X."),  # addendum appended to impression
    ("Portable chest radiograph.\n\nThe lungs are clear without consolidation.\n", None,
     "The lungs are clear without consolidation."),  # no headers: last paragraph (official parser rule)
    ("INDICATION: Cough.\n CONCLUSION: No pneumonia.\n", None, "No pneumonia."),  # alias
    ("WET READ: JXK 3:15 PM no ptx\n FINDINGS: No pneumothorax.\n", "No pneumothorax.", None),
]


@pytest.mark.parametrize("text, findings, impression", REPORT_VARIANTS)
def test_mimic_section_variants(text: str, findings: str | None, impression: str | None) -> None:
    s = parse_sections(text)
    assert s.get("findings") == findings
    assert s.get("impression") == impression


def test_addendum_policies_and_choice_errors() -> None:
    text = "IMPRESSION: Stable.\nADDENDUM: Called.\n"
    assert parse_sections(text, addendum="separate") == {"impression": "Stable.", "addendum": "Called."}
    assert parse_sections(text, addendum="drop") == {"impression": "Stable."}
    with pytest.raises(ValueError, match="addendum must be one of"):
        parse_sections(text, addendum="append")


def _mimic_with_variants(root: Path) -> Path:
    """The MIMIC fixture (8 images, 7 frontal studies) with reports replaced by real-world variants."""
    fx.make_mimic(root, n=16)
    reports = sorted((root / "files").rglob("s*.txt"))
    for report, (text, _, _) in zip(reports, REPORT_VARIANTS):
        report.write_text(text)
    rest = reports[len(REPORT_VARIANTS):]
    rest[0].write_bytes(b"FINDINGS: caf\xe9 \xff broken")  # not UTF-8
    rest[1].write_text("   \n")  # empty file
    rest[2].write_text("FINAL REPORT\n EXAMINATION: CHEST\n \n FINDINGS: \n")  # headers, no text
    rest[3].unlink()  # missing
    return root


def test_mimic_datamodule_keeps_every_readable_study_and_counts_reasons(tmp_path: Path) -> None:
    root = _mimic_with_variants(tmp_path / "mimic")
    dm = MIMICCXRDataModule(str(root), image_size=32)
    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    # 16 images: one lateral; 9 variant studies all readable; 4 broken ones skipped, one reason each
    assert dict(dm.index_skips) == {"decode": 1, "empty_file": 1, "no_sections": 1, "missing_file": 1}
    assert len(recs) == 16 - 1 - 4
    by_text = {r["text"] for r in recs}
    assert "Cardiomegaly. LUNGS: Clear. HEART: Mildly enlarged. PLEURA: No effusion." in by_text
    assert "Stable. Findings called to Dr. X. Lines and tubes in place." in by_text
    assert "The lungs are clear without consolidation." in by_text


def test_enum_like_arguments_fail_in_the_constructor(tmp_path: Path) -> None:
    root = fx.make_mimic(tmp_path / "mimic")
    with pytest.raises(ValueError, match=r"empty_report must be one of \['skip', 'fail'\], got 'fial' "
                                         r"\(did you mean 'fail'\?\)"):
        MIMICCXRDataModule(str(root), empty_report="fial")
    for kwargs, arg in (({"uncertainty": "zero"}, "uncertainty"), ({"on_error": "skipp"}, "on_error"),
                        ({"addendum": "x"}, "addendum"), ({"label_source": "chexbert"}, "label_source"),
                        ({"text_sections": ["impresion"]}, "text_sections")):
        with pytest.raises(ValueError, match=f"{arg} must be one of"):
            MIMICCXRDataModule(str(root), **kwargs)
    msd = fx.make_msd(tmp_path / "msd")
    for kwargs, arg in (({"nonfinite": "zeros"}, "nonfinite"), ({"cache": "ram"}, "cache"),
                        ({"resize": "crop"}, "resize"), ({"channels": "first"}, "channels")):
        with pytest.raises(ValueError, match=f"{arg} must be one of"):
            MSDDataModule(str(msd), **kwargs)


def _msd_4d(root: Path) -> Path:
    fx.make_msd(root)
    img = np.random.default_rng(0).normal(0, 1, (20, 20, 10, 2)).astype(np.float32)
    for p in (root / "imagesTr").glob("liver_*.nii.gz"):
        fx.write_nii(p, img)
    return root


def test_4d_volume_needs_an_explicit_channel_selection(tmp_path: Path) -> None:
    root = _msd_4d(tmp_path / "msd")  # dataset.json says one modality, the files are 4D
    dm = MSDDataModule(str(root), volume_size=(8, 16, 16), on_error="fail")
    with pytest.raises(DataError, match=r"liver_\d\.nii\.gz: 4D volume of shape \(20, 20, 10, 2\).*select channels"):
        next(iter(dm.eval_dataloader("train", 2)))
    two = MSDDataModule(str(root), volume_size=(8, 16, 16), on_error="fail", channels="all")
    assert next(iter(two.eval_dataloader("train", 2)))["image"].shape[1] == 2
    one = MSDDataModule(str(root), volume_size=(8, 16, 16), on_error="fail", channels=[1])
    assert next(iter(one.eval_dataloader("train", 2)))["image"].shape[1] == 1


def test_nonfinite_option_named_in_the_error_is_accepted(tmp_path: Path) -> None:
    root = fx.make_msd(tmp_path / "msd")
    img = np.zeros((20, 20, 10), np.float32)
    img[0, 0, 0] = np.nan
    for p in (root / "imagesTr").glob("liver_*.nii.gz"):
        fx.write_nii(p, img)
    with pytest.raises(DataError, match="set nonfinite='zero'"):
        next(iter(MSDDataModule(str(root), volume_size=(8, 16, 16), on_error="fail").eval_dataloader("train", 2)))
    batch = next(iter(MSDDataModule(str(root), volume_size=(8, 16, 16), on_error="fail",
                                    nonfinite="zero").eval_dataloader("train", 2)))
    assert torch.isfinite(batch["image"]).all()


def test_full_disk_keeps_the_previous_file_and_names_path_and_cause(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from medvlp import io

    target = tmp_path / "results.csv"
    io.atomic_write_text(target, "old")

    def no_space(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", no_space)
    with pytest.raises(io.WriteError) as info:
        io.atomic_write_text(target, "new")
    assert str(info.value) == f"cannot write {target}: no space left on device (the previous file, if any, is unchanged)"
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # temp file removed
    monkeypatch.undo()

    ckpt = tmp_path / "last.ckpt"
    io.atomic_torch_save({"w": torch.ones(1)}, ckpt)

    def denied(*_: object, **__: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(io.torch, "save", denied)
    with pytest.raises(io.WriteError, match="last.ckpt: permission denied"):
        io.atomic_torch_save({"w": torch.zeros(1)}, ckpt)
    assert torch.load(ckpt, weights_only=True)["w"].item() == 1.0


def test_checkpoint_write_failure_is_one_line_and_non_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from medvlp import io
    from medvlp.cli import main

    def no_space(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.torch, "save", no_space)
    code = main(["pretrain", "method=clip", "preset=tiny", "trainer.enable_progress_bar=false",
                 f"run.dir={tmp_path / 'run'}"])
    assert code != 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "last.ckpt: no space left on device" in err[0]


def test_duplicate_id_detection_is_linear() -> None:
    ids = [f"id{i}" for i in range(400_000)] + ["id7", "id123"]
    assert duplicate_ids(ids) == ["id123", "id7"]  # 400k ids: a quadratic count() loop would take minutes


def test_msd_4d_task_declared_in_dataset_json_keeps_all_channels(tmp_path: Path) -> None:
    root = _msd_4d(tmp_path / "msd")
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1w"}
    (root / "dataset.json").write_text(json.dumps(meta))
    dm = MSDDataModule(str(root), volume_size=(8, 16, 16), on_error="fail")
    assert next(iter(dm.eval_dataloader("train", 2)))["image"].shape[1] == 2
