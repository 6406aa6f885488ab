"""Report processing: sections, sentence spans, and the triplet parser on real Open-i reports."""
from __future__ import annotations

import importlib.util
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from medvlp.reports import TripletParser, parse_sections, split_sentences

PARSER = TripletParser()


def triplets(text: str) -> set[tuple[str, str, str]]:
    return {(t.region, t.finding, t.existence) for t in PARSER.parse(text)}


def test_mimic_style_sections() -> None:
    text = "WET READ: x\n FINDINGS: No effusion.\n CONCLUSION: Normal chest."
    s = parse_sections(text)
    assert s["findings"] == "No effusion." and s["impression"] == "Normal chest."


def test_sentence_spans_keep_offsets_and_decimals() -> None:
    text = "A 2.5 cm nodule. No effusion!"
    spans = split_sentences(text)
    assert [s for _, _, s in spans] == ["A 2.5 cm nodule.", "No effusion!"]
    assert all(text[a:b] == s for a, b, s in spans)


def _openi_reports() -> dict[str, str]:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None:
        pytest.skip("torchxrayvision wheel (real Open-i reports) not installed")
    tgz = Path(spec.submodule_search_locations[0]) / "data" / "NLMCXR_reports.tgz"
    wanted = {"ecgen-radiology/1.xml", "ecgen-radiology/10.xml", "ecgen-radiology/1000.xml",
              "ecgen-radiology/1003.xml", "ecgen-radiology/1013.xml", "ecgen-radiology/1019.xml"}
    out = {}
    with tarfile.open(tgz) as tar:
        for name in wanted:
            root = ET.fromstring(tar.extractfile(name).read())
            out[Path(name).stem] = {a.get("Label"): a.text for a in root.iter("AbstractText")}["FINDINGS"]
    return out


def test_parser_on_real_openi_reports_hand_checked() -> None:
    r = _openi_reports()
    # 1.xml: "There is no pulmonary edema. There is no focal consolidation. ... no evidence of pneumothorax."
    assert {("", "edema", "negative"), ("", "consolidation", "negative"), ("", "pneumothorax", "negative")} <= triplets(r["1"])
    # 10.xml: "...without evidence of focal airspace disease, pleural effusion, or pneumothorax.
    #          Stable calcified granuloma within the right upper lung."
    t10 = triplets(r["10"])
    assert {("", "pleural effusion", "negative"), ("", "pneumothorax", "negative"),
            ("right upper lung zone", "granuloma", "positive")} <= t10
    # 1000.xml: "increased opacity within the right upper lobe with possible mass ...";
    #           "opacity in the left midlung ... may represent focal airspace disease"
    t1000 = triplets(r["1000"])
    assert {("right upper lung zone", "opacity", "positive"), ("right upper lung zone", "mass", "uncertain"),
            ("left mid lung zone", "opacity", "positive"), ("left mid lung zone", "consolidation", "uncertain"),
            ("", "pleural effusion", "negative")} <= t1000
    # 1003.xml: "bandlike opacity in the left lung base. This may represent atelectasis.
    #            No pneumothorax or pleural effusion is seen."
    t1003 = triplets(r["1003"])
    assert {("left lower lung zone", "opacity", "positive"), ("", "atelectasis", "uncertain"),
            ("", "pneumothorax", "negative"), ("", "pleural effusion", "negative")} <= t1003
    # 1013.xml: "Stable mild cardiomegaly. No pneumothorax, pleural effusion, or focal airspace disease."
    t1013 = triplets(r["1013"])
    assert ("cardiac silhouette", "cardiomegaly", "positive") in t1013
    assert ("", "consolidation", "negative") in t1013
    # 1019.xml: "blunting of the right lateral costophrenic sulcus which could be ... a small effusion"
    assert ("right costophrenic angle", "pleural effusion", "uncertain") in triplets(r["1019"])


def test_tag_vector_positive_wins_uncertain_is_minus_one() -> None:
    t = PARSER.parse("Possible right effusion. Left pleural effusion is present. No pneumothorax. Possible edema.")
    vec = dict(zip(PARSER.tag_names, PARSER.tag_vector(t)))
    assert vec["pleural effusion"] == 1.0 and vec["pneumothorax"] == 0.0 and vec["edema"] == -1.0
