"""The phantom's false-negative knob: ``canonical_reports`` replaces a share of reports by one fixed text
per label set."""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import numpy as np
import pytest

from medvlp.datamodules import PhantomDataModule
from medvlp.datamodules.phantom.datamodule import SplitArrays, generate_split
from medvlp.datamodules.phantom.render import XRAY_LABELS
from medvlp.datamodules.phantom.reports import canonical_report
from medvlp.reports import TripletParser


def _records(folder) -> list[dict]:
    return json.loads((folder / "records.json").read_text())


def _label_sets(folder) -> list[tuple[int, ...]]:
    labels = SplitArrays(folder)["labels"]
    return [tuple(int(v) for v in row) for row in labels]


@pytest.mark.parametrize("modality,size,digest", [
    # sha256 of records.json (sorted keys) + labels bytes, produced by the generator before the knob existed
    ("xray", [32], "b0926665d31dd0619255ac54af97cd9a01d0b0bebeed2229efb618f25e9320f1"),
    ("ct", [8, 16, 16], "457b02d70074bde34027135f442f85a4a4b6df09df3fd00f65f2e15620a6e0b3"),
])
def test_share_zero_is_bit_identical_to_the_free_text_generator(tmp_path, modality, size, digest) -> None:
    folder = generate_split(modality, "train", 12, size, 3, 0.4, tmp_path, canonical_reports=0.0)
    assert folder.name == {"xray": "xray_train_7ded6c6ef513", "ct": "ct_train_08e7afad4b7c"}[modality]  # same cache key
    labels = SplitArrays(folder)["labels"]
    got = hashlib.sha256(json.dumps(_records(folder), sort_keys=True).encode() + labels.tobytes()).hexdigest()
    assert got == digest


def test_share_one_gives_one_text_per_label_set_and_keeps_labels_and_images(tmp_path) -> None:
    free = generate_split("xray", "train", 48, [32], 0, 0.4, tmp_path)
    canon = generate_split("xray", "train", 48, [32], 0, 0.4, tmp_path, canonical_reports=1.0)
    assert free != canon  # the share enters the cache key
    a_free, a_canon = SplitArrays(free), SplitArrays(canon)
    for key in ("labels", "image", "boxes", "mask"):
        np.testing.assert_array_equal(a_free[key], a_canon[key])
    texts_by_set: dict[tuple[int, ...], set[str]] = defaultdict(set)
    free_by_set: dict[tuple[int, ...], set[str]] = defaultdict(set)
    for ls, rf, rc in zip(_label_sets(canon), _records(free), _records(canon)):
        texts_by_set[ls].add(rc["text"])
        free_by_set[ls].add(rf["text"])
        assert rc["findings"] == rf["findings"]  # meta (side/zone) unchanged
        assert rc["sections"]["impression"] in rc["text"] and rc["sections"]["findings"] in rc["text"]
    assert all(len(t) == 1 for t in texts_by_set.values())  # identical within a label set
    assert len(set.union(*texts_by_set.values())) == len(texts_by_set)  # distinct across label sets
    repeated = [k for k, t in free_by_set.items() if sum(ls == k for ls in _label_sets(free)) > 1]
    assert repeated and all(len(free_by_set[k]) > 1 for k in repeated)  # free text varies within a set


def test_share_half_replaces_about_half_deterministically(tmp_path) -> None:
    free = _records(generate_split("xray", "train", 200, [32], 1, 0.3, tmp_path))
    half = _records(generate_split("xray", "train", 200, [32], 1, 0.3, tmp_path, canonical_reports=0.5))
    sets = _label_sets(generate_split("xray", "train", 200, [32], 1, 0.3, tmp_path))
    canonical = [r["text"] == canonical_report([n for n, v in zip(XRAY_LABELS, ls) if v], XRAY_LABELS, "xray")[0]
                 for r, ls in zip(half, sets)]
    changed = [a["text"] != b["text"] for a, b in zip(free, half)]
    assert canonical == changed  # every changed report is the canonical one, every other is untouched
    assert 0.38 <= float(np.mean(canonical)) <= 0.62  # binomial(200, 0.5): 0.38..0.62 is > 4 sd
    again = _records(generate_split("xray", "train", 200, [32], 1, 0.3, tmp_path / "b", canonical_reports=0.5))
    assert again == half


def test_canonical_report_wording_and_triplets() -> None:
    text, sections, triplets = canonical_report(["Pleural Effusion", "Consolidation"], XRAY_LABELS, "xray")
    assert sections["impression"] == "Consolidation. Pleural effusion."  # label order, not argument order
    assert sections["findings"].startswith("Consolidation is seen. Pleural effusion is seen. ")
    assert ("", "consolidation", "positive") in triplets and ("", "cardiomegaly", "negative") in triplets
    assert len(triplets) == len(XRAY_LABELS)
    parsed = {(t.finding, t.existence) for t in TripletParser().parse(sections["findings"])}
    assert ("consolidation", "positive") in parsed and ("pneumothorax", "negative") in parsed
    normal = canonical_report([], XRAY_LABELS, "xray")[1]
    assert normal["impression"] == "No acute cardiopulmonary process."
    with pytest.raises(ValueError, match="Edema"):
        canonical_report(["Edema"], XRAY_LABELS, "xray")


def test_datamodule_knob_enters_dataset_version_and_batches(tmp_path) -> None:
    kw = dict(num_train=16, num_val=4, num_test=4, image_size=32, cache_dir=str(tmp_path))
    base, canon = PhantomDataModule("xray", **kw), PhantomDataModule("xray", canonical_reports=1.0, **kw)
    assert "canon" not in base.dataset_version and canon.dataset_version == base.dataset_version + "-canon1"
    assert PhantomDataModule("xray", canonical_reports=0.25, **kw).dataset_version.endswith("-canon0.25")
    s = canon.dataset("train", augment=False)[0]
    assert s["text"] == " ".join([s["sections"]["impression"], s["sections"]["findings"]])
    with pytest.raises(ValueError, match="canonical_reports"):
        PhantomDataModule("xray", canonical_reports=1.5, **kw)
