"""RoI Align over feature maps without torchvision, with ``torchvision.ops.roi_align`` semantics.

ASG's official code calls ``torchvision.ops.roi_align(patch_map, boxes, (1, 1), spatial_scale=1.0)`` on
boxes already scaled to the 14×14 patch grid (``sampling_ratio=-1``, ``aligned=False``). This module
reproduces that operator for a ``1×1`` output: the adaptive sampling grid (``ceil(roi size)`` points per
side), the ``aligned=False`` box convention (no half-pixel shift, box sides at least one cell) and the
bilinear rule of torchvision's kernel (points beyond one cell outside the map contribute zero but are
still counted; points are clamped to the map's last row/column).
"""
from __future__ import annotations

from typing import Sequence

import torch


def _axis(coord: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's per-axis bilinear set-up: (low index, high index, weight of high, valid)."""
    valid = (coord >= -1.0) & (coord <= size)
    c = coord.clamp_min(0.0)
    low = c.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    c = torch.where(edge, low.to(c.dtype), c)
    return low, high, c - low.to(c.dtype), valid


def roi_align(feature_map: torch.Tensor, boxes: torch.Tensor, spatial_scale: float | Sequence[float],
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """RoI Align with a ``1×1`` output per box (average of bilinear samples inside the box).

    Args:
        feature_map: ``(B, D, h, w)`` (e.g. projected ViT patch embeddings on the 14×14 grid).
        boxes: ``(B, R, 4)`` ``x1, y1, x2, y2`` in input-image pixels.
        spatial_scale: feature cells per pixel, one value or ``(scale_x, scale_y)`` (ASG: 14 / 224).
        sampling_ratio: sample points per box side; ``≤ 0`` = adaptive ``ceil(box size in cells)``
            per box, as torchvision's default.
        aligned: torchvision's ``aligned`` flag (half-pixel shift; ASG uses ``False``).

    Returns:
        ``(B, R, D)`` region features.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != feature_map.shape[0]:
        raise ValueError(f"boxes must be (B, R, 4) with B={feature_map.shape[0]}, got {tuple(boxes.shape)}")
    b, d, h, w = feature_map.shape
    r = boxes.shape[1]
    sx, sy = (spatial_scale, spatial_scale) if isinstance(spatial_scale, (int, float)) else spatial_scale
    offset = 0.5 if aligned else 0.0
    bx = boxes.to(feature_map.dtype)
    x1, y1 = bx[..., 0] * sx - offset, bx[..., 1] * sy - offset
    rw, rh = bx[..., 2] * sx - offset - x1, bx[..., 3] * sy - offset - y1
    if not aligned:  # torchvision forces malformed/small boxes to one cell
        rw, rh = rw.clamp_min(1.0), rh.clamp_min(1.0)
    if sampling_ratio > 0:
        nx = torch.full_like(rw, sampling_ratio)
        ny = torch.full_like(rh, sampling_ratio)
    else:
        nx, ny = rw.ceil().clamp_min(1.0), rh.ceil().clamp_min(1.0)
    mx, my = int(nx.max().item()) if r else 1, int(ny.max().item()) if r else 1
    ix = torch.arange(mx, device=bx.device, dtype=bx.dtype)
    iy = torch.arange(my, device=bx.device, dtype=bx.dtype)
    xs = x1[..., None] + (ix + 0.5) * (rw / nx)[..., None]  # (B, R, Sx)
    ys = y1[..., None] + (iy + 0.5) * (rh / ny)[..., None]  # (B, R, Sy)
    xl, xh, lx, vx = _axis(xs, w)
    yl, yh, ly, vy = _axis(ys, h)
    use_x = (ix < nx[..., None]) & vx
    use_y = (iy < ny[..., None]) & vy
    flat = feature_map.reshape(b, d, h * w)
    out = feature_map.new_zeros(b, d, r)
    for yi, wy in ((yl, 1 - ly), (yh, ly)):
        for xi, wx in ((xl, 1 - lx), (xh, lx)):
            idx = (yi[..., :, None] * w + xi[..., None, :]).reshape(b, 1, -1)  # (B, 1, R*Sy*Sx)
            vals = flat.gather(2, idx.expand(-1, d, -1)).reshape(b, d, r, my, mx)
            weight = (wy * use_y)[..., :, None] * (wx * use_x)[..., None, :]  # (B, R, Sy, Sx)
            out = out + (vals * weight.unsqueeze(1)).sum((-1, -2))
    return (out / (nx * ny).unsqueeze(1)).transpose(1, 2)
