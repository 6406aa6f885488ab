"""Radiology-style report writer for the phantom dataset.

Reports follow MIMIC-CXR's layout (``FINDINGS:`` and ``IMPRESSION:`` sections), name the anatomical
location of each positive finding, include explicit negations of absent findings (each mentioned with
probability ``p_negation``) and vary their wording across several templates per finding.
"""
from __future__ import annotations

import numpy as np

from medvlp.datamodules.phantom.render import Finding

POSITIVE = {
    "Consolidation": ["There is {size} consolidation in the {side} {zone} lung zone.",
                      "{Side} {zone} lobe airspace opacity is seen, consistent with consolidation.",
                      "Focal consolidation is noted in the {side} {zone} lung."],
    "Pleural Effusion": ["There is a {size} {side} pleural effusion.",
                         "Blunting of the {side} costophrenic angle consistent with a {size} effusion.",
                         "{Size} {side} pleural effusion is present."],
    "Cardiomegaly": ["The heart size is enlarged.", "There is {size} cardiomegaly.",
                     "The cardiac silhouette is enlarged."],
    "Pneumothorax": ["There is a {size} {side} apical pneumothorax.", "{Side} apical pneumothorax is noted.",
                     "A {side} pneumothorax is seen at the apex."],
    "Lung Nodule": ["A {size} nodule is seen in the {side} {zone} lung zone.",
                    "There is a {side} {zone} lobe nodule.", "{Side} {zone} lung nodule is noted."],
    # CT
    "Lung nodule": ["A {size} nodule is seen in the {side} {zone} lobe.",
                    "There is a {side} {zone} lobe pulmonary nodule measuring {size}.",
                    "{Side} {zone} lobe nodule is noted."],
    "Pleural effusion": ["There is a {size} {side} pleural effusion.", "{Side} pleural effusion is present.",
                         "Fluid is seen in the {side} pleural space."],
    "Emphysema": ["There are {size} emphysematous changes in both lungs.", "Emphysema is noted.",
                  "Low attenuation areas consistent with emphysema are seen."],
    # MRI
    "Tumour": ["There is a {size} enhancing mass in the {side} {zone} lobe.",
               "An enhancing tumour is seen in the {side} {zone} region.",
               "{Side} {zone} lobe mass with central necrosis."],
    "Edema": ["There is surrounding vasogenic edema.", "Perilesional edema is present.",
              "The mass is surrounded by edema."],
    "Hemorrhage": ["A {size} focus of hemorrhage is seen in the {side} {zone} lobe.",
                   "There is {side} {zone} hemorrhage.", "Hemorrhagic focus in the {side} hemisphere."],
    # EM
    "Mitochondria": ["{Size} mitochondria are visible within the neurites.",
                     "The volume contains {size} mitochondria.", "Mitochondria are seen in several processes."],
    "Synaptic vesicles": ["Synaptic vesicles are {size} near a membrane.", "A cluster of synaptic vesicles is seen.",
                          "Vesicle clusters indicate a synapse."],
    "Myelinated axon": ["A myelinated axon is present.", "There is a myelin sheath around an axon.",
                        "A dark myelin ring surrounds an axon."],
}
POSITIVE["Consolidation (CT)"] = POSITIVE["Consolidation"]
NEGATIVE = {
    "Consolidation": ["No focal consolidation.", "There is no consolidation.", "The lungs are clear without consolidation."],
    "Pleural Effusion": ["No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."],
    "Cardiomegaly": ["The heart size is normal.", "Cardiac silhouette is within normal limits.", "No cardiomegaly."],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."],
    "Lung Nodule": ["No pulmonary nodules.", "No nodule is seen.", "There are no lung nodules."],
    "Lung nodule": ["No pulmonary nodules.", "No nodule is seen."],
    "Pleural effusion": ["No pleural effusion.", "There is no pleural fluid."],
    "Emphysema": ["No emphysema.", "There is no emphysema."],
    "Tumour": ["No mass is seen.", "There is no enhancing lesion."],
    "Edema": ["No edema."],
    "Hemorrhage": ["No hemorrhage.", "There is no intracranial hemorrhage."],
    "Mitochondria": ["No mitochondria are visible.", "Mitochondria are absent."],
    "Synaptic vesicles": ["No synaptic vesicles are seen."],
    "Myelinated axon": ["No myelinated axons.", "No myelin is seen."],
}
NORMAL_IMPRESSION = {
    "xray": "No acute cardiopulmonary process.",
    "ct": "No acute findings in the chest.",
    "mri": "No acute intracranial abnormality.",
    "em": "Unremarkable neuropil.",
}
PREFIX = {
    "xray": ["PA and lateral views of the chest.", "Frontal view of the chest."],
    "ct": ["Axial CT of the chest without contrast.", "Non-contrast chest CT."],
    "mri": ["Axial T1-weighted MRI of the brain.", "MRI of the brain."],
    "em": ["Electron microscopy volume of neuropil.", "Serial section EM volume."],
}
EXTRA_NORMAL = {"xray": "The mediastinal contours are normal.", "ct": "The mediastinum is unremarkable.",
                "mri": "The ventricles are normal in size.", "em": "Cell membranes are well preserved."}


def _fill(template: str, f: Finding) -> str:
    side = f.side or "bilateral"
    zone = f.zone or "upper"
    size = f.size or "small"
    text = template.format(side=side, zone=zone, size=size, Side=side.capitalize(), Size=size.capitalize())
    return text[0].upper() + text[1:]


def positive_sentence(finding: Finding, variant: int = 0) -> str:
    """Wording ``variant`` of :data:`POSITIVE` for ``finding``, filled with its side, zone and size (variant 0
    is also the impression's wording, e.g. ``"There is a small right pleural effusion."``)."""
    return _fill(POSITIVE[finding.label][variant], finding)


def write_report(findings: list[Finding], label_names: list[str], modality: str,
                 rng: np.random.Generator, p_negation: float = 0.6) -> tuple[str, dict[str, str], list[tuple[str, str, str]]]:
    """Write a report for ``findings``.

    Returns:
        ``(text, sections, triplets)`` where triplets are ground-truth ``(region, finding, existence)``
        for every finding sentence (existence ``"positive"`` or ``"negative"``).
    """
    positives = {f.label for f in findings}
    sentences: list[tuple[str, tuple[str, str, str]]] = []
    for f in findings:
        t = POSITIVE[f.label][int(rng.integers(len(POSITIVE[f.label])))]
        region = " ".join(x for x in (f.side, f.zone) if x)
        sentences.append((_fill(t, f), (region, f.label.lower(), "positive")))
    for name in label_names:
        if name not in positives and rng.random() < p_negation:
            opts = NEGATIVE[name]
            sentences.append((opts[int(rng.integers(len(opts)))], ("", name.lower(), "negative")))
    if modality == "xray":  # normal statements about named zones (region–sentence pairs for ASG)
        used = {(f.side, f.zone) for f in findings}
        zones = [(sd, z) for sd in ("right", "left") for z in ("upper", "mid", "lower") if (sd, z) not in used]
        for k in rng.choice(len(zones), size=min(2, len(zones)), replace=False):
            sd, z = zones[int(k)]
            sentences.append((f"The {sd} {z} lung zone is clear.", (f"{sd} {z}", "", "negative")))
    order = rng.permutation(len(sentences))
    sentences = [sentences[i] for i in order]
    if rng.random() < 0.5:
        sentences.append((EXTRA_NORMAL[modality], ("", "", "negative")))
    findings_text = " ".join(s for s, _ in sentences)
    if findings:
        impression = " ".join(_fill(POSITIVE[f.label][0], f) for f in findings[:2])
    else:
        impression = NORMAL_IMPRESSION[modality]
    prefix = PREFIX[modality][int(rng.integers(len(PREFIX[modality])))]
    text = f"EXAMINATION: {prefix}\n FINDINGS: {findings_text}\n IMPRESSION: {impression}"
    return text, {"findings": findings_text, "impression": impression}, [t for _, t in sentences]


def canonical_report(positive_labels: list[str], label_names: list[str],
                     modality: str) -> tuple[str, dict[str, str], list[tuple[str, str, str]]]:
    """The one fixed report of a set of positive labels (the phantom's false-negative knob).

    Every study whose positive labels are ``positive_labels`` gets this identical text: impression = the
    positive label names in ``label_names`` order (``"Consolidation. Pleural effusion."``), or the modality's
    fixed normal impression when none is positive; findings = one sentence per label in ``label_names``
    order, ``"<Label> is seen."`` when positive and the label's first :data:`NEGATIVE` wording when absent.
    No side, zone, size or randomly chosen wording enters, so two studies with the same labels are exact
    duplicates on the text side (in-batch contrastive losses treat them as negatives of each other).

    Returns:
        ``(text, sections, triplets)`` as :func:`write_report`; triplets carry region ``""`` because the
        canonical text names no location.
    """
    unknown = set(positive_labels) - set(label_names)
    if unknown:
        raise ValueError(f"canonical_report: labels {sorted(unknown)} are not among {label_names}")
    present = [n for n in label_names if n in set(positive_labels)]
    sentences: list[tuple[str, tuple[str, str, str]]] = []
    for name in label_names:
        if name in present:
            sentences.append((f"{_sentence_case(name)} is seen.", ("", name.lower(), "positive")))
        else:
            sentences.append((NEGATIVE[name][0], ("", name.lower(), "negative")))
    findings_text = " ".join(s for s, _ in sentences)
    impression = " ".join(f"{_sentence_case(n)}." for n in present) if present else NORMAL_IMPRESSION[modality]
    text = f"EXAMINATION: {PREFIX[modality][0]}\n FINDINGS: {findings_text}\n IMPRESSION: {impression}"
    return text, {"findings": findings_text, "impression": impression}, [t for _, t in sentences]


def _sentence_case(name: str) -> str:
    return name[:1].upper() + name[1:].lower()
