"""ASG's official image pipeline on the X-ray datamodules (ASGMVLP_CODE datasets/pretrain_dataset.py):
grey → RGB, resize + pad to 256, random (train) / centre (eval) 224 crop with boxes cropped alike,
ImageNet mean/std; and the defaults it must not move."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp.datamodules.xray.chest_imagenome import letterbox_box
from medvlp.datamodules.xray.chest import IMAGENET_MEAN, IMAGENET_STD, CheXpertDataModule, MIMICCXRDataModule
from tests import fixtures as fx
from tests.test_chest_imagenome import _attribute, _object, write_scene_graph


def _grey(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _constant_with_range() -> np.ndarray:
    """40×40 of 153 (= 0.6 · 255) with one 0 and one 255 pixel in row 0, so the readers' min-max scaling
    keeps 153 at exactly 0.6."""
    arr = np.full((40, 40), 153, np.uint8)
    arr[0, 0], arr[0, 1] = 0, 255
    return arr


def test_three_channel_imagenet_normalisation_of_a_constant_image(tmp_path) -> None:
    path = _grey(tmp_path / "c.png", _constant_with_range())
    dm = MIMICCXRDataModule(str(tmp_path), image_size=40, channels=3, normalize="imagenet")
    img = dm.image_tensor(path, augment=False)
    assert img.shape == (3, 40, 40)
    for c in range(3):
        expected = (0.6 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(img[c, 1:], torch.full((39, 40), expected), atol=1e-5), c
    assert (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert dm.intensity_norm is None  # per-channel: reference views must not renormalise a scalar (mean, std)


def test_random_crop_varies_in_training_and_centre_crop_is_fixed(tmp_path) -> None:
    arr = (np.arange(48 * 48).reshape(48, 48) % 251).astype(np.uint8)  # every crop position looks different
    path = _grey(tmp_path / "g.png", arr)
    dm = MIMICCXRDataModule(str(tmp_path), image_size=48, crop_size=40, channels=3, normalize="imagenet",
                            intensity_jitter=0.0)
    torch.manual_seed(0)
    train = [dm.image_tensor(path, augment=True) for _ in range(6)]
    assert all(t.shape == (3, 40, 40) for t in train)
    assert any(not torch.equal(train[0], t) for t in train[1:])
    evals = [dm.image_tensor(path, augment=False) for _ in range(3)]
    assert all(torch.equal(evals[0], t) for t in evals)
    full = MIMICCXRDataModule(str(tmp_path), image_size=48, channels=3, normalize="imagenet").image_tensor(path, False)
    assert torch.equal(evals[0], full[:, 4:44, 4:44])  # (48 − 40) // 2 = 4 (albumentations CenterCrop)
    assert dm.encoder_hints() == {"spatial_dims": [2], "img_size_2d": 40, "in_channels": 3}


def test_region_boxes_follow_the_random_crop(tmp_path) -> None:
    mimic = fx.make_mimic(tmp_path / "mimic")
    dm0 = MIMICCXRDataModule(str(mimic))
    record = next(r for r in dm0.index() if r["text"])
    arr = np.zeros((60, 100), np.uint8)
    arr[10:40, 20:50] = 255  # the region, original pixels x 20..50, y 10..40
    _grey(Path(record["path"]), arr)
    dicom, sentence = record["id"], record["text"].split(".")[0].strip() + "."
    write_scene_graph(tmp_path / "sg", dicom, [_object(dicom, "right lung", (20, 10, 50, 40))],
                      [_attribute(dicom, "right lung", [sentence])])
    dm = MIMICCXRDataModule(str(mimic), image_size=64, crop_size=48, region_source="chest_imagenome",
                            scene_graph_dir=str(tmp_path / "sg"), intensity_jitter=0.0)
    torch.manual_seed(1)
    seen = set()
    for augment in (True,) * 8 + (False,):
        s = dm.load(record, augment)
        img, (x1, y1, x2, y2) = s["image"][0], s["regions"][0].tolist()
        assert s["image"].shape == (1, 48, 48) and bool(s["region_present"][0])
        bright = (img > 0.5).nonzero()  # normalised: bright ≈ +2, background −2
        top, left = bright.min(0).values.tolist()
        bottom, right = (bright.max(0).values + 1).tolist()
        assert (x1, y1, x2, y2) == pytest.approx((left, top, right, bottom), abs=1.0)
        seen.add((round(x1), round(y1)))
    assert len(seen) > 1  # the crop (and so the box) moved
    # eval: centre crop (64 − 48) // 2 = 8 applied to the letterboxed box
    bx1, by1, bx2, by2 = letterbox_box((20, 10, 50, 40), 60, 100, 64)
    assert s["regions"][0].tolist() == pytest.approx([bx1 - 8, by1 - 8, bx2 - 8, by2 - 8])


def test_a_box_cropped_out_entirely_is_dropped_and_counted(tmp_path) -> None:
    mimic = fx.make_mimic(tmp_path / "mimic")
    record = next(r for r in MIMICCXRDataModule(str(mimic)).index() if r["text"])
    _grey(Path(record["path"]), np.zeros((64, 64), np.uint8))
    dicom, sentence = record["id"], next(t.strip() + "." for t in record["text"].split(".") if "pleural" in t)
    write_scene_graph(tmp_path / "sg", dicom, [_object(dicom, "right lung", (0, 0, 4, 4)),
                                               _object(dicom, "left lung", (30, 30, 40, 40))],
                      [_attribute(dicom, "right lung", [sentence]), _attribute(dicom, "left lung", ["Effusion."])])
    dm = MIMICCXRDataModule(str(mimic), image_size=64, crop_size=32, region_source="chest_imagenome",
                            scene_graph_dir=str(tmp_path / "sg"))
    s = dm.load(record, augment=False)  # centre crop 16..48 leaves (0, 0, 4, 4) out
    assert s["region_present"].tolist()[:2] == [True, False]
    assert s["regions"][0].tolist() == [14.0, 14.0, 24.0, 24.0]  # the left lung, (30, 30, 40, 40) − 16
    assert s["region_spans"][0, 0].tolist() != [-1, -1] and dm.region_pairs.stats["regions_cropped_out"] == 1


def test_defaults_unchanged_and_bad_options_named(tmp_path) -> None:
    path = _grey(tmp_path / "c.png", _constant_with_range())
    dm = MIMICCXRDataModule(str(tmp_path), image_size=40)
    assert (dm.channels, dm.normalize, dm.crop_size, dm.intensity_jitter) == (1, "medvlp", None, 0.1)
    img = dm.image_tensor(path, augment=False)
    assert img.shape == (1, 40, 40)
    assert torch.allclose(img[:, 1:], torch.full((1, 39, 40), (0.6 - 0.5) / 0.25), atol=1e-5)
    assert dm.encoder_hints() == {"spatial_dims": [2], "img_size_2d": 40} and dm.intensity_norm == (0.5, 0.25)
    with pytest.raises(ValueError, match="normalize must be one of"):
        MIMICCXRDataModule(str(tmp_path), normalize="imgnet")
    with pytest.raises(ValueError, match="channels must be one of"):
        MIMICCXRDataModule(str(tmp_path), channels=2)
    with pytest.raises(ValueError, match="normalize=imagenet needs channels=3"):
        MIMICCXRDataModule(str(tmp_path), normalize="imagenet")
    with pytest.raises(ValueError, match="crop_size must be in"):
        CheXpertDataModule(str(tmp_path), image_size=224, crop_size=256)


def test_paper_preset_composes_asg_pipeline() -> None:
    from medvlp.cli import main
    from medvlp.compose import compose
    from medvlp.config import to_container

    cfg = to_container(compose(["method=asg", "preset=paper", "data=mimic_cxr", "data.init_args.root=/data/mimic",
                                "data.init_args.scene_graph_dir=/data/imagenome"]))
    d = cfg["data"]["init_args"]
    assert (d["image_size"], d["crop_size"], d["channels"], d["normalize"], d["intensity_jitter"]) == \
        (256, 224, 3, "imagenet", 0.0)
    assert main(["config", "method=asg", "preset=paper"]) == 0


def test_export_preprocessing_follows_the_crop_and_imagenet_normalisation() -> None:
    from types import SimpleNamespace

    from medvlp.pretrained.export import preprocess_for_method

    model = SimpleNamespace(image_encoder=SimpleNamespace(spatial_dims=(2,), in_channels=3),
                            hparams={"image_encoder": {"img_size_2d": 224}},
                            text_encoder=SimpleNamespace(max_length=112))
    run = {"data": {"init_args": {"image_size": 256, "crop_size": 224, "channels": 3, "normalize": "imagenet"}}}
    pre = preprocess_for_method(model, run)
    assert (pre.image_size, pre.resize, tuple(pre.mean), tuple(pre.std)) == (224, 256, IMAGENET_MEAN, IMAGENET_STD)
    default = preprocess_for_method(model, {"data": {"init_args": {"image_size": 224}}})
    assert (default.image_size, default.resize, tuple(default.mean)) == (224, None, (0.5,) * 3)
