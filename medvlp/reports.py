"""Radiology report processing: sections, sentences, and <region, finding, existence> triplets.

* :func:`parse_sections` – MIMIC-CXR section headers from a whitelist of section names (case-insensitive,
  sub-headers such as ``LUNGS:`` stay in their section), addenda, and the official parser's last-paragraph
  fallback for reports without headers.
* :func:`split_sentences` – sentence spans (character offsets kept, so token features can be pooled
  per sentence).
* :class:`TripletParser` – rule-based extraction of ``(region, finding, existence)`` with NegEx-style
  negation (pre- and post-negation cues) and uncertainty cues; region and finding vocabularies are
  configurable (defaults: Chest ImaGenome-style lung regions and ASG-style finding tags).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

#: MIMIC-CXR section names (lower case) recognised as headers; any other ``WORD:`` (``LUNGS:``, ``HEART:``,
#: ``PA AND LATERAL VIEWS:``) is text of the section it stands in. Values are the canonical names; a tuple
#: fills several sections (``FINDINGS AND IMPRESSION:``).
SECTION_NAMES: dict[str, str | tuple[str, ...]] = {
    "findings": "findings", "finding": "findings",
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression", "summary": "impression", "opinion": "impression",
    "findings and impression": ("findings", "impression"), "impression and findings": ("findings", "impression"),
    "findings/impression": ("findings", "impression"), "findings / impression": ("findings", "impression"),
    "addendum": "addendum", "addenda": "addendum",
    "comparison": "comparison", "comparisons": "comparison", "prior": "comparison", "priors": "comparison",
    "indication": "indication", "indications": "indication", "history": "indication",
    "clinical history": "indication", "clinical information": "indication", "clinical indication": "indication",
    "reason for exam": "indication", "reason for examination": "indication", "reason for study": "indication",
    "examination": "examination", "exam": "examination", "type of examination": "examination",
    "study": "examination", "procedure": "examination",
    "technique": "technique", "wet read": "wet read", "final report": "final report",
    "notification": "notification", "recommendation": "recommendation", "recommendations": "recommendation",
    "impression and recommendation": ("impression", "recommendation"),
    "impression and recommendations": ("impression", "recommendation"),
}
#: kept for callers that normalise names themselves
SECTION_ALIASES = {k: v for k, v in SECTION_NAMES.items() if isinstance(v, str) and k != v}
_HEADER_RE = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /()&,-]{0,40}?)[ \t]*:[ \t]*", re.MULTILINE)
ADDENDUM_POLICIES = ("impression", "separate", "drop")


def parse_sections(text: str, addendum: str = "impression") -> dict[str, str]:
    """Split a MIMIC-CXR report into lower-case sections.

    Headers are matched at the start of a line, case-insensitively, with or without a space after the
    colon, and only from :data:`SECTION_NAMES` (the MIMIC-CXR section names), so sub-headers inside
    FINDINGS (``LUNGS:``, ``HEART:``) stay in the findings. ``FINDINGS AND IMPRESSION:`` fills both.
    Text before the first header is ``preamble``. A report without findings and impression falls back to
    the official MIMIC-CXR section parser's rule: its last paragraph is the impression.

    Args:
        text: the report.
        addendum: ``impression`` (append addenda to the impression), ``separate`` (an ``addendum``
            section) or ``drop``.

    Raises:
        ValueError: for an unknown ``addendum`` policy.
    """
    if addendum not in ADDENDUM_POLICIES:
        raise ValueError(f"addendum must be one of {ADDENDUM_POLICIES}, got {addendum!r}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    headers = []
    for m in _HEADER_RE.finditer(text):
        name = " ".join(m.group(1).lower().split())
        if name in SECTION_NAMES:
            headers.append((m, SECTION_NAMES[name]))
    out: dict[str, str] = {}

    def add(name: str, body: str) -> None:
        body = " ".join(body.split())
        if body:
            out[name] = f"{out[name]} {body}" if out.get(name) else body

    first = headers[0][0].start() if headers else len(text)
    add("preamble", text[:first])
    for (m, names), nxt in zip(headers, [h[0].start() for h in headers[1:]] + [len(text)]):
        for name in (names,) if isinstance(names, str) else names:
            add(name, text[m.end(): nxt])
    if "addendum" in out and addendum != "separate":
        extra = out.pop("addendum")
        if addendum == "impression":
            add("impression", extra)
    if not out.get("findings") and not out.get("impression"):
        paragraphs = [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
        last = paragraphs[-1] if paragraphs else ""
        header = _HEADER_RE.match(last.lstrip("\n"))
        if last.strip() and not (header and " ".join(header.group(1).lower().split()) in SECTION_NAMES):
            add("impression", last)
    return out


_SENT_RE = re.compile(r"[^.!?\n]+(?:[.!?]+|$)")


def split_sentences(text: str, min_words: int = 1) -> list[tuple[int, int, str]]:
    """Sentence spans ``(start, end, sentence)`` with offsets into ``text``.

    Splits on ``.``, ``!``, ``?`` and newlines; decimal points inside numbers (``2.5 cm``) do not split.
    """
    protected = re.sub(r"(?<=\d)\.(?=\d)", "\x00", text)
    out = []
    for m in _SENT_RE.finditer(protected):
        s = m.group(0)
        stripped = s.strip()
        if not stripped or len(re.findall(r"\w+", stripped)) < min_words:
            continue
        start = m.start() + (len(s) - len(s.lstrip()))
        end = start + len(stripped)
        out.append((start, end, text[start:end]))
    return out


# Chest ImaGenome-style regions with surface forms (lower case; "{side}" expands to right/left).
DEFAULT_REGIONS: dict[str, list[str]] = {
    "right upper lung zone": ["right upper lung", "right upper lobe", "right upper zone"],
    "right mid lung zone": ["right mid lung", "right midlung", "right middle lobe", "right mid zone", "right middle lung"],
    "right lower lung zone": ["right lower lung", "right lower lobe", "right base", "right basilar", "right lung base"],
    "left upper lung zone": ["left upper lung", "left upper lobe", "left upper zone"],
    "left mid lung zone": ["left mid lung", "left midlung", "left mid zone", "lingula", "left middle lung"],
    "left lower lung zone": ["left lower lung", "left lower lobe", "left base", "left basilar", "left lung base"],
    "right apical zone": ["right apical", "right apex", "right apices"],
    "left apical zone": ["left apical", "left apex"],
    "right costophrenic angle": ["right costophrenic", "right pleural"],
    "left costophrenic angle": ["left costophrenic", "left pleural"],
    "cardiac silhouette": ["heart", "cardiac", "cardiomegaly", "cardiomediastinal"],
    "mediastinum": ["mediastinal", "mediastinum", "hilar", "hila"],
}
# ASG's official vocabulary (40 tags in a non-released labels.pickle) is approximated by common
# chest X-ray finding terms; each tag lists its surface forms.
DEFAULT_TAGS: dict[str, list[str]] = {
    "pleural effusion": ["pleural effusion", "effusion", "effusions", "pleural fluid"],
    "opacity": ["opacity", "opacities", "opacification"],
    "consolidation": ["consolidation", "airspace disease", "airspace opacity"],
    "atelectasis": ["atelectasis", "atelectatic"],
    "pneumothorax": ["pneumothorax", "pneumothoraces"],
    "edema": ["edema", "vascular congestion", "congestion"],
    "cardiomegaly": ["cardiomegaly", "heart size is enlarged", "cardiac silhouette is enlarged", "enlarged heart",
                     "heart is enlarged", "cardiac enlargement", "enlarged cardiac silhouette"],
    "nodule": ["nodule", "nodules", "nodular"],
    "mass": ["mass", "masses"],
    "pneumonia": ["pneumonia", "infection"],
    "fracture": ["fracture", "fractures"],
    "emphysema": ["emphysema", "emphysematous", "hyperinflation", "hyperinflated"],
    "fibrosis": ["fibrosis", "fibrotic", "scarring"],
    "calcification": ["calcification", "calcified"],
    "hernia": ["hernia"],
    "support device": ["tube", "tubes", "catheter", "catheters", "line", "lines", "lines and tubes", "pacemaker",
                       "device", "devices"],
    "enlarged cardiomediastinum": ["widened mediastinum", "mediastinal widening", "enlarged cardiomediastinal"],
    "lung lesion": ["lesion", "lesions"],
    "thickening": ["thickening"],
    "granuloma": ["granuloma", "granulomas"],
}
NEG_PRE = ["no", "not", "without", "negative for", "free of", "clear of", "absence of", "resolved", "no evidence of",
           "there is no", "there are no", "rule out", "removal of", "removed"]
NEG_POST = ["is not seen", "are not seen", "is absent", "are absent", "not identified", "has resolved",
            "have resolved", "is not present", "within normal limits", "is normal", "are normal", "normal in size",
            "has been removed", "have been removed"]
UNCERTAIN = ["may", "possible", "possibly", "likely", "probable", "probably", "suggest", "suggests", "suggestive",
             "cannot be excluded", "can not be excluded", "not excluded", "cannot exclude", "concerning for", "versus",
             "questionable", "question of", "could", "suspected", "suspect", "suspicious for", "differential",
             "differential diagnosis"]
# A negation or hedge cue does not reach past these: contrast words, and a coordinated clause that opens
# a new assertion (", and a right pleural effusion"). A bare list (", effusion, and pneumothorax") keeps it.
SCOPE_BREAK = re.compile(r";|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b|"
                         r",?\s+(?:and|with)\s+(?=(?:there\b|a\b|an\b|the\b|new\b|small\b|moderate\b|large\b|"
                         r"mild\b|minimal\b|trace\b|persistent\b|stable\b|increased\b|decreased\b))")
# "atelectasis or infiltrate", "scarring or atelectasis": a finding offered as one of alternatives
ALTERNATIVE_AFTER = re.compile(r"^[^,;.]{0,20}?\bor\s+(?!no\b|not\b)[a-z]")
ALTERNATIVE_BEFORE = re.compile(r"[a-z]{4,}\s+or\s+(?:\S+\s+){0,2}$")
# Tag → extra patterns beyond its plain surface forms (used when the tag is in the vocabulary).
# Cardiomegaly: heart size with an adverb or degree word before "enlarged" ("heart size is mildly enlarged").
CARDIOMEGALY_MODIFIED = re.compile(r"\b(?:heart|cardiac silhouette|cardiac size|heart size)\b(?: size)?"
                                   r"(?:\s+(?:is|are|appears|remains|seems))?(?:\s+(?:\w+ly|top|at|upper|limits|of|"
                                   r"normal|mild|moderate|severe|slight|again|still|now))*\s+enlarged\b")
EXTRA_PATTERNS: dict[str, list[re.Pattern[str]]] = {"cardiomegaly": [CARDIOMEGALY_MODIFIED]}
NORMAL_CUES = {"cardiomegaly": ["heart size is normal", "cardiac silhouette is within normal limits",
                                "heart is normal in size", "normal heart size"]}


@dataclass(frozen=True)
class Triplet:
    """``(region, finding, existence)``; region ``""`` when no anatomical region is named;
    existence ∈ {positive, negative, uncertain}."""

    region: str
    finding: str
    existence: str
    sentence: int


_ZONE_NOUN = r"(lobes?|lungs?|zones?|lung zones?|lung fields?)"


def expand_bilateral(sentence: str) -> str:
    """Rewrite bilateral phrasings into both sides so each side's region is named.

    ``bilateral lower lobe opacities`` → ``right lower lobe and left lower lobe opacities``;
    ``bibasilar``/``bibasal`` → both bases; ``bilateral pleural effusions`` → both sides' pleura;
    ``bilateral apical`` / ``biapical`` → both apices.
    """
    s = sentence.lower()
    s = re.sub(rf"\bbilateral (upper|mid|middle|lower) {_ZONE_NOUN}", r"right \1 \2 and left \1 \2", s)
    s = re.sub(r"\bbilateral (upper|mid|middle|lower)\b", r"right \1 lung and left \1 lung", s)
    s = re.sub(r"\bbi-?basi?l?a[rl]\b", "right base and left base", s)
    s = re.sub(r"\b(?:bilateral apical|biapical|bilateral apices)\b", "right apical and left apical", s)
    s = re.sub(r"\bbilateral (pleural|costophrenic)\b", r"right \1 and left \1", s)
    return s


def _compile(forms: Iterable[str]) -> re.Pattern[str]:
    alts = sorted({re.escape(f) for f in forms}, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(alts) + r")\b")


class TripletParser:
    """Rule-based report → triplet parser.

    Args:
        regions: region name → surface forms (default :data:`DEFAULT_REGIONS`).
        tags: finding tag → surface forms (default :data:`DEFAULT_TAGS`).
    """

    def __init__(self, regions: Mapping[str, Sequence[str]] | None = None,
                 tags: Mapping[str, Sequence[str]] | None = None) -> None:
        self.regions = {k: list(v) for k, v in (regions or DEFAULT_REGIONS).items()}
        self.tags = {k: list(v) for k, v in (tags or DEFAULT_TAGS).items()}
        self._region_re = {k: _compile(v) for k, v in self.regions.items()}
        self._tag_re = {k: _compile(v) for k, v in self.tags.items()}
        self._neg_pre = _compile(NEG_PRE)
        self._neg_post = _compile(NEG_POST)
        self._unc = _compile(UNCERTAIN)
        self._normal = {k: _compile(v) for k, v in NORMAL_CUES.items()}

    @property
    def region_names(self) -> list[str]:
        """Region vocabulary in index order."""
        return list(self.regions)

    @property
    def tag_names(self) -> list[str]:
        """Finding-tag vocabulary in index order."""
        return list(self.tags)

    def existence(self, sentence: str, start: int, end: int) -> str:
        """Existence of the finding mentioned at ``sentence[start:end]``.

        NegEx-style: a pre-negation cue before the mention or a post-negation cue after it, within the
        mention's scope (cues do not cross :data:`SCOPE_BREAK`), makes it negative; otherwise an
        uncertainty cue in scope, or the mention being one of ``X or Y`` alternatives, makes it uncertain.
        """
        s = sentence.lower()
        before = s[:start]
        breaks = list(SCOPE_BREAK.finditer(before))
        if breaks:
            before = before[breaks[-1].end():]
        after = s[end:]
        nxt = SCOPE_BREAK.search(after)
        after = after[: nxt.start()] if nxt else after
        if self._neg_pre.search(before) or self._neg_post.search(after[:60]):
            return "negative"
        if self._unc.search(before) or self._unc.search(after[:40]):
            return "uncertain"
        if ALTERNATIVE_AFTER.search(after) or ALTERNATIVE_BEFORE.search(before):
            return "uncertain"
        return "positive"

    def sentence_regions(self, sentence: str) -> list[str]:
        """Regions named in one sentence (``bilateral`` names both sides of a zone)."""
        s = sentence.lower()
        s = expand_bilateral(s)
        found = [name for name, rx in self._region_re.items() if rx.search(s)]
        for side in ("right", "left"):  # "right pleural effusion" → costophrenic angle of that side
            if re.search(rf"\b{side}\b[^.]*\beffusion", s) and f"{side} costophrenic angle" not in found:
                found.append(f"{side} costophrenic angle")
            if re.search(rf"\b{side}\b[^.]*\bapical|\bapical[^.]*\b{side}\b", s) and f"{side} apical zone" not in found:
                found.append(f"{side} apical zone")
        return [r for r in self.regions if r in found]

    def parse(self, report: str) -> list[Triplet]:
        """All triplets of a report (one per finding mention × named region, or region ``""``)."""
        out: list[Triplet] = []
        for i, (_, _, sent) in enumerate(split_sentences(report)):
            low = sent.lower()
            regions = self.sentence_regions(sent) or [""]
            for tag, rx in self._tag_re.items():
                m = rx.search(low)
                for extra in EXTRA_PATTERNS.get(tag, []) if m is None else []:
                    m = m or extra.search(low)
                if m is None:
                    continue
                ex = self.existence(sent, m.start(), m.end())
                for region in regions:
                    out.append(Triplet(region, tag, ex, i))
            for tag, rx in self._normal.items():
                if rx.search(low) and not any(t.finding == tag and t.sentence == i for t in out):
                    out.extend(Triplet(region, tag, "negative", i) for region in regions)
        return out

    def tag_vector(self, triplets: Sequence[Triplet]) -> list[float]:
        """Per tag: 1 positive, −1 uncertain, 0 negative or not mentioned (positive wins)."""
        vec = [0.0] * len(self.tags)
        index = {t: i for i, t in enumerate(self.tags)}
        for t in triplets:
            k = index[t.finding]
            if t.existence == "positive":
                vec[k] = 1.0
            elif t.existence == "uncertain" and vec[k] == 0.0:
                vec[k] = -1.0
        return vec
