"""RoI Align over token feature maps without torchvision (bilinear sampling with ``grid_sample``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def roi_align(feature_map: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
              samples: int = 2) -> torch.Tensor:
    """Average of ``samples × samples`` bilinear samples inside each box (RoIAlign, 1×1 output).

    Args:
        feature_map: ``(B, D, h, w)`` (e.g. ViT patch tokens reshaped to the 14×14 grid).
        boxes: ``(B, R, 4)`` ``x1, y1, x2, y2`` in pixels of the input image.
        image_size: ``(H, W)`` of the input image.
        samples: sampling points per box side.

    Returns:
        ``(B, R, D)`` region features.
    """
    b, d, _, _ = feature_map.shape
    r = boxes.shape[1]
    h_img, w_img = image_size
    t = (torch.arange(samples, device=boxes.device, dtype=feature_map.dtype) + 0.5) / samples
    x1, y1, x2, y2 = boxes.to(feature_map.dtype).unbind(-1)  # (B, R)
    xs = x1[..., None] + (x2 - x1)[..., None] * t  # (B, R, S)
    ys = y1[..., None] + (y2 - y1)[..., None] * t
    # pixel → normalised [-1, 1] with align_corners=False semantics
    gx = (xs + 0.5) / w_img * 2 - 1
    gy = (ys + 0.5) / h_img * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[..., None, :], gy[..., :, None]), dim=-1)  # (B, R, S, S, 2)
    grid = grid.reshape(b, r * samples, samples, 2)
    # torchvision RoIAlign clamps sample points into the map: border padding, not zeros
    sampled = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.reshape(b, d, r, samples * samples).mean(-1).transpose(1, 2)
