"""Procedural renderers of the embedded phantom dataset: chest X-ray, chest CT, brain MRI, EM.

Each ``render_*`` function takes a ``numpy.random.Generator`` and returns a :class:`PhantomCase` with
the image in ``[0, 1]``, a lesion mask, the ground-truth findings (with their anatomical location),
region boxes (X-ray) and instance labels (EM). The findings change the image; the report writer in
:mod:`medvlp.datamodules.phantom.reports` turns the same findings into text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage
import logging

XRAY_LABELS = ["Consolidation", "Pleural Effusion", "Cardiomegaly", "Pneumothorax", "Lung Nodule"]
CT_LABELS = ["Lung nodule", "Pleural effusion", "Consolidation", "Cardiomegaly", "Emphysema"]
MRI_LABELS = ["Tumour", "Edema", "Hemorrhage"]
EM_LABELS = ["Mitochondria", "Synaptic vesicles", "Myelinated axon"]
XRAY_REGIONS = [
    "right upper lung zone", "right mid lung zone", "right lower lung zone",
    "left upper lung zone", "left mid lung zone", "left lower lung zone",
    "right apical zone", "left apical zone", "right costophrenic angle", "left costophrenic angle",
    "cardiac silhouette", "mediastinum",
]


@dataclass
class Finding:
    """One finding: label name, side (``right``/``left``/``""``), zone (``upper``/…/``""``), size word."""

    label: str
    side: str = ""
    zone: str = ""
    size: str = ""
    slices: tuple[int, int] | None = None  # 3D: first/last slice index containing the lesion


@dataclass
class PhantomCase:
    """A rendered case."""

    image: np.ndarray
    mask: np.ndarray
    findings: list[Finding]
    labels: np.ndarray
    boxes: np.ndarray | None = None
    instances: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return list(np.meshgrid(*[np.linspace(0.0, 1.0, s, dtype=np.float32) for s in shape], indexing="ij"))


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Global nuisance: gamma, contrast, brightness, noise; clip to [0, 1]."""
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img = (img - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.06, 0.06)
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------ X-ray
def render_xray(rng: np.random.Generator, size: int = 64, prevalence: float = 0.3) -> PhantomCase:
    """A frontal chest radiograph: body, lungs with vessel texture, ribs, spine, heart, diaphragm.

    Findings (each with probability ``prevalence``): consolidation (lung zone), pleural effusion (side),
    cardiomegaly (cardiothoracic ratio > 0.5), pneumothorax (apical, side), lung nodule (zone).
    Image left is patient right (radiographic convention).
    """
    s = size
    yy, xx = _grid((s, s))
    jit = lambda a: rng.uniform(-a, a)  # noqa: E731
    cy, cx = 0.47 + jit(0.03), 0.5 + jit(0.03)
    scale = rng.uniform(0.92, 1.06)
    img = np.zeros((s, s), np.float32) + 0.05
    body = _ellipse(yy, xx, cy + 0.05, cx, 0.52 * scale, 0.46 * scale)
    img[body] = 0.55
    lungs: dict[str, dict[str, float]] = {}
    lung_mask = np.zeros((s, s), bool)
    side_mask = {}
    for side, sx in (("right", -1), ("left", 1)):
        lcx = cx + sx * 0.19 * scale + jit(0.01)
        lcy = cy - 0.02 + jit(0.01)
        ry, rx = 0.30 * scale + jit(0.02), 0.135 * scale + jit(0.01)
        m = _ellipse(yy, xx, lcy, lcx, ry, rx) & (yy < lcy + ry * 0.85)
        lungs[side] = {"cx": lcx, "cy": lcy, "ry": ry, "rx": rx, "top": lcy - ry, "bottom": lcy + ry * 0.85}
        side_mask[side] = m
        lung_mask |= m
    texture = 0.05 * _smooth_noise(rng, (s, s), 1.2)
    img[lung_mask] = 0.16 + texture[lung_mask]
    # ribs: curved bright bands over the lungs
    for k in range(7):
        y0 = cy - 0.28 * scale + k * 0.085 * scale
        band = np.abs(yy - (y0 + 0.06 * (xx - cx) ** 2 * 4)) < 0.012
        img[band & body] += 0.12
    spine = (np.abs(xx - cx) < 0.045) & body
    img[spine] = np.maximum(img[spine], 0.72)
    labels = rng.random(len(XRAY_LABELS)) < prevalence
    findings: list[Finding] = []
    lesion = np.zeros((s, s), bool)
    # heart (cardiomegaly widens it)
    cardio = bool(labels[2])
    hrx = (rng.uniform(0.17, 0.21) if cardio else rng.uniform(0.10, 0.135)) * scale
    hcy, hcx = cy + 0.13 * scale, cx + 0.035
    heart = _ellipse(yy, xx, hcy, hcx, 0.13 * scale, hrx)
    img[heart] = np.maximum(img[heart], 0.68)
    if cardio:
        findings.append(Finding("Cardiomegaly", size=["mild", "moderate"][int(hrx > 0.19 * scale)]))
    # diaphragm below lungs is soft tissue already (body value); add a bright dome edge
    for side in ("right", "left"):
        lg = lungs[side]
        dome = np.abs(yy - lg["bottom"] - 0.01) < 0.01
        img[dome & (np.abs(xx - lg["cx"]) < lg["rx"])] += 0.08
    zones = ("upper", "mid", "lower")

    def zone_center(side: str, zone: str) -> tuple[float, float]:
        lg = lungs[side]
        frac = {"upper": 0.22, "mid": 0.5, "lower": 0.76}[zone]
        return lg["top"] + frac * (lg["bottom"] - lg["top"]), lg["cx"] + jit(0.03)

    if labels[0]:
        side, zone = rng.choice(["right", "left"]), rng.choice(zones)
        zy, zx = zone_center(side, zone)
        sig = rng.uniform(0.045, 0.075)
        blob = np.exp(-(((yy - zy) ** 2 + (xx - zx) ** 2) / (2 * sig**2)))
        amp = rng.uniform(0.3, 0.45)
        img += amp * blob * side_mask[side]
        lesion |= (blob > 0.35) & side_mask[side]
        findings.append(Finding("Consolidation", side, zone, "patchy" if sig < 0.06 else "large"))
    if labels[1]:
        side = rng.choice(["right", "left"])
        lg = lungs[side]
        height = rng.uniform(0.10, 0.22)
        level = lg["bottom"] - height + 0.05 * ((xx - lg["cx"]) / lg["rx"]) * (1 if side == "left" else -1)
        fluid = side_mask[side] & (yy > level)
        img[fluid] = 0.58 + 0.02 * texture[fluid]
        lesion |= fluid
        findings.append(Finding("Pleural Effusion", side, "lower", "small" if height < 0.16 else "moderate"))
    if labels[3]:
        side = rng.choice(["right", "left"])
        lg = lungs[side]
        sx = -1 if side == "right" else 1
        pcy, pcx = lg["top"] + 0.12, lg["cx"] + sx * 0.06
        ptx = side_mask[side] & _ellipse(yy, xx, pcy, pcx, rng.uniform(0.10, 0.16), rng.uniform(0.07, 0.1))
        img[ptx] = 0.05
        edge = ptx ^ ndimage.binary_erosion(ptx)
        img[edge] = 0.45
        lesion |= ptx
        findings.append(Finding("Pneumothorax", side, "apical", "small"))
    if labels[4]:
        side, zone = rng.choice(["right", "left"]), rng.choice(zones)
        zy, zx = zone_center(side, zone)
        r = rng.uniform(0.022, 0.035)
        nod = _ellipse(yy, xx, zy, zx, r, r) & side_mask[side]
        img[nod] += 0.38
        lesion |= nod
        findings.append(Finding("Lung Nodule", side, zone, "small"))
    img = ndimage.gaussian_filter(img, 0.6)
    boxes = _xray_boxes(lungs, (hcy, hcx, 0.13 * scale, hrx), cx, s)
    return PhantomCase(_finish(img, rng, 0.03), lesion.astype(np.uint8), findings, labels.astype(np.float32),
                       boxes=boxes)


def _xray_boxes(lungs: dict[str, dict[str, float]], heart: tuple[float, float, float, float], cx: float,
                s: int) -> np.ndarray:
    """Boxes ``x1, y1, x2, y2`` (pixels) for :data:`XRAY_REGIONS`."""
    out = []
    for side in ("right", "left"):
        lg = lungs[side]
        x1, x2 = lg["cx"] - lg["rx"], lg["cx"] + lg["rx"]
        h = (lg["bottom"] - lg["top"]) / 3
        for k in range(3):
            out.append((side, k, (x1, lg["top"] + k * h, x2, lg["top"] + (k + 1) * h)))
    boxes = [b for _, _, b in out]
    for side in ("right", "left"):
        lg = lungs[side]
        boxes.append((lg["cx"] - lg["rx"], lg["top"], lg["cx"] + lg["rx"], lg["top"] + 0.12))
    for side in ("right", "left"):
        lg = lungs[side]
        outer = lg["cx"] - lg["rx"] if side == "right" else lg["cx"] + lg["rx"] - 0.12
        boxes.append((outer, lg["bottom"] - 0.12, outer + 0.12, lg["bottom"] + 0.02))
    hcy, hcx, hry, hrx = heart
    boxes.append((hcx - hrx, hcy - hry, hcx + hrx, hcy + hry))
    boxes.append((cx - 0.07, 0.15, cx + 0.07, hcy - hry + 0.04))
    arr = np.clip(np.asarray(boxes, np.float32), 0.0, 1.0) * (s - 1)
    return arr


# ------------------------------------------------------------------------------------ CT
def render_ct(rng: np.random.Generator, shape: tuple[int, int, int] = (32, 64, 64),
              prevalence: float = 0.3) -> PhantomCase:
    """A chest CT volume ``(D, H, W)`` in a [-1000, 400] HU window mapped to [0, 1].

    Axial slices go from lung apex (slice 0) to base. Findings: lung nodule (sphere in a few slices),
    pleural effusion (dependent posterior fluid in lower slices), consolidation, cardiomegaly, emphysema
    (low-attenuation holes). ``Finding.slices`` records the lesion's slice range (UniMedI tests).
    """
    d, h, w = shape
    zz, yy, xx = _grid(shape)

    def hu(v: float) -> float:
        return (v + 1000.0) / 1400.0

    jit = lambda a: rng.uniform(-a, a)  # noqa: E731
    vol = np.full(shape, hu(-1000), np.float32)
    body = ((yy - 0.5) / (0.42 + jit(0.02))) ** 2 + ((xx - 0.5) / (0.47 + jit(0.02))) ** 2 <= 1
    vol[body] = hu(40)
    spine = ((yy - 0.82) / 0.07) ** 2 + ((xx - 0.5) / 0.06) ** 2 <= 1
    vol[spine] = hu(700)
    lung = {}
    lung_all = np.zeros(shape, bool)
    for side, sx in (("right", -1), ("left", 1)):
        taper = 0.6 + 0.4 * np.clip(zz * 1.6, 0, 1)  # apex smaller
        m = (((yy - 0.47) / (0.28 * taper)) ** 2 + ((xx - (0.5 + sx * 0.2)) / (0.15 * taper)) ** 2 <= 1) & body
        lung[side] = m
        lung_all |= m
    tex = _smooth_noise(rng, shape, 1.0)
    vol[lung_all] = hu(-850) + 0.02 * tex[lung_all]
    labels = rng.random(len(CT_LABELS)) < prevalence
    findings: list[Finding] = []
    lesion = np.zeros(shape, bool)
    cardio = bool(labels[3])
    hr = rng.uniform(0.2, 0.24) if cardio else rng.uniform(0.12, 0.15)
    heart = (((yy - 0.45) / hr) ** 2 + ((xx - 0.55) / (hr * 1.1)) ** 2 + ((zz - 0.7) / 0.3) ** 2) <= 1
    vol[heart] = hu(45)
    if cardio:
        findings.append(Finding("Cardiomegaly"))
    aorta = ((yy - 0.62) / 0.05) ** 2 + ((xx - 0.45) / 0.05) ** 2 <= 1
    vol[aorta] = hu(50)

    def lobe(z: float) -> str:
        return "upper" if z < 0.38 else ("middle" if z < 0.66 else "lower")

    if labels[0]:
        side = rng.choice(["right", "left"])
        zc = rng.uniform(0.15, 0.85)
        r = rng.uniform(0.035, 0.06)
        cand = np.argwhere(lung[side][int(zc * (d - 1))])
        if len(cand):
            cy, cx = cand[rng.integers(len(cand))] / np.array([h - 1, w - 1])
            rz = max(r * 0.7, 1.0 / d)
            sph = ((zz - zc) / rz) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1
            vol[sph] = hu(30)
            lesion |= sph
            zs = np.where(sph.any(axis=(1, 2)))[0]
            findings.append(Finding("Lung nodule", side, lobe(zc), f"{int(r * 300)} mm",
                                    (int(zs.min()), int(zs.max()))))
    if labels[1]:
        side = rng.choice(["right", "left"])
        level = rng.uniform(0.62, 0.72)
        fluid = lung[side] & (yy > level) & (zz > 0.45)
        vol[fluid] = hu(10)
        lesion |= fluid
        zs = np.where(fluid.any(axis=(1, 2)))[0]
        if len(zs):
            findings.append(Finding("Pleural effusion", side, "lower", "small", (int(zs.min()), int(zs.max()))))
    if labels[2]:
        side = rng.choice(["right", "left"])
        zc = rng.uniform(0.3, 0.8)
        blob = np.exp(-((zz - zc) ** 2 / 0.01 + (yy - 0.45) ** 2 / 0.01 + (xx - (0.5 + (0.2 if side == "left" else -0.2))) ** 2 / 0.006))
        cons = lung[side] & (blob > 0.3)
        vol[cons] = hu(-100) + 0.03 * tex[cons]
        lesion |= cons
        zs = np.where(cons.any(axis=(1, 2)))[0]
        if len(zs):
            findings.append(Finding("Consolidation", side, lobe(zc), "", (int(zs.min()), int(zs.max()))))
    if labels[4]:
        holes = (_smooth_noise(rng, shape, 1.5) > 1.3) & lung_all
        vol[holes] = hu(-990)
        findings.append(Finding("Emphysema", "", "upper" if rng.random() < 0.5 else "", "centrilobular"))
    labels = np.array([any(f.label == n for f in findings) for n in CT_LABELS], np.float32)
    return PhantomCase(_finish(vol, rng, 0.02), lesion.astype(np.uint8), findings, labels)


# ------------------------------------------------------------------------------------ MRI
@lru_cache(maxsize=4)
def _mni_template(shape: tuple[int, int, int]) -> np.ndarray:
    """The real MNI152 T1 template that nilearn ships, resampled to ``shape`` (axial-first) in [0, 1].

    Falls back to a procedural head when nilearn is not installed.
    """
    try:
        from nilearn import datasets  # lazy: optional extra (medvlp[mri])

        data = np.asarray(datasets.load_mni152_template().get_fdata(), np.float32)  # (x, y, z)
        data = np.transpose(data, (2, 1, 0))[::-1, ::-1]  # → (z, y, x), superior first, anterior up
        zoom = [t / s for t, s in zip(shape, data.shape)]
        data = ndimage.zoom(data, zoom, order=1)
        return (data / max(float(data.max()), 1e-6)).astype(np.float32)
    except ImportError:

        logging.getLogger(__name__).warning(
            "nilearn is not installed: phantom MRI uses a procedural head instead of the MNI152 template "
            "(pip install 'medvlp[mri]' for the template)")
        zz, yy, xx = _grid(shape)
        head = ((zz - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.38) ** 2 <= 1
        brain = ((zz - 0.5) / 0.4) ** 2 + ((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.33) ** 2 <= 1
        return (0.3 * head + 0.4 * brain).astype(np.float32)


def render_mri(rng: np.random.Generator, shape: tuple[int, int, int] = (32, 64, 64),
               prevalence: float = 0.35) -> PhantomCase:
    """A T1-like brain MRI from the MNI152 template with bias field, plus tumour (enhancing rim,
    necrotic core), peritumoural edema and hemorrhage (dark focus)."""
    base = _mni_template(tuple(shape))
    vol = base * (1 + 0.15 * _smooth_noise(rng, shape, 6.0))  # bias field
    zz, yy, xx = _grid(shape)
    brain = base > 0.25
    labels = rng.random(len(MRI_LABELS)) < prevalence
    labels[1] = labels[1] and labels[0]  # edema only around a tumour
    findings: list[Finding] = []
    lesion = np.zeros(shape, np.uint8)

    def where(cy: float, cx: float) -> tuple[str, str]:
        side = "right" if cx < 0.5 else "left"
        lobe_name = "frontal" if cy < 0.4 else ("parietal" if cy < 0.65 else "occipital")
        return side, lobe_name

    if labels[0]:
        cand = np.argwhere(brain & (zz > 0.25) & (zz < 0.75))
        cz, cy, cx = cand[rng.integers(len(cand))] / (np.array(shape) - 1)
        r = rng.uniform(0.06, 0.1)
        dist = np.sqrt(((zz - cz) / r) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2)
        if labels[1]:
            edema = (dist <= 1.8) & brain
            vol[edema] = vol[edema] * 0.75
            lesion[edema] = 2
        vol[dist <= 1] = 0.95
        vol[dist <= 0.6] = 0.2
        lesion[dist <= 1] = 1
        side, lb = where(cy, cx)
        zs = np.where((dist <= 1).any(axis=(1, 2)))[0]
        findings.append(Finding("Tumour", side, lb, "large" if r > 0.08 else "small", (int(zs.min()), int(zs.max()))))
        if labels[1]:
            findings.append(Finding("Edema", side, lb))
    if labels[2]:
        cand = np.argwhere(brain)
        cz, cy, cx = cand[rng.integers(len(cand))] / (np.array(shape) - 1)
        r = rng.uniform(0.03, 0.05)
        foc = ((zz - cz) / r) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1
        vol[foc] = 0.03
        lesion[foc & (lesion == 0)] = 1
        side, lb = where(cy, cx)
        findings.append(Finding("Hemorrhage", side, lb, "small"))
    labels = np.array([any(f.label == n for f in findings) for n in MRI_LABELS], np.float32)
    return PhantomCase(_finish(vol, rng, 0.02), lesion, findings, labels)


# ------------------------------------------------------------------------------------ EM
def render_em(rng: np.random.Generator, shape: tuple[int, int, int] = (32, 64, 64),
              prevalence: float = 0.5) -> PhantomCase:
    """An EM-like neuropil volume: Voronoi cells with dark membranes (instance labels), optional
    mitochondria (dark textured ellipsoids), synaptic vesicle clusters, and a myelinated axon."""
    zz, yy, xx = _grid(shape)
    n_cells = int(rng.integers(12, 28))
    seeds = rng.random((n_cells, 3)).astype(np.float32)
    aniso = np.array([0.5, 1.0, 1.0], np.float32)  # EM is anisotropic (thicker z sections)
    pts = np.stack([zz, yy, xx], -1).reshape(-1, 3)
    dist = (((pts[:, None, :] - seeds[None]) * aniso) ** 2).sum(-1)
    order = np.argsort(dist, axis=1)[:, :2]
    d_sorted = np.take_along_axis(dist, order, 1)
    inst = (order[:, 0] + 1).reshape(shape).astype(np.int32)
    gap = (np.sqrt(d_sorted[:, 1]) - np.sqrt(d_sorted[:, 0])).reshape(shape)
    vol = 0.62 + 0.05 * _smooth_noise(rng, shape, 1.0)
    membrane = gap < 0.025
    vol[membrane] = 0.18
    inst[membrane] = 0
    labels = rng.random(len(EM_LABELS)) < prevalence
    findings: list[Finding] = []
    mito = np.zeros(shape, bool)
    if labels[0]:
        count = int(rng.integers(3, 8))
        for _ in range(count):
            c = rng.random(3)
            r = np.array([0.12, 0.05, 0.09]) * rng.uniform(0.8, 1.3)
            m = (((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2) <= 1
            mito |= m & ~membrane
        vol[mito] = 0.3 + 0.08 * np.sin(xx[mito] * 90)
        findings.append(Finding("Mitochondria", size="numerous" if count > 5 else "several"))
    if labels[1]:
        c = rng.random(3)
        for _ in range(25):
            p = c + rng.normal(0, 0.04, 3)
            v = ((zz - p[0]) / 0.04) ** 2 + ((yy - p[1]) / 0.02) ** 2 + ((xx - p[2]) / 0.02) ** 2 <= 1
            vol[v] = 0.35
        findings.append(Finding("Synaptic vesicles", size="clustered"))
    if labels[2]:
        cy, cx, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.08, 0.12)
        rr = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        sheath = (rr > r) & (rr < r * 1.5)
        vol[sheath] = 0.08
        inst[sheath] = 0
        findings.append(Finding("Myelinated axon"))
    vol = ndimage.gaussian_filter(vol, 0.5)
    return PhantomCase(_finish(vol, rng, 0.03), mito.astype(np.uint8), findings, labels.astype(np.float32),
                       instances=inst)
