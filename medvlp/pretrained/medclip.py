"""MedCLIP-ViT (Swin-T + Bio_ClinicalBERT), RyanWangZf/MedCLIP.

Layout (``medclip/modeling_medclip.py``: ``MedCLIPModel(vision_cls=MedCLIPVisionModelViT)``,
``constants.py``; weights ``pytorch_model.bin``):

* ``vision_model.model.*`` — ``transformers`` ``SwinModel`` (``microsoft/swin-tiny-patch4-window7-224``:
  embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7), in the ``transformers`` 4 names the file was
  written with; ``vision_model.projection_head.weight`` — Linear 768 → 512 without bias;
* ``text_model.model.*`` — ``AutoModel`` Bio_ClinicalBERT (with pooler); ``text_model.projection_head.weight``
  — Linear 768 → 512 without bias (``proj_bias=False``);
* ``logit_scale``.

Forward as released: image embedding = ``projection_head(pooler_output)`` (mean of the final normalised
Swin tokens); text embedding = ``projection_head`` of the mean over hidden states 1, 2 and the last of the
token mean. Preprocessing (``MedCLIPFeatureExtractor``): pad to square, bicubic resize to 224, centre crop,
normalise with mean 0.5862785803043838 and std 0.27950088968644304, grey repeated to 3 channels; reports
truncated at 77 tokens.

Deviation: the official token mean runs over every position of the padded batch (padding included), so a
report's embedding depends on the other reports in its batch; here each report is tokenised alone, so
its mean covers exactly its own tokens.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from medvlp.encoders.vit import ImageFeatures
from medvlp.pretrained.formats import CheckpointFormat
from medvlp.pretrained.heads import linear_head
from medvlp.pretrained.model import KeyLedger, PretrainedVLP, bert_from_state, load_tokenizer
from medvlp.pretrained.preprocess import Preprocess
from medvlp.pretrained.surgery import layout_error

TOKENIZER = "emilyalsentzer/Bio_ClinicalBERT"
NUM_HEADS = 12
MEAN, STD = 0.5862785803043838, 0.27950088968644304
PREPROCESS = Preprocess(image_size=224, resize=224, interpolation="bicubic", channels=3, mean=(MEAN,) * 3,
                        std=(STD,) * 3, text_max_length=77)


def swin_from_state(sd: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """A ``transformers.SwinModel`` sized from a released (transformers-4 named) state dict, loaded through
    ``from_pretrained`` (which renames to the installed version's names) and checked for missing and
    unexpected keys."""
    from safetensors.torch import save_file  # lazy: only export/import paths need it
    from transformers import SwinConfig, SwinModel  # lazy: heavy optional import (transformers)

    sd = {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}  # recomputed buffers
    w = sd.get("embeddings.patch_embeddings.projection.weight")
    if w is None:
        raise layout_error(source, "not a Swin state dict", ["embeddings.patch_embeddings.projection.weight"], sd)
    n_stages = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    depths, heads = [], []
    for s in range(n_stages):
        blocks = {int(k.split(".")[4]) for k in sd if k.startswith(f"encoder.layers.{s}.blocks.")}
        depths.append(len(blocks))
        heads.append(int(sd[f"encoder.layers.{s}.blocks.0.attention.self.relative_position_bias_table"].shape[1]))
    table = sd["encoder.layers.0.blocks.0.attention.self.relative_position_bias_table"].shape[0]
    window = (int(round(table ** 0.5)) + 1) // 2
    dim = int(w.shape[0])
    cfg = SwinConfig(image_size=224, patch_size=int(w.shape[-1]), num_channels=int(w.shape[1]), embed_dim=dim,
                     depths=depths, num_heads=heads, window_size=window,
                     mlp_ratio=sd["encoder.layers.0.blocks.0.intermediate.dense.weight"].shape[0] / dim)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg.to_dict()))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        model, info = SwinModel.from_pretrained(tmp, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise layout_error(source, f"Swin weights do not fit ({problems})", model.state_dict(), sd)
    return model.eval()


class SwinImageEncoder(nn.Module):
    """``transformers.SwinModel`` behind :class:`ImageFeatures` (pooled = ``pooler_output``; ``maps`` = the
    reshaped stage outputs)."""

    def __init__(self, swin: nn.Module) -> None:
        super().__init__()
        self.swin = swin
        self.embed_dim = int(swin.num_features)
        self.spatial_dims = (2,)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> ImageFeatures:
        """Encode ``(B, 3, H, W)``."""
        if token_mask is not None:
            raise ValueError("SwinImageEncoder does not support token masking")
        out = self.swin(pixel_values=x, output_hidden_states=True)
        tokens = out.last_hidden_state
        side = int(round(tokens.shape[1] ** 0.5))
        feats = ImageFeatures(pooled=out.pooler_output, tokens=tokens, grid=(side, side), hidden=[])
        feats["maps"] = list(out.reshaped_hidden_states[1:])  # type: ignore[typeddict-unknown-key]
        return feats


class MedCLIPTextTower(nn.Module):
    """Bio_ClinicalBERT with MedCLIP's pooling (mean of hidden states 1, 2 and last over the tokens)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = PREPROCESS.text_max_length
        self.embed_dim = int(model.config.hidden_size)

    def forward(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``pooled`` per report (each tokenised alone; see the module docstring)."""
        device = next(self.model.parameters()).device
        pooled, last = [], []
        for text in texts:
            enc = self.tokenizer([text], truncation=True, max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            hs = self.model(**enc, output_hidden_states=True).hidden_states
            pooled.append(torch.stack([hs[1], hs[2], hs[-1]]).mean(2).mean(0)[0])
            last.append(hs[-1][0, 0])
        return {"pooled": torch.stack(pooled), "tokens": torch.stack(last)[:, None], "attention_mask": torch.ones(len(texts), 1)}


def build(sd: Mapping[str, torch.Tensor], source: str, tokenizer: str | None = None, allow_download: bool = False,
          **_: Any) -> PretrainedVLP:
    """Convert a MedCLIP-ViT ``pytorch_model.bin`` into a :class:`PretrainedVLP`."""
    led = KeyLedger(sd, source)
    swin = swin_from_state(led.take("vision_model.model.", ["embeddings.patch_embeddings.projection.weight"]), source)
    image_proj = linear_head(led.take("vision_model.projection_head.", ["weight"])["weight"])
    bert = bert_from_state(led.take("text_model.model.", ["embeddings.word_embeddings.weight"]), NUM_HEADS, source)
    text_proj = linear_head(led.take("text_model.projection_head.", ["weight"])["weight"])
    logit_scale = float(led.take("logit_scale")[""]) if "logit_scale" in sd else None
    led.finish()
    tower = MedCLIPTextTower(bert, load_tokenizer(tokenizer or TOKENIZER, allow_download))
    return PretrainedVLP("medclip_swin", SwinImageEncoder(swin), tower, image_proj, text_proj, PREPROCESS, logit_scale)


class MedCLIPFormat(CheckpointFormat):
    """``format: medclip``."""

    name = "medclip"
    layout_source = "RyanWangZf/MedCLIP: medclip/modeling_medclip.py, medclip/constants.py, medclip/dataset.py"
    paper = "Wang et al., MedCLIP, EMNLP 2022"
    file = "pytorch_model.bin (MedCLIP-ViT release)"
    convert = staticmethod(build)  # type: ignore[assignment]
