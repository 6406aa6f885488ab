"""A model's own image preprocessing, applied to batches in the medvlp datamodule convention.

medvlp datamodules deliver 1-channel images normalised as ``(x − 0.5) / 0.25`` with ``x ∈ [0, 1]``
(X-ray and phantom data; :data:`MEDVLP_INPUT`). A released model expects its own input: e.g. MGCA 3
channels at 224 px normalised with mean = std = 0.5, BiomedCLIP the OpenAI CLIP mean/std after a bicubic
resize. :class:`Preprocess` maps one to the other on tensors, so every protocol can feed any model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
import numpy as np
import warnings

#: (mean, std) of the medvlp datamodule convention: ``image = (x − mean) / std`` with ``x ∈ [0, 1]``
MEDVLP_INPUT: tuple[float, float] = (0.5, 0.25)
#: ImageNet channel mean and std (``normalize: imagenet`` of the X-ray datamodules; ASG/DeiT inputs)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing spec (stored in exported ``config.json``) and its tensor implementation.

    Args:
        spatial_dims: 2 or 3.
        image_size: side (2D) or ``(D, H, W)`` the model sees after ``resize``/``crop``.
        channels: input channels of the model (grey images are repeated to 3).
        mean: per-channel mean of the model's normalisation (after mapping to ``[0, 1]``).
        std: per-channel std.
        resize: shorter side to resize to before the centre crop (``None``: resize straight to
            ``image_size``; MGCA: 256 then crop 224).
        interpolation: ``bilinear`` | ``bicubic`` | ``trilinear``.
        final_size: optional resize after normalisation (MGCA ResNet: 299 px, bilinear, corners aligned).
        input_mean: mean of the incoming batch's normalisation (the datamodule convention).
        input_std: std of the incoming batch's normalisation.
        window: HU window ``(min, max)`` the model was trained with (documentation for CT models).
        text_max_length: tokens per report.
    """

    spatial_dims: int = 2
    image_size: int | Sequence[int] = 224
    channels: int = 3
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    resize: int | None = None
    interpolation: str = "bilinear"
    final_size: int | None = None
    input_mean: float = MEDVLP_INPUT[0]
    input_std: float = MEDVLP_INPUT[1]
    window: Sequence[float] | None = None
    text_max_length: int = 128
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}")
        return cls(**dict(d))

    def _size(self) -> tuple[int, ...]:
        s = self.image_size
        return tuple(int(v) for v in s) if isinstance(s, Sequence) else (int(s),) * self.spatial_dims

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(B, C, *spatial)`` in the input convention to the model's input."""
        sd = image.ndim - 2
        if sd != self.spatial_dims:
            raise ValueError(f"this model takes {self.spatial_dims}D images, got shape {tuple(image.shape)}")
        x = image.float() * self.input_std + self.input_mean  # back to [0, 1]
        size = self._size()
        mode = self.interpolation if sd == 2 else "trilinear"
        align = None if mode in ("nearest",) else False
        if self.resize is not None:
            shorter = min(x.shape[2:])
            scaled = tuple(max(1, round(s * self.resize / shorter)) for s in x.shape[2:])
            if scaled != tuple(x.shape[2:]):
                x = F.interpolate(x, size=scaled, mode=mode, align_corners=align)
            starts = [(s - c) // 2 for s, c in zip(x.shape[2:], size)]
            if any(st < 0 for st in starts):
                raise ValueError(f"crop {size} is larger than the resized image {tuple(x.shape[2:])}")
            x = x[(..., *[slice(st, st + c) for st, c in zip(starts, size)])]
        elif tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode=mode, align_corners=align)
        if x.shape[1] == 1 and self.channels > 1:
            x = x.expand(-1, self.channels, *x.shape[2:])
        elif x.shape[1] != self.channels:
            raise ValueError(f"model takes {self.channels} channels, got {x.shape[1]}")
        shape = (1, self.channels) + (1,) * sd
        mean = torch.as_tensor(list(self.mean), dtype=x.dtype, device=x.device).reshape(shape)
        std = torch.as_tensor(list(self.std), dtype=x.dtype, device=x.device).reshape(shape)
        x = (x - mean) / std
        if self.final_size is not None:
            x = F.interpolate(x, size=(self.final_size,) * sd, mode="bilinear" if sd == 2 else "trilinear",
                              align_corners=True)
        return x

    def image(self, raw: Any, bit_depth: int | None = None, scale: str = "dtype") -> torch.Tensor:
        """A model-ready batch of one image from a raw array, tensor or PIL image.

        ``raw`` is ``(H, W)``, ``(H, W, C)`` (2D) or ``(D, H, W)`` (3D). Integer images are scaled to ``[0, 1]``
        by their bit depth: the dtype's (uint8 by 255, a 16-bit PNG by 65535) or ``bit_depth``'s (e.g. 12 for
        12-bit radiographs stored in 16 bits). ``scale="minmax"`` maps the image's own minimum and maximum to
        0 and 1 instead, as the medvlp datamodules read files. CT values are windowed with :attr:`window` when
        it is set; other floats are taken as ``[0, 1]``. Colour images are averaged to grey for 1-channel
        models.

        Args:
            raw: the image.
            bit_depth: stored bits of an integer image (default: the dtype's).
            scale: ``"dtype"`` (bit depth) or ``"minmax"``.

        Raises:
            ValueError: for an unknown ``scale``, a ``bit_depth`` on a float image, or values beyond
                ``bit_depth``.
        """


        if scale not in ("dtype", "minmax"):
            raise ValueError(f"scale must be 'dtype' or 'minmax', got {scale!r}")
        arr = np.asarray(raw)
        x = _to_unit(arr, bit_depth, scale, self.window is not None)
        if (scale == "dtype" and bit_depth is None and self.window is None and arr.dtype.kind in "iu"
                and arr.dtype.itemsize > 1 and 0 < float(x.max()) < 0.25):
            warnings.warn(f"preprocess.image: this {arr.dtype} image uses {x.max():.0%} of its range (max "
                          f"{int(arr.max())}); if it holds fewer bits, pass bit_depth=N (e.g. 12) or scale='minmax'",
                          stacklevel=2)
        if self.window is not None:
            lo, hi = float(self.window[0]), float(self.window[1])
            x = ((x - lo) / (hi - lo)).clamp(0, 1)
        if self.spatial_dims == 2 and x.ndim == 3:  # (H, W, C)
            x = x.mean(-1) if self.channels == 1 else x.movedim(-1, 0)
        if x.ndim == self.spatial_dims:
            x = x.unsqueeze(0)
        return replace(self, input_mean=0.0, input_std=1.0)(x.unsqueeze(0))


def _to_unit(arr: Any, bit_depth: int | None, scale: str, windowed: bool) -> torch.Tensor:
    """``arr`` as float32 in ``[0, 1]`` (integers by bit depth or min-max); windowed CT values stay raw."""

    if scale == "minmax":
        a = arr.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        return torch.from_numpy((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a))
    if arr.dtype.kind in "iu" and not windowed:
        if arr.dtype == np.bool_:
            return torch.from_numpy(arr.astype(np.float32))
        top = float(2 ** bit_depth - 1) if bit_depth is not None else float(np.iinfo(arr.dtype).max)
        if bit_depth is not None and float(arr.max()) > top:
            raise ValueError(f"preprocess.image: values up to {int(arr.max())} exceed bit_depth={bit_depth}")
        low = float(np.iinfo(arr.dtype).min) if arr.dtype.kind == "i" and bit_depth is None else 0.0
        return torch.from_numpy(((arr.astype(np.float64) - low) / (top - low)).astype(np.float32))
    if bit_depth is not None:
        raise ValueError(f"preprocess.image: bit_depth applies to integer images, got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
