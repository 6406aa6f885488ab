"""``data=csv`` (bring your own dataset): a 2D image+report manifest and a 3D volume+label manifest
pretrain and benchmark through the CLI with no code; bad manifests fail or skip under the policy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medvlp.cli import main
from medvlp.datamodules.io.csv_manifest import CSVDataModule
from medvlp.datamodules.io.readers import DataError

FINDINGS = ("Effusion", "Nodule")


def make_2d_fixture(folder: Path, n: int = 40) -> Path:
    """PNG images (a bright disc for Effusion, a dot for Nodule) with reports, labels and splits."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    yy, xx = np.mgrid[:48, :40]
    for i in range(n):
        eff, nod = i % 2, (i // 2) % 2
        img = rng.normal(60, 10, (48, 40))
        if eff:
            img[(yy - 30) ** 2 + (xx - 20) ** 2 < 100] += 120
        if nod:
            img[(yy - 12) ** 2 + (xx - 28) ** 2 < 9] += 150
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / "images" / f"{i}.png")
        words = [f for f, v in zip(("pleural effusion", "a small nodule"), (eff, nod)) if v]
        report = f"There is {' and '.join(words)}." if words else "The lungs are clear."
        split = "train" if i < 24 else ("val" if i < 28 else "test")
        rows.append({"path": f"images/{i}.png", "findings_text": report, "Effusion": eff, "Nodule": nod, "split": split})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def make_3d_fixture(folder: Path, n: int = 24) -> Path:
    """NIfTI volumes with a binary label (a bright blob or not), no reports."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    (folder / "vols").mkdir(parents=True)
    rows = []
    for i in range(n):
        vol = rng.normal(0, 1, (16, 16, 8)).astype(np.float32)
        lesion = i % 2
        if lesion:
            vol[4:10, 4:10, 2:6] += 4
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(folder / "vols" / f"v{i}.nii.gz"))
        rows.append({"volume": f"vols/v{i}.nii.gz", "Lesion": lesion, "split": "train" if i < 14 else ("val" if i < 16 else "test")})
    manifest = folder / "volumes.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


ARGS_2D = ["data.init_args.image_column=path", "data.init_args.text_column=findings_text",
           "data.init_args.label_columns=[Effusion,Nodule]", "data.init_args.image_size=32"]
ARGS_3D = ["data.init_args.image_column=volume", "data.init_args.text_column=null", "data.init_args.label_columns=[Lesion]",
           "data.init_args.spatial_dims=3", "data.init_args.volume_size=[8,16,16]"]


def _suite(path: Path, manifest: Path, args: list[str], out: Path, protocols: str) -> Path:
    init = ", ".join(f"{a.split('=', 1)[0].split('.')[-1]}: {a.split('=', 1)[1]}" for a in args)
    path.write_text(f"""preset: tiny
output: {out}
pretrain: {{trainer: {{max_steps: 3, enable_progress_bar: false}}}}
methods:
  clip: {{method: clip, data: {{name: csv, init_args: {{manifest: {manifest}, {init}}}}}}}
datasets:
  mine: {{name: csv, init_args: {{manifest: {manifest}, {init}, batch_size: 8}}}}
protocols: {protocols}
""")
    return path


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_manifest_pretrains_and_benchmarks_without_code(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    caplog.set_level(logging.INFO, logger="medvlp.progress")
    manifest = make_2d_fixture(tmp_path / "data") if kind == "2d" else make_3d_fixture(tmp_path / "data")
    args = ARGS_2D if kind == "2d" else ARGS_3D
    run = tmp_path / "run"
    assert main(["pretrain", "method=clip", "data=csv", f"data.init_args.manifest={manifest}", *args, "preset=tiny",
                 "trainer.max_steps=3", "trainer.enable_progress_bar=false", f"run.dir={run}"]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    protocols = "{zero_shot: {}, retrieval: {}, linear_probe: {}}" if kind == "2d" else "{zero_shot: {}, linear_probe: {}}"
    suite = _suite(tmp_path / "suite.yaml", manifest, args, tmp_path / "bench", protocols)
    assert main(["benchmark", f"suite={suite}"]) == 0
    df = pd.read_csv(tmp_path / "bench" / "results.csv")
    assert {"zero_shot", "linear_probe"} <= set(df["protocol"]) and df["value"].notna().all()
    assert df["dataset_version"].str.startswith("csv:").all()
    prov = json.loads(df["comparability"].iloc[0])["provenance"]  # every row records versions, host, device
    assert prov["versions"]["torch"] and prov["host"] and prov["device"].startswith("cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "medvlp.progress"]
    n = 3 if kind == "2d" else 2
    assert lines[-1].startswith(f"unit {n}/{n} (") and "elapsed" in lines[-1] and "ETA 0s" in lines[-1]


def test_index_split_labels_and_captions(tmp_path: Path) -> None:
    manifest = make_3d_fixture(tmp_path)
    dm = CSVDataModule(str(manifest), image_column="volume", text_column=None, label_columns=["Lesion"],
                       split_column=None, spatial_dims=3, val_fraction=0.2, test_fraction=0.3)
    recs = dm.index()
    assert {r["split"] for r in recs} == {"train", "val", "test"}  # hash split without a split column
    assert [r["split"] for r in recs] == [r["split"] for r in dm.index()]  # deterministic
    assert recs[1]["text"] == "Findings: lesion." and recs[0]["text"] == "No findings."
    assert dm.encoder_hints() == {"spatial_dims": [3], "img_size_3d": [32, 96, 96]}


def test_bad_manifests_name_file_row_and_column(tmp_path: Path) -> None:
    manifest = make_2d_fixture(tmp_path)
    df = pd.read_csv(manifest)
    kw = dict(image_column="path", text_column="findings_text", label_columns=["Effusion", "Nodule"], image_size=32)
    with pytest.raises(DataError, match=r"missing column\(s\) \['Nodul'\]"):
        CSVDataModule(str(manifest), **{**kw, "label_columns": ["Effusion", "Nodul"]}).index()
    bad = df.copy()
    bad.loc[3, "split"] = "training"
    bad.to_csv(tmp_path / "bad_split.csv", index=False)
    with pytest.raises(DataError, match=r"bad_split.csv row 5: split 'training'"):
        CSVDataModule(str(tmp_path / "bad_split.csv"), **kw).index()
    bad = df.copy()
    bad.loc[2, "Nodule"] = 7
    bad.to_csv(tmp_path / "bad_label.csv", index=False)
    with pytest.raises(DataError, match="unknown label value 7.0 in column 'Nodule'"):
        CSVDataModule(str(tmp_path / "bad_label.csv"), **kw).index()
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        CSVDataModule(str(tmp_path / "nope.csv"), **kw)
    # an empty report is skipped and counted at index time; a missing image file at load time
    gaps = df.copy()
    gaps.loc[0, "findings_text"] = ""
    gaps.loc[1, "path"] = "images/missing.png"
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    dm = CSVDataModule(str(tmp_path / "gaps.csv"), **kw)
    train = dm.dataset("train")
    assert len(train) == 23 and dm.index_skips["empty_report"] == 1
    assert sum(train[i] is None for i in range(len(train))) == 1
    assert dm.skip_report() == {"train+aug": 1, "index:empty_report": 1}
    with pytest.raises(DataError, match="row 2: empty 'findings_text'"):
        CSVDataModule(str(tmp_path / "gaps.csv"), on_error="fail", **kw).dataset("train")
