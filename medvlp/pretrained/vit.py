"""ViT checkpoints (timm / DeiT / Hugging Face ``ViTModel``) ↔ :class:`~medvlp.encoders.ViTEncoder`.

Layouts (read from the sources):

* **timm / DeiT** (``timm/models/vision_transformer.py``; DeiT releases wrap it under ``"model"``):
  ``cls_token (1,1,D)``, ``pos_embed (1,1+N,D)`` (CLS slot first), ``patch_embed.proj.{weight,bias}``,
  ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, optional ``head``/``fc_norm``.
  MGCA's and BLIP's ``vits.py`` and open_clip's ``visual.trunk`` use the same names.
* **Hugging Face** (``transformers/models/vit/modeling_vit.py``): ``embeddings.{cls_token,
  position_embeddings, patch_embeddings.projection}``, ``encoder.layer.i.{layernorm_before,
  attention.attention.{query,key,value}, attention.output.dense, layernorm_after, intermediate.dense,
  output.dense}``, ``layernorm``, optional ``pooler``; ``vit.`` prefix in task models (the names of
  released files; transformers 5 holds the same tensors in memory as ``layers.i.{attention.{q,k,v,o}_proj,
  mlp.fc1, mlp.fc2}``, also accepted).

``ViTEncoder`` differs in three ways that the conversion absorbs exactly: its 2D position embedding has
no CLS slot (the CLS position is a constant, so it is folded into ``cls_token``), its MLP is
``mlp.0``/``mlp.2``, and its patch embedding may take 1 channel (RGB kernels summed).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from medvlp.pretrained.surgery import (
    LayoutError,
    StateDict,
    adapt_input_conv,
    drop_module_prefix,
    layout_error,
    load_state_file,
    resample_grid_pos,
    split_class_pos,
    square_grid,
    strip_prefix,
)

log = logging.getLogger(__name__)

TIMM_SENTINELS = ("patch_embed.proj.weight", "pos_embed", "cls_token")
HF_SENTINELS = ("embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings",
                "embeddings.cls_token")
_IGNORED_TIMM = ("head.", "head_dist.", "fc_norm.", "pre_logits.")
_BLOCK_RENAMES = {"mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.2."}


def _block_key(key: str, to_medvlp: bool) -> str:
    """A transformer-block key renamed from timm's layout to medvlp's (or back)."""
    for timm_part, ours in _BLOCK_RENAMES.items():
        key = key.replace(timm_part, ours) if to_medvlp else key.replace(ours, timm_part)
    return key


def hf_vit_to_timm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename a Hugging Face ``ViTModel`` state dict to the timm layout (q, k, v concatenated to qkv)."""
    sd = dict(sd)
    for prefix in ("vit.", "deit."):
        if any(k.startswith(prefix + "embeddings.") for k in sd):
            sd = strip_prefix(sd, prefix)
    out: StateDict = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if "embeddings.distillation_token" in sd:
        out["dist_token"] = sd["embeddings.distillation_token"]
    v5 = any(k.startswith("layers.") for k in sd)  # transformers 5 names; released files use the v4 names
    names = _HF_V5 if v5 else _HF_V4
    stem = "layers." if v5 else "encoder.layer."
    depth = 1 + max(int(k[len(stem):].split(".")[0]) for k in sd if k.startswith(stem))
    for i in range(depth):
        h, t = f"{stem}{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[t + f"attn.qkv.{p}"] = torch.cat([sd[h + f"{names[n]}.{p}"] for n in ("q", "k", "v")])
            for ours in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
                out[t + f"{ours}.{p}"] = sd[h + f"{names[ours]}.{p}"]
    return out


_HF_V4 = {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
          "attn.proj": "attention.output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_HF_V5 = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "attn.proj": "attention.o_proj",
          "norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def to_timm_layout(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> StateDict:
    """Detect the ViT layout (timm/DeiT or Hugging Face) and return it in the timm layout.

    Raises:
        LayoutError: naming the sentinel keys of both layouts and the keys found.
    """
    sd = drop_module_prefix(sd)
    if all(k in sd for k in TIMM_SENTINELS):
        return dict(sd)
    for prefix in ("", "vit.", "deit."):
        if all(prefix + k in sd for k in HF_SENTINELS):
            return hf_vit_to_timm(sd)
    raise layout_error(source, "not a timm/DeiT or Hugging Face ViT state dict",
                       TIMM_SENTINELS + HF_SENTINELS, sd)


def timm_to_encoder_state(sd: Mapping[str, torch.Tensor], encoder: Any, source: str = "checkpoint") -> StateDict:
    """Map a timm-layout ViT state dict onto ``encoder``'s 2D parameters.

    Surgery: input-channel adaptation (:func:`adapt_input_conv`), the CLS position folded into
    ``cls_token``, the grid position embedding resampled to the encoder's 2D grid.

    Raises:
        LayoutError: on a distilled (two-token) checkpoint, a depth/width/patch mismatch, or keys this
            mapping does not know.
    """
    if "2" not in encoder.patch_embed:
        raise LayoutError(f"{source}: a 2D ViT checkpoint needs an encoder with spatial_dims containing 2")
    if "dist_token" in sd:
        raise LayoutError(f"{source}: distilled DeiT checkpoints (cls + dist token) are not supported; "
                          "use the non-distilled DeiT weights")
    w = sd["patch_embed.proj.weight"]
    if tuple(w.shape[2:]) != tuple(encoder.patch_size(2)) or w.shape[0] != encoder.embed_dim:
        raise LayoutError(f"{source}: patch embedding {tuple(w.shape)} does not fit the encoder "
                          f"(embed_dim {encoder.embed_dim}, patch {encoder.patch_size(2)})")
    depth_src = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if depth_src != len(encoder.blocks):
        raise LayoutError(f"{source}: checkpoint has {depth_src} blocks, the encoder {len(encoder.blocks)}")
    src_grid = square_grid(sd["pos_embed"].shape[1] - 1, source)
    cls_pos, grid_pos = split_class_pos(sd["pos_embed"], src_grid)
    out: StateDict = {
        "cls_token": sd["cls_token"] + cls_pos,
        "pos_embed.2": resample_grid_pos(grid_pos, src_grid, encoder.ref_grid["2"]),
        "patch_embed.2.proj.weight": adapt_input_conv(w, encoder.in_channels),
        "patch_embed.2.proj.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    known = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
             "norm.bias"}
    for k, v in sd.items():
        if k.startswith("blocks."):
            out[_block_key(k, to_medvlp=True)] = v
            known.add(k)
    unknown = [k for k in sd if k not in known and not k.startswith(_IGNORED_TIMM)]
    if unknown:
        raise layout_error(source, f"unexpected keys {unknown[:6]}", TIMM_SENTINELS, sd)
    return out


def load_into_encoder(encoder: Any, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
    """Load a timm/DeiT/HF ViT state dict into ``encoder``; returns the encoder keys left at their
    initialisation (mask token, 3D patch/position embeddings).

    Raises:
        LayoutError: on an unknown layout or any shape mismatch (strict apart from the listed keys).
    """
    state = timm_to_encoder_state(to_timm_layout(sd, source), encoder, source)
    own = encoder.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise LayoutError(f"{source}: shape mismatch {bad[:4]}")
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected:
        raise layout_error(source, f"keys the encoder does not have {unexpected[:6]}", own, state)
    allowed = {"mask_token", "pos_embed.3"}
    left = [k for k in missing if k not in allowed and not k.startswith("patch_embed.3.")]
    if left:
        raise layout_error(source, f"encoder keys missing from the checkpoint {left[:6]}", own, state)
    log.info("initialised ViT from %s; kept at initialisation: %s", source, ", ".join(missing) or "none")
    return list(missing)


def resolve_init_source(init_from: str, allow_download: bool = False) -> Path:
    """A local file for ``init_from``: the path itself, or (when allowed) a hub download.

    Hub ids are ``hf-hub:ORG/NAME`` or ``ORG/NAME``; the repo's ``model.safetensors`` (falling back to
    ``pytorch_model.bin``) is downloaded with ``huggingface_hub``.

    Raises:
        FileNotFoundError: when the path does not exist and downloads are not allowed.
    """
    p = Path(init_from).expanduser()
    if p.is_file():
        return p
    repo = init_from[len("hf-hub:"):] if init_from.startswith("hf-hub:") else init_from
    if not allow_download or repo.count("/") != 1:
        raise FileNotFoundError(
            f"image_encoder.init_from={init_from!r}: no such file; a hub id needs "
            "image_encoder.init_allow_download=true (and network access)")
    from huggingface_hub import hf_hub_download  # lazy: hub access only when the user asks for it

    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo, name))
        except Exception as exc:  # try the next file name, report the last failure
            last = exc
    raise FileNotFoundError(f"image_encoder.init_from={init_from!r}: download failed ({last})")


def init_vit_from(encoder: Any, init_from: str, allow_download: bool = False) -> list[str]:
    """Initialise ``encoder`` from a checkpoint file or hub id (see :func:`resolve_init_source`)."""
    path = resolve_init_source(init_from, allow_download)
    with torch.no_grad():
        return load_into_encoder(encoder, load_state_file(path), str(path))


def encoder_to_timm(encoder: Any) -> StateDict:
    """Export the 2D part of a :class:`~medvlp.encoders.ViTEncoder` as a timm ViT state dict (CLS
    position set to zero, its value kept in ``cls_token``; the inverse of :func:`timm_to_encoder_state`
    for 3-channel encoders)."""
    sd = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    pos = sd["pos_embed.2"]
    out: StateDict = {
        "cls_token": sd["cls_token"],
        "pos_embed": torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1),
        "patch_embed.proj.weight": sd["patch_embed.2.proj.weight"],
        "patch_embed.proj.bias": sd["patch_embed.2.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    out.update({_block_key(k, to_medvlp=False): v for k, v in sd.items() if k.startswith("blocks.")})
    return out
