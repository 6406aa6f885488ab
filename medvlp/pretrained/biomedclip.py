"""BiomedCLIP (open_clip ``ViT-B-16`` timm trunk + PubMedBERT), microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224.

Layout (mlfoundations/open_clip ``src/open_clip/timm_model.py``, ``hf_model.py``; the release's
``open_clip_config.json``: ``timm_model_name: vit_base_patch16_224``, ``timm_pool: ""``, ``timm_proj:
linear``, ``hf_proj_type: mlp``, ``hf_pooler_type: cls_last_hidden_state_pooler``, ``context_length: 256``)
in ``open_clip_pytorch_model.bin``:

* ``visual.trunk.*`` — timm ViT-B/16 (CLS pooling, final ``norm``), ``visual.head.proj.weight`` (768 → 512, no
  bias);
* ``text.transformer.*`` — ``BertModel`` without pooler; ``text.proj.{0,2}.weight`` — Linear(768 → 640) → GELU →
  Linear(640 → 512), no biases; the text feature is the CLS token of the last hidden state;
* ``logit_scale``.

Preprocessing (``preprocess_cfg``): bicubic resize of the shorter side to 224, centre crop 224, OpenAI CLIP
mean/std.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from medvlp.pretrained.formats import CheckpointFormat
from medvlp.pretrained.heads import linear_head
from medvlp.pretrained.model import BertTower, KeyLedger, PretrainedVLP, bert_from_state, load_tokenizer
from medvlp.pretrained.preprocess import Preprocess
from medvlp.pretrained.vision import vit_from_timm

TOKENIZER = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
NUM_HEADS = 12
PREPROCESS = Preprocess(image_size=224, resize=224, interpolation="bicubic", channels=3,
                        mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                        text_max_length=256)


def build(sd: Mapping[str, torch.Tensor], source: str, tokenizer: str | None = None, allow_download: bool = False,
          **_: Any) -> PretrainedVLP:
    """Convert a BiomedCLIP open_clip state dict into a :class:`PretrainedVLP`."""
    led = KeyLedger(sd, source)
    image_encoder = vit_from_timm(led.take("visual.trunk.", ["patch_embed.proj.weight"]), NUM_HEADS, source)
    image_proj = linear_head(led.take("visual.head.", ["proj.weight"])["proj.weight"])
    text_sd = led.take("text.transformer.", ["embeddings.word_embeddings.weight"])
    bert = bert_from_state(text_sd, NUM_HEADS, source)
    proj = led.take("text.proj.", ["0.weight", "2.weight"])
    text_proj = nn.Sequential(linear_head(proj["0.weight"]), nn.GELU(), linear_head(proj["2.weight"]))
    logit_scale = None
    if "logit_scale" in sd:
        logit_scale = float(led.take("logit_scale")[""])
    led.finish()
    tower = BertTower(bert, load_tokenizer(tokenizer or TOKENIZER, allow_download), PREPROCESS.text_max_length)
    return PretrainedVLP("biomedclip", image_encoder, tower, image_proj, text_proj, PREPROCESS, logit_scale)


class BiomedCLIPFormat(CheckpointFormat):
    """``format: biomedclip`` (see the module docstring)."""

    name = "biomedclip"
    layout_source = "mlfoundations/open_clip: src/open_clip/{timm_model,hf_model}.py; the release's open_clip_config.json"
    paper = "Zhang et al., BiomedCLIP, arXiv 2303.00915"
    file = "open_clip_pytorch_model.bin"
    convert = staticmethod(build)  # type: ignore[assignment]
