"""Reference-protocol image views on batches from a datamodule: intensity renormalisation, crops,
flips and channel replication, applied on tensors so every protocol reuses the datamodules' readers.

A datamodule declares its normalisation as ``intensity_norm = (mean, std)`` on [0, 1] intensities
(X-ray and phantom: ``(0.5, 0.25)``); :func:`renormalise` maps its images to another convention (MGCA
and BenchX: ``(0.5, 0.5)``, i.e. [−1, 1]).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset


def renormalise(x: torch.Tensor, datamodule: Any, mean: float = 0.5, std: float = 0.5) -> tuple[torch.Tensor, str]:
    """Images normalised as ``(v − mean) / std`` on [0, 1] intensities, and a sentence saying what was done.

    A datamodule without ``intensity_norm`` keeps its own normalisation (the sentence says so).
    """
    norm = getattr(datamodule, "intensity_norm", None)
    if norm is None:
        return x, f"{type(datamodule).__name__}'s own normalisation (it declares no intensity_norm)"
    m0, s0 = norm
    return ((x * s0 + m0) - mean) / std, f"normalised (v − {mean:g}) / {std:g} on [0, 1] intensities"


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One independent random ``size × size`` crop per image (torchvision ``RandomCrop``)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"random crop {size} larger than the image {h}x{w}")
    out = []
    for img in x:
        top = int(torch.randint(h - size + 1, (1,), generator=generator))
        left = int(torch.randint(w - size + 1, (1,), generator=generator))
        out.append(img[..., top:top + size, left:left + size])
    return torch.stack(out)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``size × size`` crop (torchvision ``CenterCrop`` rounding)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center crop {size} larger than the image {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def random_resized_crop_flip(x: torch.Tensor, size: int, generator: torch.Generator,
                             scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                             flip_p: float = 0.5) -> torch.Tensor:
    """torchvision ``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip(flip_p)`` per image
    (10 area/ratio attempts, then the central crop as fallback, as torchvision)."""
    h, w = x.shape[-2:]
    area = h * w
    out = []
    for img in x:
        box = None
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
            log_r = (math.log(ratio[0]), math.log(ratio[1]))
            aspect = math.exp(float(torch.empty(1).uniform_(log_r[0], log_r[1], generator=generator)))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(h - ch + 1, (1,), generator=generator))
                left = int(torch.randint(w - cw + 1, (1,), generator=generator))
                box = (top, left, ch, cw)
                break
        if box is None:
            s = min(h, w)
            box = ((h - s) // 2, (w - s) // 2, s, s)
        top, left, ch, cw = box
        crop = img[None, ..., top:top + ch, left:left + cw]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        if float(torch.rand(1, generator=generator)) < flip_p:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a square batch to ``size × size``."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Replicate a grey channel to ``channels`` (MGCA/BenchX read X-rays as 3-channel RGB copies)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] != 1:
        raise ValueError(f"cannot map {x.shape[1]} image channels to {channels}")
    return x.expand(-1, channels, *x.shape[2:])


def encoder_channels(model: Any) -> int:
    """Input channels the model's image encoder expects (``in_channels``; 1 when it does not say)."""
    return int(getattr(model.image_backbone(), "in_channels", 1))


def subset_loader(datamodule: Any, split: str, rows: Sequence[int] | None, batch_size: int, shuffle: bool,
                  seed: int, drop_last: bool = False) -> DataLoader:
    """Non-augmented loader over ``rows`` of a split (all rows when ``None``); shuffled with a seeded
    generator when ``shuffle``; ``drop_last`` drops the incomplete last batch (MGCA's train and val
    loaders). Augmentation is applied by the protocol on the returned batches."""
    ds = datamodule.dataset(split, augment=False)
    if rows is not None:
        ds = Subset(ds, list(rows))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=datamodule.num_workers,
                      collate_fn=datamodule.collate_fn, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


def batch_ids(batch: dict[str, Any], start: int) -> list[str]:
    """Sample ids of a batch (``meta.id``, else positions from ``start``)."""
    metas = batch.get("meta") or [{}] * len(batch["image"])
    return [str(m.get("id", start + i)) for i, m in enumerate(metas)]


def split_ids(datamodule: Any, split: str) -> list[str]:
    """Sample ids of a split in record order (``meta.id``, else the position)."""
    ds = datamodule.dataset(split, augment=False)
    records = getattr(ds, "records", None)
    if records is not None and all("id" in r for r in records):
        return [str(r["id"]) for r in records]
    ids = []
    for batch in datamodule.eval_dataloader(split):
        if batch is None:
            continue
        ids.extend(str(m.get("id", len(ids) + i)) for i, m in enumerate(batch.get("meta") or [{}] * len(batch["image"])))
    return ids


def shift_scale_rotate(x: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, scale_limit: float = 0.1,
                       rotate_limit: float = 10.0, p: float = 0.5, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """albumentations ``ShiftScaleRotate(shift_limit=0, scale_limit, rotate_limit, p,
    border_mode=BORDER_CONSTANT)`` per image: with probability ``p`` a rotation by U(−rotate_limit,
    rotate_limit) degrees and a zoom by U(1−scale_limit, 1+scale_limit) about the centre; image
    bilinear with ``fill`` outside, mask nearest with 0 outside."""
    out_x, out_m = x.clone(), mask.clone()
    for i in range(x.shape[0]):
        if float(torch.rand(1, generator=generator)) >= p:
            continue
        angle = math.radians(float(torch.empty(1).uniform_(-rotate_limit, rotate_limit, generator=generator)))
        scale = float(torch.empty(1).uniform_(1 - scale_limit, 1 + scale_limit, generator=generator))
        c, s = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype)[None]
        grid = F.affine_grid(theta, [1, 1, *x.shape[-2:]], align_corners=False)
        img = F.grid_sample(x[i:i + 1] - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        msk = F.grid_sample(mask[i:i + 1].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        out_x[i], out_m[i] = img[0], msk[0].to(mask.dtype)
    return out_x, out_m
