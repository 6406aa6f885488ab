"""The label-free ``image_stats`` caption source: sees one slice of the image only, never labels, mask or report."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from medvlp.datamodules.volume.captions import ImageStatsCaptioner, build_caption_source, uses_label_derived_captions
from medvlp.datamodules.phantom.datamodule import PhantomDataModule
from medvlp.datamodules.phantom.render import CT_LABELS, XRAY_LABELS

# label names, their words and the synonyms a report or template would use for them
SYNONYMS = {"nodule", "mass", "lesion", "tumour", "tumor", "effusion", "fluid", "pleural", "consolidation",
            "opacity", "infiltrate", "pneumonia", "cardiomegaly", "heart", "cardiac", "enlarged", "emphysema",
            "bulla", "pneumothorax", "air", "collapse", "lung", "abnormal", "abnormality", "normal", "finding",
            "findings", "disease", "showing", "positive", "negative", "present", "absent"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.mark.parametrize("modality,labels", [("ct", CT_LABELS), ("xray", XRAY_LABELS)])
def test_no_label_word_in_any_caption_of_a_phantom_split(modality: str, labels: list[str]) -> None:
    dm = PhantomDataModule(modality=modality, num_train=24, num_val=2, num_test=2, image_size=32,
                           volume_size=(16, 32, 32), captions={"type": "image_stats"})
    forbidden = SYNONYMS | {w for name in labels for w in _words(name)}
    ds = dm.dataset("train", augment=False)
    captions = [ds[i]["caption"] for i in range(len(ds))]
    for i, cap in enumerate(captions):
        name, text = cap.split(", ", 1)
        assert name == f"{modality}_0_{i}"  # GTGM's "<volume name>, <caption>"
        assert not (_words(text) & forbidden), (cap, _words(text) & forbidden)
    assert len({c.split(", ", 1)[1] for c in captions}) > 3  # the text varies with the image
    assert not uses_label_derived_captions({"data": {"init_args": {"captions": {"type": "image_stats"}}}})
    assert build_caption_source({"type": "image_stats"}).label_derived is False


def test_caption_is_a_function_of_the_image_only() -> None:
    dm = PhantomDataModule(modality="ct", num_train=8, num_val=2, num_test=2, volume_size=(16, 32, 32))
    ds = dm.dataset("train", augment=False)
    cap, other_seed = ImageStatsCaptioner(seed=3), ImageStatsCaptioner(seed=4)
    slices_differ = False
    for i in range(len(ds)):
        sample = ds[i]
        first = cap(sample)
        assert ImageStatsCaptioner(seed=3)(sample) == first == cap(sample)  # same image, same seed
        changed = {**sample, "labels": 1 - sample["labels"], "mask": torch.ones_like(sample["mask"]),
                   "text": "Large right pleural effusion and a lung nodule.", "sections": {},
                   "meta": {"id": sample["meta"]["id"], "findings": [{"label": "Emphysema", "slices": [0, 3]}]},
                   "label_names": ["Emphysema"]}
        assert cap(changed) == first  # labels, mask, report and findings changed: caption unchanged
        slices_differ |= cap.slice_of(sample["image"])[1] != other_seed.slice_of(sample["image"])[1]
    assert slices_differ  # the seed picks the slice


def test_description_of_a_hand_made_slice() -> None:
    cap = ImageStatsCaptioner(prefix_id=False)
    img = np.zeros((128, 128), np.float32)
    img[16:20, 12:16] = 1.0  # 16 px bright square in the upper left (smoothed: < 0.5 % of the slice)
    assert cap({"image": torch.from_numpy(img)[None]}) == "a mostly dark image with a small bright spot in the upper left"
    img = np.ones((64, 64), np.float32)
    img[44:50, 28:34] = 0.0  # 36 px dark square, lower centre (smoothed: 0.5–2 % of the slice)
    assert cap({"image": torch.from_numpy(img)[None]}) == "a mostly bright image with a medium dark spot in the lower centre"
    assert cap({"image": torch.zeros(1, 4, 8, 8)}) == "a uniform image without distinct spots"
    with pytest.raises(ValueError, match="threshold"):
        ImageStatsCaptioner(threshold=2.0)
