"""File readers for the published on-disk formats, raising :class:`DataError` that names the file.

2D: JPEG/PNG (Pillow) and DICOM (pydicom; MONOCHROME1 inverted, RescaleSlope/Intercept applied).
3D: NIfTI (nibabel), HDF5 datasets (h5py, ``path.h5:key``), TIFF stacks (tifffile).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
import gzip
import struct


class DataError(ValueError):
    """A sample or file cannot be used; the message names the file (and row) and what is wrong."""


#: what a reader does with NaN/Inf voxels: ``fail`` (DataError naming the file) or ``zero``
NONFINITE_POLICIES = ("fail", "zero")
#: largest 3D volume read (voxels, channels included; 512³ ≈ 134 M voxels = 537 MB as float32); the shape is read
#: from the header (NIfTI, HDF5, TIFF) before anything is decompressed. Datamodule option ``max_voxels``.
MAX_VOLUME_VOXELS = 512 ** 3
#: largest 2D image decoded (pixels, frames and samples included; the largest real chest radiographs are about
#: 4,300 × 3,500 = 15 Mpx); checked from the PNG/JPEG/DICOM header before decoding. Argument ``max_pixels``.
MAX_IMAGE_PIXELS = 50_000_000
#: largest NIfTI header + extensions (``vox_offset``, bytes) read before the data; real headers are 352 bytes plus
#: at most a few KB of extensions
MAX_HEADER_BYTES = 16 * 2 ** 20


def check_size(path: Path, shape: Any, limit: int | None, unit: str, option: str) -> None:
    """Raise :class:`DataError` naming ``path``, its header ``shape`` and ``limit`` when the shape holds more
    than ``limit`` elements (``None``: no limit)."""
    dims = tuple(int(d) for d in shape)
    n = int(np.prod(dims, dtype=np.float64)) if dims else 0
    if limit is not None and n > limit:
        raise DataError(f"{path}: header shape {dims} is {n:,} {unit}, over the limit of {int(limit):,} ({option}; "
                        f"checked before decompressing)")


def _check_finite(arr: np.ndarray, path: Path, policy: str = "fail") -> np.ndarray:
    bad = ~np.isfinite(arr)
    if bad.any():
        if policy == "zero":
            return np.where(bad, 0, arr)
        raise DataError(f"{path}: {int(bad.sum())} NaN/Inf values (set nonfinite='zero' to replace them)")
    return arr


def read_image_2d(path: str | Path, nonfinite: str = "fail", max_side: int | None = None,
                  full_decode: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read a 2D image as float32 ``(H, W)`` scaled to [0, 1] (min-max).

    DICOM: applies RescaleSlope/Intercept, inverts MONOCHROME1 (as MGCA's RSNA/SIIM loaders), then
    min-max scales. JPEG/PNG: grayscale, min-max scaled.

    With ``max_side`` the image is first reduced so that its longer side is ``max_side`` (the optimised
    path): JPEGs are decoded at a reduced DCT scale (PIL ``draft``, never below the target size), the
    resize is area-averaging (PIL ``BOX``, the analogue of OpenCV's ``INTER_AREA``; bilinear when
    enlarging) and runs on the 8-bit image before any float conversion; min-max then runs on the small
    image. Without it the full-resolution pixels are converted (the reference behaviour).

    ``full_decode`` with ``max_side`` (``decode: full``): every pixel is decoded (no DCT draft) and the
    min-max bounds come from the full-resolution image, but the resize (antialiased bilinear, PIL's
    ``BILINEAR`` widens its support when shrinking, as ``F.interpolate(antialias=True)``) runs on the 8-bit
    image before the float conversion; the result equals the reference to the 8-bit rounding of the resize.

    ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`; ``None``: no limit) is checked against the header's
    size before any pixel is decoded.

    Raises:
        DataError: missing, unreadable or non-2D file, or an image over ``max_pixels``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        if p.suffix.lower() in (".dcm", ".dicom") or _is_dicom(p):
            import pydicom  # lazy: optional format reader (DICOM)

            ds = pydicom.dcmread(str(p))  # the pixel data stays encoded until pixel_array
            check_size(p, _dicom_shape(ds), max_pixels, "pixels", "max_pixels")
            arr = ds.pixel_array.astype(np.float32)
            arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
            if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 3:
                arr = arr.mean(-1)
            if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
                arr = arr.max() - arr
            bounds = (float(arr.min()), float(arr.max())) if full_decode and arr.size else None
            if max_side is not None and arr.ndim == 2:
                arr = _resize_float(arr, max_side, bilinear=full_decode)
        else:

            with Image.open(p) as im:  # reads the header only
                check_size(p, (im.height, im.width), max_pixels, "pixels", "max_pixels")
                if max_side is None:
                    arr = np.asarray(im.convert("L"), dtype=np.float32)
                    bounds = None
                elif full_decode:
                    grey = im.convert("L")
                    lo, hi = grey.getextrema()
                    bounds = (float(lo), float(hi))
                    th, tw = target_shape(grey.height, grey.width, max_side)
                    if (th, tw) != (grey.height, grey.width):
                        grey = grey.resize((tw, th), Image.Resampling.BILINEAR)
                    arr = np.asarray(grey, dtype=np.float32)
                else:
                    arr = np.asarray(_reduce_pil(im, max_side), dtype=np.float32)
                    bounds = None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 2:
        raise DataError(f"{p}: expected a 2D image, got shape {arr.shape}")
    arr = _check_finite(arr, p, nonfinite)
    lo, hi = bounds if bounds is not None and np.isfinite(bounds).all() else (float(arr.min()), float(arr.max()))
    if bounds is not None:
        arr = np.clip(arr, lo, hi)
    return ((arr - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(arr, dtype=np.float32)


def target_shape(h: int, w: int, max_side: int) -> tuple[int, int]:
    """``(h, w)`` scaled so that the longer side is ``max_side`` (rounded, at least 1)."""
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _reduce_pil(im: Any, max_side: int) -> Any:
    """Grayscale PIL image with its longer side ``max_side``: DCT-domain ``draft`` then area resize."""

    th, tw = target_shape(im.height, im.width, max_side)
    if im.format == "JPEG":
        im.draft("L", (tw, th))  # picks the smallest DCT scale whose size is still >= (tw, th)
    im = im.convert("L")
    if (im.height, im.width) == (th, tw):
        return im
    shrink = th < im.height
    return im.resize((tw, th), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)


def _resize_float(arr: np.ndarray, max_side: int, bilinear: bool = False) -> np.ndarray:
    """Area (shrink; antialiased bilinear with ``bilinear``) or bilinear (enlarge) resize of a float image to a
    longer side of ``max_side``."""

    th, tw = target_shape(*arr.shape, max_side)
    if (th, tw) == arr.shape:
        return arr
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
    shrink = th < arr.shape[0] and not bilinear
    return np.asarray(im.resize((tw, th), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR), np.float32)


def image_shape_2d(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of a 2D image from its header, without decoding the pixels.

    Raises:
        DataError: missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        if p.suffix.lower() in (".dcm", ".dicom") or _is_dicom(p):
            import pydicom  # lazy: optional format reader (DICOM)

            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)

        with Image.open(p) as im:
            return int(im.height), int(im.width)
    except Exception as exc:
        raise DataError(f"{p}: cannot read image header ({type(exc).__name__}: {exc})") from exc


def _dicom_shape(ds: Any) -> tuple[int, ...]:
    """Frames × rows × columns of a DICOM dataset, from its header."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return frames, int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)


def _is_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_volume(path: str | Path, key: str | None = None, nonfinite: str = "fail",
                max_voxels: int | None = MAX_VOLUME_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D volume as ``(array, affine)``.

    NIfTI returns the stored array (x, y, z) and its affine; HDF5 reads ``key`` (or ``path.h5:key``);
    TIFF stacks are (z, y, x) with an identity affine. The header's shape is checked against
    ``max_voxels`` (default :data:`MAX_VOLUME_VOXELS`; ``None``: no limit) before any data is decompressed,
    so a small file that expands to gigabytes is refused without reading it.

    Raises:
        DataError: missing/corrupt file, missing HDF5 key, non-3D data, a volume over ``max_voxels``,
            NaN/Inf voxels (policy ``fail``).
    """
    sp = str(path)
    if key is None and ":" in sp and not Path(sp).exists():
        sp, key = sp.rsplit(":", 1)
    p = Path(sp)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    name = p.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib  # lazy: optional format reader (NIfTI)

            check_nifti_header(p)
            img = nib.load(str(p))  # the header; the data stays on disk until read
            check_size(p, img.shape, max_voxels, "voxels", "max_voxels")
            arr, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine
        elif name.endswith((".h5", ".hdf", ".hdf5")):
            import h5py  # lazy: optional format reader (HDF5)

            with h5py.File(p, "r") as f:
                if key is None or key not in f:
                    raise DataError(f"{p}: HDF5 key {key!r} not found (keys: {_h5_keys(f)})")
                check_size(p, f[key].shape, max_voxels, "voxels", "max_voxels")
                arr, affine = np.asarray(f[key], dtype=np.float32), np.eye(4)
        elif name.endswith((".tif", ".tiff")):
            import tifffile  # lazy: optional format reader (TIFF)

            with tifffile.TiffFile(str(p)) as tif:
                series = tif.series[0]
                check_size(p, series.shape, max_voxels, "voxels", "max_voxels")
                arr, affine = series.asarray().astype(np.float32), np.eye(4)
        else:
            raise DataError(f"{p}: unsupported volume format (expected .nii(.gz), .h5/.hdf, .tif)")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot read volume ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (3, 4):
        raise DataError(f"{p}: expected a 3D (or 4D multi-channel) volume, got shape {arr.shape}")
    return _check_finite(arr, p, nonfinite), np.asarray(affine)


def check_nifti_header(path: Path, limit: int = MAX_HEADER_BYTES) -> None:
    """Refuse a NIfTI-1 file whose header declares more than ``limit`` bytes before the data (``vox_offset``:
    header plus extensions), read from its first 348 bytes before the extensions are loaded.

    Raises:
        DataError: naming the file, the declared size and the limit.
    """

    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(348)
    if len(head) < 348:
        return  # too short for NIfTI-1: nibabel names the problem
    for order in ("<", ">"):
        if struct.unpack(f"{order}i", head[:4])[0] == 348:
            offset = struct.unpack(f"{order}f", head[108:112])[0]
            if offset > limit:
                raise DataError(f"{path}: header declares {int(offset):,} bytes before the data (vox_offset), over "
                                f"the limit of {limit:,} (checked before reading the extensions)")
            return


def _h5_keys(f: Any) -> list[str]:
    keys: list[str] = []
    f.visit(lambda k: keys.append(k) if hasattr(f[k], "shape") else None)
    return keys


def rle_decode_siim(rle: str, height: int = 1024, width: int = 1024) -> np.ndarray:
    """Decode SIIM-ACR's *relative* column-major RLE (``-1`` = empty) into a ``(H, W)`` uint8 mask.

    Tokens are (start offset relative to the end of the previous run, run length) pairs over the
    column-major flattened image (MGCA ``rle2mask``; ``mask.reshape(W, H).T``).

    Raises:
        DataError: malformed encodings (odd token count, negative values, runs past the image).
    """
    text = str(rle).strip()
    mask = np.zeros(height * width, np.uint8)
    if text in ("-1", ""):
        return mask.reshape(width, height).T
    try:
        values = [int(v) for v in text.split()]
    except ValueError as exc:
        raise DataError(f"RLE has a non-integer token: {exc}") from exc
    if len(values) % 2:
        raise DataError(f"RLE has an odd number of tokens ({len(values)})")
    pos = 0
    for start, length in zip(values[0::2], values[1::2]):
        if start < 0 or length < 0:
            raise DataError(f"RLE has a negative value (start {start}, length {length})")
        pos += start
        if pos + length > mask.size:
            raise DataError(f"RLE run {pos}+{length} exceeds the {height}x{width} image")
        mask[pos: pos + length] = 1
        pos += length
    return mask.reshape(width, height).T


def resize_2d(img: np.ndarray, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize the longer side to ``size`` and zero-pad to a square (ASG/MGCA 'resize + pad').

    Bilinear shrinking is antialiased (``F.interpolate(antialias=True)``); an image whose longer side
    already is ``size`` is only padded."""
    t = torch.from_numpy(np.ascontiguousarray(img)).float()[None, None]
    h, w = t.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        t = F.interpolate(t, size=(nh, nw), mode=mode, align_corners=False if mode != "nearest" else None,
                          antialias=mode == "bilinear" and scale < 1)
    out = torch.zeros(1, 1, size, size, dtype=t.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[..., top:top + nh, left:left + nw] = t
    return out[0]
