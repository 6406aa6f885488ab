"""Weight surgery shared by every converter: reading tensor archives safely, prefix handling, layout
errors that name expected vs found keys, input-channel adaptation and position-embedding resampling.

These are pure functions over ``dict[str, Tensor]``; nothing here builds a model.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from medvlp.io import safe_load

StateDict = dict[str, torch.Tensor]

#: wrapper keys under which checkpoints commonly nest their weights (Lightning, DeiT/timm training
#: scripts, DataParallel trainers); unwrapped in this order.
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


class LayoutError(ValueError):
    """A checkpoint does not have the key layout a converter expects (message names both)."""


def _preview(keys: Iterable[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def layout_error(source: str, what: str, expected: Iterable[str], found: Iterable[str]) -> LayoutError:
    """Build a :class:`LayoutError` naming the expected keys and the keys the file has."""
    return LayoutError(f"{source}: {what}; expected keys like [{_preview(expected)}]; found [{_preview(found)}]")


def load_state_file(path: str | Path) -> StateDict:
    """Read a tensor archive without executing code and return its flat ``name → Tensor`` dict.

    ``*.safetensors`` files are read with :mod:`safetensors`; anything else with
    ``torch.load(weights_only=True)`` (a pickle that needs code is refused before any of it runs). Nested
    checkpoints are unwrapped through :data:`WRAPPER_KEYS` (Lightning ``state_dict``, DeiT ``model``).

    Raises:
        FileNotFoundError: naming the path.
        RuntimeError: naming the path when the file is not a weights-only archive.
        LayoutError: when no ``name → Tensor`` mapping is found inside.
    """

    p = Path(path)
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        from safetensors.torch import load_file  # lazy: only export/import paths need it

        try:
            return dict(load_file(str(p)))
        except Exception as exc:
            raise RuntimeError(f"refusing to load {p}: not a safetensors archive ({exc})") from exc
    obj = safe_load(p)
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_state_dict(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        found = list(obj) if isinstance(obj, Mapping) else [type(obj).__name__]
        raise layout_error(str(p), "no name → tensor mapping found", [f"{k}/..." for k in WRAPPER_KEYS], found)
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Keys that start with ``prefix``, with it removed (others dropped)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def drop_module_prefix(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove a DataParallel ``module.`` prefix when every key has it."""
    if sd and all(k.startswith("module.") for k in sd):
        return strip_prefix(sd, "module.")
    return dict(sd)


def check_keys(source: str, sd: Mapping[str, torch.Tensor], required: Iterable[str]) -> None:
    """Raise a :class:`LayoutError` naming the missing keys when ``sd`` lacks any of ``required``."""
    missing = [k for k in required if k not in sd]
    if missing:
        raise layout_error(source, f"missing {len(missing)} key(s) {_preview(missing, 6)}", required, sd)


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-layer kernel ``(O, C, *k)`` to ``in_channels`` inputs.

    3 → 1 sums the RGB kernels (so a grey image gives the output the RGB model gives on the grey image
    repeated over 3 channels, as timm's ``adapt_input_conv``); 1 → C repeats the kernel scaled by
    ``1/C``; otherwise the kernel is tiled over channels and rescaled by ``C_src / C``.
    """
    src = weight.shape[1]
    if src == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    reps = math.ceil(in_channels / src)
    tiled = weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :in_channels]
    return tiled * (src / in_channels)


def split_class_pos(pos: torch.Tensor, grid: Sequence[int], num_prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``(1, P + N, D)`` position embedding into the prefix-token part ``(1, P, D)`` and the
    grid part ``(1, N, D)``; ``N`` must equal ``prod(grid)``."""
    n = pos.shape[1] - num_prefix
    if n != math.prod(grid):
        raise LayoutError(f"position embedding has {n} grid positions after {num_prefix} prefix token(s), "
                          f"which do not fill grid {tuple(grid)}")
    return pos[:, :num_prefix], pos[:, num_prefix:]


def resample_grid_pos(pos: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> torch.Tensor:
    """Resample a grid position embedding ``(1, prod(src), D)`` to ``dst`` (bicubic in 2D, trilinear in
    3D, ``align_corners=False``: the interpolation :class:`~medvlp.encoders.ViTEncoder` and
    ``transformers``' ``interpolate_pos_encoding`` apply at run time)."""
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return pos
    mode = "bicubic" if len(src_grid) == 2 else "trilinear"
    p = pos.reshape(1, *src_grid, -1).movedim(-1, 1)
    p = F.interpolate(p.float(), size=dst_grid, mode=mode, align_corners=False).to(pos.dtype)
    return p.movedim(1, -1).reshape(1, math.prod(dst_grid), -1)


def square_grid(n: int, source: str) -> tuple[int, int]:
    """The ``(s, s)`` grid of ``n`` positions (ViT checkpoints store square grids)."""
    s = int(round(math.sqrt(n)))
    if s * s != n:
        raise LayoutError(f"{source}: {n} position embeddings do not form a square grid")
    return s, s
