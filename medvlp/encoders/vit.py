"""One Vision Transformer for 2D and 3D images (UniMiss/UniMedI-style shared trunk).

A 2D patch embedding (``Conv2d``) and a 3D patch embedding (``Conv3d``) map images of either
dimensionality into one token space that a single transformer processes. Each dimensionality has its
own learnable position embedding, interpolated when the input grid differs from the configured one.
Attention uses ``torch.nn.functional.scaled_dot_product_attention`` (flash/memory-efficient kernels
where available).
"""
from __future__ import annotations

import math
from typing import Any, Sequence, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class ImageFeatures(TypedDict):
    """What every image encoder returns.

    Attributes:
        pooled: ``(B, D)`` global feature.
        tokens: ``(B, N, D)`` final patch tokens (no CLS), row-major over ``grid``.
        grid: spatial token grid, ``(h, w)`` or ``(d, h, w)``.
        hidden: patch tokens ``(B, N, D)`` from the blocks listed in ``feature_layers``.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    grid: tuple[int, ...]
    hidden: list[torch.Tensor]


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, Sequence) else (int(v),) * n


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding for ``spatial_dims`` ∈ {2, 3}."""

    def __init__(self, spatial_dims: int, in_channels: int, patch_size: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.patch_size = tuple(patch_size)
        self.proj = conv(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Return tokens ``(B, N, D)`` and the grid shape."""
        for size, p in zip(x.shape[2:], self.patch_size):
            if size % p:
                raise ValueError(f"image spatial size {tuple(x.shape[2:])} is not divisible by patch {self.patch_size}")
        y = self.proj(x)
        grid = tuple(y.shape[2:])
        return y.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention: SDPA kernels (``sdpa``) or explicit softmax(QKᵀ/√d)V (``naive``,
    the MGCA/timm-0.4 formulation, kept as the performance baseline)."""

    def __init__(self, dim: int, num_heads: int, impl: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        if impl not in ("sdpa", "naive"):
            raise ValueError(f"attention impl must be sdpa|naive, got {impl!r}")
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            y = attn.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """ViT whose patch embedding handles 2D and 3D inputs (``spatial_dims``).

    Args:
        in_channels: image channels (1 for X-ray/CT/MRI/EM).
        embed_dim: token width ``D``.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``D``.
        spatial_dims: which input dimensionalities to support, e.g. ``[2]``, ``[3]`` or ``[2, 3]``.
        img_size_2d: reference 2D size for the 2D position embedding.
        patch_size_2d: 2D patch size.
        img_size_3d: reference ``(D, H, W)`` for the 3D position embedding.
        patch_size_3d: 3D patch size ``(pd, ph, pw)``.
        feature_layers: 0-based block indices whose outputs are returned in ``hidden`` (for
            segmentation decoders); defaults to 4 evenly spaced blocks ending with the last.
        grad_checkpointing: recompute blocks in backward to save memory (3D).
        attn_impl: ``sdpa`` (default) or ``naive`` (explicit attention matrix; benchmark baseline).
        init_from: a timm / DeiT / Hugging Face ViT checkpoint file (or a hub id with
            ``init_allow_download``) that initialises the 2D trunk when a new model is built for training:
            RGB kernels summed for 1 channel, the CLS position folded into ``cls_token``, the position
            embedding resampled to ``img_size_2d`` (see :mod:`medvlp.pretrained.vit`). The mask token and 3D
            embeddings keep their initialisation. The constructor only records it; loading is the separate
            step :func:`medvlp.pretrained.init.load_initial_weights` (a checkpoint's own weights never need it).
        init_allow_download: allow ``init_from`` to name a hub repository (network needed).
        mask_token: create the learnable mask token used by ``token_mask`` (masked image modelling). Off
            by default so that a method which never masks has no parameter outside the loss (DDP without
            ``find_unused_parameters``); a method that masks calls :meth:`enable_mask_token`.

    Example:
        >>> enc = ViTEncoder(embed_dim=64, depth=2, num_heads=2, spatial_dims=[2, 3], img_size_2d=32,
        ...                  patch_size_2d=8, img_size_3d=(16, 32, 32), patch_size_3d=(4, 8, 8))
        >>> enc(torch.zeros(2, 1, 32, 32))["pooled"].shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        spatial_dims: Sequence[int] = (2,),
        img_size_2d: int | Sequence[int] = 224,
        patch_size_2d: int | Sequence[int] = 16,
        img_size_3d: int | Sequence[int] = (32, 128, 128),
        patch_size_3d: int | Sequence[int] = (4, 16, 16),
        feature_layers: Sequence[int] | None = None,
        grad_checkpointing: bool = False,
        attn_impl: str = "sdpa",
        init_from: str | None = None,
        init_allow_download: bool = False,
        mask_token: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = tuple(sorted(int(s) for s in spatial_dims))
        if not self.spatial_dims or set(self.spatial_dims) - {2, 3}:
            raise ValueError(f"spatial_dims must be a non-empty subset of (2, 3), got {spatial_dims}")
        self.embed_dim = embed_dim
        self.in_channels = in_channels
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = nn.ModuleDict()
        self.pos_embed = nn.ParameterDict()
        self.ref_grid: dict[str, tuple[int, ...]] = {}
        sizes = {2: (img_size_2d, patch_size_2d), 3: (img_size_3d, patch_size_3d)}
        for sd in self.spatial_dims:
            img, patch = _tuple(sizes[sd][0], sd), _tuple(sizes[sd][1], sd)
            grid = tuple(i // p for i, p in zip(img, patch))
            self.patch_embed[str(sd)] = PatchEmbed(sd, in_channels, patch, embed_dim)
            self.pos_embed[str(sd)] = nn.Parameter(torch.zeros(1, math.prod(grid), embed_dim))
            self.ref_grid[str(sd)] = grid
            nn.init.trunc_normal_(self.pos_embed[str(sd)], std=0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_parameter("mask_token", None)
        if mask_token:
            self.enable_mask_token()
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, attn_impl) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if feature_layers is None:
            step = max(depth // 4, 1)
            feature_layers = sorted({min(depth - 1, i) for i in range(step - 1, depth, step)})
        self.feature_layers = tuple(int(i) for i in feature_layers)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)
        self.init_from = str(init_from) if init_from else None
        self.init_allow_download = bool(init_allow_download)

    def enable_mask_token(self) -> None:
        """Create the learnable mask token (idempotent); needed before passing ``token_mask``."""
        if self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints written before the mask token became optional carry one for every method
        if self.mask_token is None:
            state_dict.pop(prefix + "mask_token", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def patch_size(self, spatial_dims: int) -> tuple[int, ...]:
        """Patch size used for inputs with ``spatial_dims`` dims."""
        return self.patch_embed[str(spatial_dims)].patch_size

    def _pos(self, key: str, grid: tuple[int, ...]) -> torch.Tensor:
        pos = self.pos_embed[key]
        ref = self.ref_grid[key]
        if grid == ref:
            return pos
        mode = "bicubic" if len(grid) == 2 else "trilinear"
        p = pos.reshape(1, *ref, -1).movedim(-1, 1)
        p = F.interpolate(p, size=grid, mode=mode, align_corners=False)
        return p.movedim(1, -1).reshape(1, math.prod(grid), -1)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Patch-embed ``x`` and add position embeddings (no CLS); returns tokens and grid."""
        sd = x.ndim - 2
        key = str(sd)
        if key not in self.patch_embed:
            raise ValueError(
                f"this encoder was built for spatial_dims={list(self.spatial_dims)} but got a {sd}D input "
                f"of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got shape {tuple(x.shape)}")
        tokens, grid = self.patch_embed[key](x)
        return tokens + self._pos(key, grid), grid

    def forward_tokens(self, tokens: torch.Tensor, grid: tuple[int, ...],
                       token_mask: torch.Tensor | None = None) -> ImageFeatures:
        """Run the transformer on embedded tokens.

        Args:
            tokens: ``(B, N, D)`` from :meth:`embed`.
            grid: token grid.
            token_mask: optional ``(B, N)`` bool; True tokens are replaced by the learnable mask token
                (masked image modelling / self-distillation).
        """
        if token_mask is not None:
            if self.mask_token is None:
                raise ValueError("token_mask needs the mask token: build the encoder with mask_token=True "
                                 "or call enable_mask_token() first")
            tokens = torch.where(token_mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        hidden: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in self.feature_layers:
                hidden.append(x[:, 1:])
        x = self.norm(x)
        return ImageFeatures(pooled=x[:, 0], tokens=x[:, 1:], grid=grid, hidden=hidden)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> ImageFeatures:
        """Encode a 2D ``(B, C, H, W)`` or 3D ``(B, C, D, H, W)`` batch."""
        tokens, grid = self.embed(x)
        return self.forward_tokens(tokens, grid, token_mask)


def tokens_to_map(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Reshape ``(B, N, D)`` tokens to a ``(B, D, *grid)`` feature map."""
    b, n, d = tokens.shape
    if n != math.prod(grid):
        raise ValueError(f"{n} tokens do not fill grid {tuple(grid)}")
    return tokens.transpose(1, 2).reshape(b, d, *grid)
