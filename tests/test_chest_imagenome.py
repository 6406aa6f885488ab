"""Chest ImaGenome scene graphs (PhysioNet v1.0.0 ``<dicom_id>_SceneGraph.json`` layout) as the region
source of ``mimic_cxr``, and ASG training with ARSA on them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp.datamodules.xray.chest_imagenome import ChestImaGenomeRegions, letterbox_box, read_scene_graph
from medvlp.datamodules.io.readers import DataError
from medvlp.datamodules.xray.chest import MIMICCXRDataModule
from tests import fixtures as fx


def _object(dicom: str, name: str, box: tuple[int, int, int, int]) -> dict:
    x1, y1, x2, y2 = box
    return {"object_id": f"{dicom}_{name}", "x1": 0, "y1": 0, "x2": 1, "y2": 1, "width": 1, "height": 1,
            "bbox_name": name, "synsets": ["C0000000"], "name": name.capitalize(),
            "original_x1": x1, "original_y1": y1, "original_x2": x2, "original_y2": y2,
            "original_width": x2 - x1, "original_height": y2 - y1}


def _attribute(dicom: str, name: str, phrases: list[str]) -> dict:
    n = len(phrases)
    return {name: True, "bbox_name": name, "synsets": ["C0000000"], "name": name.capitalize(),
            "attributes": [["anatomicalfinding|yes|pleural effusion"]] * n, "attributes_ids": [["CL0"]] * n,
            "phrases": phrases, "phrase_IDs": [f"s1|{k}" for k in range(n)], "sections": ["finding"] * n,
            "comparison_cues": [[]] * n, "temporal_cues": [[]] * n, "severity_cues": [[]] * n,
            "texture_cues": [[]] * n, "object_id": f"{dicom}_{name}"}


def write_scene_graph(folder: Path, dicom: str, objects: list[dict], attributes: list[dict]) -> Path:
    graph = {"image_id": dicom, "viewpoint": "PA", "patient_id": 1, "study_id": 2, "objects": objects,
             "attributes": attributes, "relationships": []}
    path = folder / f"{dicom}_SceneGraph.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(graph))
    return path


def make_imagenome(mimic: Path, out: Path, missing: int = 6) -> dict[str, Path]:
    """Scene graphs for the fixture's images (none for image ``missing``): three right-side regions
    described by one sentence (to be merged), the left lung by another, the heart by a sentence absent
    from the report text."""
    written = {}
    for k, img in enumerate(sorted(mimic.rglob("*.jpg"))):
        dicom, i = img.stem, int(img.stem[:8], 16)
        if i == missing:
            continue
        right = f"There is a small right pleural effusion number {i}."
        objects = [_object(dicom, "right lower lung zone", (2, 20, 20, 38)),
                   _object(dicom, "right costophrenic angle", (1, 30, 12, 40)),
                   _object(dicom, "right lung", (1, 2, 22, 38)), _object(dicom, "left lung", (26, 2, 46, 38)),
                   _object(dicom, "cardiac silhouette", (14, 15, 34, 35))]
        attributes = [_attribute(dicom, "right lower lung zone", [right]),
                      _attribute(dicom, "right costophrenic angle", [right]), _attribute(dicom, "right lung", [right]),
                      _attribute(dicom, "left lung", ["Effusion."]),
                      _attribute(dicom, "cardiac silhouette", ["Heart size is normal."]),
                      _attribute(dicom, "spine", [])]
        written[dicom] = write_scene_graph(out / "silver_dataset" / "scene_graph" / f"g{k % 2}", dicom, objects,
                                           attributes)
    return written


def test_scene_graph_reader_merges_identical_sentences_and_links_spans(tmp_path) -> None:
    mimic = fx.make_mimic(tmp_path / "mimic")
    graphs = make_imagenome(mimic, tmp_path / "imagenome")
    dicom, path = next(iter(graphs.items()))
    assert [r.names[0] for r in read_scene_graph(path)] == ["right lower lung zone", "right costophrenic angle",
                                                            "right lung", "left lung", "cardiac silhouette"]
    src = ChestImaGenomeRegions(tmp_path / "imagenome")
    i = int(dicom[:8], 16)
    text = f"Effusion. There is a small right pleural effusion number {i}."
    pairs = src.pairs(dicom, text)
    assert len(pairs) == 2  # three right-side regions merged; the heart's sentence is not in the text
    (box, spans), (box2, spans2) = pairs
    assert box == (1.0, 2.0, 22.0, 40.0)  # union of the merged boxes
    assert [text[s:e] for s, e in spans] == [f"There is a small right pleural effusion number {i}."]
    assert [text[s:e] for s, e in spans2] == ["Effusion."]
    assert src.stats["merged_regions"] == 2 and src.stats["phrase_not_in_text"] == 1
    bad = write_scene_graph(tmp_path / "bad", "x", [{"bbox_name": "right lung", "original_x1": "a"}], [])
    with pytest.raises(DataError, match="objects\\[0\\].*original_x1"):
        read_scene_graph(bad)


def test_scene_graph_pairs_are_capped_at_23(tmp_path) -> None:
    names = [f"region {k}" for k in range(30)]
    text = " ".join(f"Sentence {k} here." for k in range(30))
    write_scene_graph(tmp_path, "d", [_object("d", n, (0, 0, 10, 10)) for n in names],
                      [_attribute("d", n, [f"Sentence {k} here."]) for k, n in enumerate(names)])
    src = ChestImaGenomeRegions(tmp_path)
    assert len(src.pairs("d", text)) == 23 and src.stats["pairs_truncated"] == 7
    fields = src.sample_fields("d", text, 10, 10, 32)
    assert fields["regions"].shape == (23, 4) and bool(fields["region_present"].all())


def test_boxes_follow_the_image_resize_and_pad(tmp_path) -> None:
    from PIL import Image

    arr = np.zeros((60, 100), np.uint8)
    arr[10:40, 20:50] = 255  # the region, in original pixels (x 20..50, y 10..40)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    dm = MIMICCXRDataModule(str(tmp_path), image_size=32)
    img = dm.image_tensor(path, augment=False)[0]
    x1, y1, x2, y2 = letterbox_box((20, 10, 50, 40), 60, 100, 32)
    inside = img[int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1]
    ring = torch.ones_like(img, dtype=torch.bool)
    ring[max(int(y1) - 1, 0):int(np.ceil(y2)) + 1, max(int(x1) - 1, 0):int(np.ceil(x2)) + 1] = False
    assert inside.numel() > 0 and inside.min() > img[ring].max()


def test_asg_trains_with_arsa_on_mimic_with_chest_imagenome(tmp_path) -> None:
    from tests.conftest import build_tiny

    mimic = fx.make_mimic(tmp_path / "mimic")
    make_imagenome(mimic, tmp_path / "imagenome")
    dm = MIMICCXRDataModule(str(mimic), image_size=32, region_source="chest_imagenome",
                            scene_graph_dir=str(tmp_path / "imagenome"))
    batch = next(iter(dm.eval_dataloader("train", 4)))
    assert dm.index_skips["no_scene_graph"] == 1  # image 6 (frontal) has no scene graph
    assert batch["regions"].shape[1:] == (23, 4) and batch["region_spans"].shape[1:3] == (23, 8)
    assert batch["region_present"].sum(1).tolist() == [2] * len(batch["text"])
    method, _ = build_tiny("asg")
    method.train()
    out = method._losses(batch)
    assert out["regions_per_image"].item() == 2.0 and out["arsa_loss"].item() > 0
    method._total(out, "train").backward()
    assert method.region_proj.net[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ UMCL's unified image–text–label stream
def test_image_text_label_stream_mixes_reports_and_labels_under_one_label_list(tmp_path) -> None:
    from medvlp.datamodules import ImageTextLabelDataModule
    from medvlp.methods.umcl import label_set_targets
    from tests.conftest import build_tiny

    mimic = fx.make_mimic(tmp_path / "mimic")
    chexpert = fx.make_chexpert(tmp_path, n=12)
    dm = ImageTextLabelDataModule(
        sources={"reports": {"name": "mimic_cxr", "init_args": {"root": str(mimic)}},
                 "labels": {"name": "chexpert", "init_args": {"root": str(chexpert), "val_size": 2}}},
        image_size=32, batch_size=32)
    assert dm.label_names == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    batch = next(iter(dm.train_dataloader()))
    is_report = torch.tensor([bool(t) for t in batch["text"]])
    assert is_report.any() and (~is_report).any()  # both kinds in one batch
    assert batch["labels"].shape == (len(is_report), 5) and batch["label_names"] == dm.label_names
    targets = label_set_targets(batch["labels"])
    cross = targets[is_report][:, ~is_report]
    assert cross.sum() > 0  # a report sample and a label-only sample with the same label set are positives
    method, _ = build_tiny("umcl", "method.init_args.class_names=[Atelectasis,Cardiomegaly,Consolidation,Edema,"
                           "Pleural Effusion]")
    out = method._losses(batch)
    method._total(out, "train").backward()
    assert torch.isfinite(out["itl_loss"]) and out["false_negatives_removed"] > 0


def test_image_text_label_config_is_validated_per_source() -> None:
    from medvlp.cli import main

    base = ["config", "method=umcl", "preset=tiny", "data=image_text_label",
            "data.init_args.sources.reports.name=mimic_cxr", "data.init_args.sources.reports.init_args.root=/m",
            "data.init_args.sources.labels.name=chexpert", "data.init_args.sources.labels.init_args.root=/c",
            "data.init_args.image_size=32"]
    assert main(base) == 0
    assert main(base + ["data.init_args.sources.labels.init_args.bogus=3"]) != 0


@pytest.mark.slow
def test_cli_pretrains_asg_with_arsa_and_umcl_on_the_unified_stream(tmp_path) -> None:
    """``medvlp pretrain`` (real Lightning Trainer) on the fixtures: ASG with Chest ImaGenome regions on
    mimic_cxr logs a non-zero ARSA term; UMCL trains on image_text_label (mimic_cxr + chexpert)."""
    import csv

    from medvlp.cli import main

    mimic = fx.make_mimic(tmp_path / "mimic")
    make_imagenome(mimic, tmp_path / "imagenome")
    chexpert = fx.make_chexpert(tmp_path, n=12)
    assert main(["pretrain", "method=asg", "preset=tiny", "data=mimic_cxr", f"data.init_args.root={mimic}",
                 "data.init_args.region_source=chest_imagenome", f"data.init_args.scene_graph_dir={tmp_path / 'imagenome'}",
                 "data.init_args.image_size=32", "data.init_args.batch_size=3", "trainer.max_steps=2",
                 f"run.dir={tmp_path / 'asg'}"]) == 0
    rows = list(csv.DictReader(next((tmp_path / "asg" / "logs").rglob("metrics.csv")).open()))
    arsa = [float(r["train/arsa_loss_step"]) for r in rows if r.get("train/arsa_loss_step")]
    assert arsa and all(a > 0 for a in arsa)
    assert main(["pretrain", "method=umcl", "preset=tiny", "data=image_text_label",
                 "data.init_args.sources.reports.name=mimic_cxr", f"data.init_args.sources.reports.init_args.root={mimic}",
                 "data.init_args.sources.labels.name=chexpert", f"data.init_args.sources.labels.init_args.root={chexpert}",
                 "data.init_args.sources.labels.init_args.val_size=2", "data.init_args.image_size=32",
                 "data.init_args.batch_size=8", "trainer.max_steps=2", f"run.dir={tmp_path / 'umcl'}"]) == 0
