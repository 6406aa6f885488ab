"""Writers of tiny datasets in the exact published on-disk layouts (generated in the test, never committed)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

RNG = np.random.default_rng(0)


def write_jpg(path: Path, size: int = 40, value: int | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = RNG.integers(0, 255, (size, size + 8)).astype(np.uint8) if value is None else np.full((size, size), value, np.uint8)
    Image.fromarray(arr).save(path)


def write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2") -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_nii(path: Path, arr: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))


def _gz_csv(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        fh.write(text)


LABELS14 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
            "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
            "Pneumothorax", "Support Devices"]


def make_mimic(root: Path, n: int = 8) -> Path:
    """MIMIC-CXR-JPG 2.0.0 layout + reports; study 0 has an empty report, one lateral view."""
    meta = ["dicom_id,subject_id,study_id,ViewPosition"]
    split = ["dicom_id,study_id,subject_id,split"]
    lab = ["subject_id,study_id," + ",".join(LABELS14)]
    for i in range(n):
        sid, study, dicom = 10000032 + i, 50414267 + i, f"{i:08x}-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"
        view = "LATERAL" if i == n - 1 else ("PA" if i % 2 else "AP")
        meta.append(f"{dicom},{sid},{study},{view}")
        split.append(f"{dicom},{study},{sid},{['train', 'train', 'validate', 'test'][i % 4]}")
        vals = ["1.0" if (i + k) % 5 == 0 else ("-1.0" if (i + k) % 7 == 0 else "") for k in range(14)]
        lab.append(f"{sid},{study}," + ",".join(vals))
        folder = root / "files" / f"p{str(sid)[:2]}" / f"p{sid}" / f"s{study}"
        write_jpg(folder / f"{dicom}.jpg")
        report = ("FINAL REPORT\n EXAMINATION: CHEST\n \n FINDINGS: \n" if i == 0 else
                  f"FINAL REPORT\n FINDINGS: There is a small right pleural effusion number {i}.\n \n IMPRESSION: Effusion.\n")
        folder.with_suffix(".txt").write_text(report)
    _gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", "\n".join(meta) + "\n")
    _gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", "\n".join(split) + "\n")
    _gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "\n".join(lab) + "\n")
    return root


def make_chexpert(parent: Path, n: int = 10) -> Path:
    root = parent / "CheXpert-v1.0-small"
    head = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(LABELS14)
    for name, count in (("train", n), ("valid", 4)):
        rows = [head]
        for i in range(count):
            rel = f"CheXpert-v1.0-small/{name}/patient{i:05d}/study1/view1_frontal.jpg"
            write_jpg(parent / rel)
            vals = ["1.0" if (i + k) % 3 == 0 else ("-1.0" if (i + k) % 4 == 0 else "0.0") for k in range(14)]
            rows.append(f"{rel},Female,50,Frontal,PA," + ",".join(vals))
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")
    return root


def make_rsna(root: Path, n: int = 8) -> Path:
    rows = ["patientId,x,y,width,height,Target"]
    for i in range(n):
        pid = f"rsna-{i:04d}"
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", RNG.integers(0, 4000, (32, 32)),
                    "MONOCHROME1" if i == 0 else "MONOCHROME2")
        if i % 2:
            rows += [f"{pid},4,4,8,8,1", f"{pid},16,16,6,10,1"]
        else:
            rows.append(f"{pid},,,,,0")
    (root / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def make_siim(root: Path, n: int = 8) -> Path:
    rows = ["ImageId, EncodedPixels"]
    for i in range(n):
        iid = f"1.2.276.0.7230010.3.1.4.{i}"
        write_dicom(root / "dicom-images-train" / f"study{i}" / f"series{i}" / f"{iid}.dcm", RNG.integers(0, 255, (32, 32)))
        rows.append(f"{iid}, 10 5 20 3" if i % 2 else f"{iid}, -1")
    (root / "train-rle.csv").write_text("\n".join(rows) + "\n")
    return root


def make_covidx(root: Path) -> Path:
    for split, n in (("train", 10), ("test", 4)):
        lines = []
        for i in range(n):
            name = f"{split}_{i}.png"
            write_jpg(root / split / name)
            lines.append(f"p{i} {name} {['normal', 'pneumonia', 'COVID-19'][i % 3]} src")
        (root / f"{split}_COVIDx9A.txt").write_text("\n".join(lines) + "\n")
    return root


def make_ct_rate(root: Path, n: int = 6) -> Path:
    from medvlp.datamodules.volume.ct import CT_RATE_LABELS

    d = root / "dataset"
    for kind, rep, lab_name, count in (("train", "train", "train", n), ("valid", "validation", "valid", 2)):
        reports = ["VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN"]
        meta = ["VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing"]
        labels = ["VolumeName," + ",".join(CT_RATE_LABELS)]
        for i in range(count):
            name = f"{kind}_{i + 1}_a_1.nii.gz"
            hu = np.full((24, 24, 12), -1000.0, np.float32)
            hu[6:18, 6:18, 3:9] = 40.0
            stored = hu + 1024.0 if i % 2 == 0 else hu  # even: raw stored values; odd: already HU (v2)
            write_nii(d / f"{kind}_fixed" / f"{kind}_{i + 1}" / f"{kind}_{i + 1}_a" / name, stored)
            reports.append(f"{name},Not given.,Not given.,Lungs clear {i}.,No acute findings.")
            meta.append(f"{name},1,-1024,\"[0.7, 0.7]\",1.5")
            labels.append(f"{name}," + ",".join(str((i + k) % 2) for k in range(18)))
        for sub, fname, rows in (("radiology_text_reports", f"{rep}_reports.csv", reports),
                                 ("metadata", f"{rep}_metadata.csv", meta),
                                 ("multi_abnormality_labels", f"{lab_name}_predicted_labels.csv", labels)):
            (d / sub).mkdir(parents=True, exist_ok=True)
            (d / sub / fname).write_text("\n".join(rows) + "\n")
    return root


def make_msd(root: Path, n: int = 6, modality: str = "CT") -> Path:
    training = []
    for i in range(n):
        img = RNG.normal(0, 100, (20, 20, 10)).astype(np.float32)
        lab = np.zeros((20, 20, 10), np.uint8)
        lab[5:12, 5:12, 2:6] = 1
        write_nii(root / "imagesTr" / f"liver_{i}.nii.gz", img)
        write_nii(root / "labelsTr" / f"liver_{i}.nii.gz", lab)
        training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    training.append({"image": "./imagesTr/._liver_0.nii.gz", "label": "./labelsTr/._liver_0.nii.gz"})  # AppleDouble
    meta = {"name": "Liver", "tensorImageSize": "3D", "modality": {"0": modality},
            "labels": {"0": "background", "1": "liver"}, "numTraining": n, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_btcv(root: Path, n: int = 5, layout: str = "rawdata") -> Path:
    """BTCV fixture with labels 1 (spleen) and 6 (liver).

    ``rawdata``: the Synapse download, ``RawData/Training/{img,label}``, no split file. ``monai``: the
    published MONAI/UNETR release, ``imagesTr``/``labelsTr``, unlabelled ``imagesTs`` and ``dataset_0.json``
    with MSD-style ``training``/``validation``/``test`` lists (the last 2 labelled volumes are ``validation``).
    """
    tr = ("RawData/Training/img", "RawData/Training/label") if layout == "rawdata" else ("imagesTr", "labelsTr")
    entries = []
    for i in range(1, n + 1):
        write_nii(root / tr[0] / f"img{i:04d}.nii.gz", RNG.normal(0, 100, (20, 20, 10)).astype(np.float32))
        lab = np.zeros((20, 20, 10), np.uint8)
        lab[2:8, 2:8, 2:5] = 1
        lab[10:16, 10:16, 4:8] = 6
        write_nii(root / tr[1] / f"label{i:04d}.nii.gz", lab)
        entries.append({"image": f"{tr[0]}/img{i:04d}.nii.gz", "label": f"{tr[1]}/label{i:04d}.nii.gz"})
    if layout == "monai":
        write_nii(root / "imagesTs" / "img0061.nii.gz", RNG.normal(0, 100, (20, 20, 10)).astype(np.float32))
        organs = ["spleen", "rkid", "lkid", "gall", "eso", "liver", "sto", "aorta", "IVC", "veins", "pancreas", "rad", "lad"]
        meta = {"description": "btcv yucheng", "labels": {str(k): v for k, v in enumerate(["background"] + organs)},
                "modality": {"0": "CT"}, "name": "btcv", "numTest": 1, "numTraining": n - 2, "numValidation": 2,
                "tensorImageSize": "3D", "test": ["imagesTs/img0061.nii.gz"], "training": entries[:-2],
                "validation": entries[-2:]}
        (root / "dataset_0.json").write_text(json.dumps(meta))
    elif layout != "rawdata":
        raise ValueError(f"layout must be rawdata|monai, got {layout!r}")
    return root


def make_brats(root: Path) -> Path:
    for i, (case, mods, et) in enumerate([(f"BraTS2021_{k:05d}", ("t1", "t1ce", "t2", "flair"), 4) for k in range(3)] +
                                         [(f"BraTS-GLI-{k:05d}-000", ("t1n", "t1c", "t2w", "t2f"), 3) for k in range(3)]):
        sep = "_" if case.startswith("BraTS2021") else "-"
        for m in mods:
            write_nii(root / case / f"{case}{sep}{m}.nii.gz", RNG.random((16, 16, 12)).astype(np.float32))
        seg = np.zeros((16, 16, 12), np.uint8)
        seg[4:8, 4:8, 4:8] = 2
        seg[5:7, 5:7, 5:7] = et
        write_nii(root / case / f"{case}{sep}seg.nii.gz", seg)
    return root


def make_cremi(root: Path) -> Path:
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    for s in "AB":
        with h5py.File(root / f"sample_{s}_20160501.hdf", "w") as f:
            f["volumes/raw"] = RNG.integers(0, 255, (12, 32, 32)).astype(np.uint8)
            ids = np.ones((12, 32, 32), np.uint64)
            ids[:, :, 16:] = 2
            ids[0, 0, 0] = np.iinfo(np.uint64).max
            f["volumes/labels/neuron_ids"] = ids
    return root


def make_snemi(root: Path) -> Path:
    import tifffile

    root.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "train-input.tif", RNG.integers(0, 255, (12, 32, 32)).astype(np.uint8))
    lab = np.ones((12, 32, 32), np.uint16)
    lab[:, 16:] = 7
    tifffile.imwrite(root / "train-labels.tif", lab)
    return root


def make_lucchi(root: Path) -> Path:
    import tifffile

    root.mkdir(parents=True, exist_ok=True)
    for name in ("training", "testing"):
        tifffile.imwrite(root / f"{name}.tif", RNG.integers(0, 255, (12, 32, 32)).astype(np.uint8))
        m = np.zeros((12, 32, 32), np.uint8)
        m[:, 8:16, 8:16] = 255
        tifffile.imwrite(root / f"{name}_groundtruth.tif", m)
    return root


def make_cc_ccii(root: Path, n_patients: int = 4, size: int = 16) -> Path:
    """CC-CCII fixture in the CNCB release layout: ``<class>/<patient_id>/<scan_id>/<n>.png`` for NCP/CP/Normal
    plus ``unzip_filenames.csv`` (``zip_file,label,patient_id,scan_id,n_slice``). Slices are named ``1, 2, 10``
    (numeric order differs from name order) with grey value 40·rank + 10·class; the first NCP patient has two
    scans."""
    from PIL import Image

    rows = ["zip_file,label,patient_id,scan_id,n_slice"]
    for c, label in enumerate(("NCP", "CP", "Normal")):
        for i in range(n_patients):
            patient = 100 * c + i + 1
            for scan in ([1000 * (c + 1) + i, 1000 * (c + 1) + 500] if c == 0 and i == 0 else [1000 * (c + 1) + i]):
                folder = root / label / str(patient) / str(scan)
                folder.mkdir(parents=True, exist_ok=True)
                for rank, name in enumerate((1, 2, 10)):
                    Image.fromarray(np.full((size, size), 40 * rank + 10 * c, np.uint8)).save(folder / f"{name}.png")
                rows.append(f"{label}-{i // 2 + 1}.zip,{label},{patient},{scan},3")
    (root / "unzip_filenames.csv").write_text("\n".join(rows) + "\n")
    return root
