"""MGCA Lightning checkpoints (ViT-B/16 and ResNet-50), HKU-MedAI/MGCA.

Layout (``mgca/models/mgca/mgca_module.py``, ``mgca/models/backbones/encoder.py``, ``med.py``,
``configs/bert_config.json``), under the Lightning ``state_dict``:

* ``img_encoder_q.model.*`` — ViT (BLIP ``vits.py``, timm names) or torchvision ResNet-50 without ``fc``;
* ``img_encoder_q.global_embed.head.{0,1,3,4}`` — ``GlobalEmbedding`` (Linear 2048 → BN → ReLU → Linear →
  BN without affine), 128-d output;
* ``text_encoder_q.model.*`` — BLIP's ``med.py`` BERT: 6 layers of Bio_ClinicalBERT, no token-type embedding,
  a cross-attention block per layer (``add_cross_attention: true``; unused in ``mode="text"``), persistent
  ``embeddings.position_ids``;
* ``text_encoder_q.global_embed.head.*``; training-only: ``*.local_embed.*``, ``patch_local_atten_layer``,
  ``word_local_atten_layer``, ``prototype_layer``.

Forward as released: the global image feature is the ViT CLS token after the final norm (ResNet: average of
``layer4``, input first upsampled to 299 px, bilinear, corners aligned); the report feature is the CLS
token of the last layer. ``BertEncoder.forward`` passes the token-type ids as the third positional argument,
which ``med.py``'s ``BertModel.forward`` reads as ``position_ids``, so every token uses position 0 — kept
here (``position_ids="token_type"``). Preprocessing (``mgca/datasets``): resize to 256, centre crop 224,
grey → RGB, normalise with mean = std = 0.5; reports truncated at 112 tokens.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from medvlp.pretrained.formats import CheckpointFormat
from medvlp.pretrained.heads import bn_mlp_head
from medvlp.pretrained.model import BertTower, KeyLedger, PretrainedVLP, bert_from_state, load_strict, load_tokenizer
from medvlp.pretrained.preprocess import Preprocess
from medvlp.pretrained.vision import resnet_from_torchvision, vit_from_timm

TOKENIZER = "emilyalsentzer/Bio_ClinicalBERT"
NUM_HEADS = 12


def preprocess_for(resnet: bool) -> Preprocess:
    """MGCA's evaluation preprocessing (ResNet adds the 299 px upsampling of ``resnet_forward``)."""
    return Preprocess(image_size=224, resize=256, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                      final_size=299 if resnet else None, text_max_length=112)


def build(sd: Mapping[str, torch.Tensor], source: str, tokenizer: str | None = None, allow_download: bool = False,
          **_: Any) -> PretrainedVLP:
    """Convert an MGCA checkpoint (either image backbone) into a :class:`PretrainedVLP`."""
    return _build(sd, source, tokenizer, allow_download, "img_encoder_q.", "text_encoder_q.", "mgca")


def build_convirt(sd: Mapping[str, torch.Tensor], source: str, tokenizer: str | None = None,
                  allow_download: bool = False, **_: Any) -> PretrainedVLP:
    """Convert a ConVIRT checkpoint of MGCA's reimplementation (``mgca/models/convirt/convirt_module.py``:
    the same ``ImageEncoder``/``BertEncoder`` as MGCA under ``img_encoder.``/``text_encoder.``, no
    token-alignment or prototype layers)."""
    return _build(sd, source, tokenizer, allow_download, "img_encoder.", "text_encoder.", "convirt")


def build_asg(sd: Mapping[str, torch.Tensor], source: str, tokenizer: str | None = None, allow_download: bool = False,
              **_: Any) -> PretrainedVLP:
    """Convert an official ASG checkpoint (ASGMVLP/ASGMVLP_CODE ``main.py``: MGCA's ``ImageEncoder``/``BertEncoder``
    as ``img_encoder_q``/``text_encoder_q``, plus the training-only ``irl`` decoder and the frozen tag-text BERT
    ``text_encoder``)."""
    return _build(sd, source, tokenizer, allow_download, "img_encoder_q.", "text_encoder_q.", "asg",
                  extra_ignored=("irl.", "text_encoder."))


def _build(sd: Mapping[str, torch.Tensor], source: str, tokenizer: str | None, allow_download: bool, img_p: str,
           txt_p: str, name: str, extra_ignored: tuple[str, ...] = ()) -> PretrainedVLP:
    led = KeyLedger(sd, source)
    img = led.take(f"{img_p}model.")
    resnet = "conv1.weight" in img
    image_encoder = resnet_from_torchvision(img, source) if resnet else vit_from_timm(img, NUM_HEADS, source)
    image_proj = bn_mlp_head(led.take(f"{img_p}global_embed.head."), source)
    load_strict(image_proj, led.take(f"{img_p}global_embed.head."), source, "image projection")
    text_sd = led.take(f"{txt_p}model.", ["embeddings.word_embeddings.weight"])
    text_sd = {k: v for k, v in text_sd.items() if ".crossattention." not in k}  # multimodal mode only
    bert = bert_from_state(text_sd, NUM_HEADS, source, token_types=False)
    text_proj = bn_mlp_head(led.take(f"{txt_p}global_embed.head."), source)
    load_strict(text_proj, led.take(f"{txt_p}global_embed.head."), source, "text projection")
    for prefix in (f"{img_p}local_embed.", f"{txt_p}local_embed.", "patch_local_atten_layer.",
                   "word_local_atten_layer.", "prototype_layer.", *extra_ignored):
        led.ignore(prefix, "training-only head (token alignment / prototypes / IRL decoder / tag-text BERT)")
    led.finish()
    pre = preprocess_for(resnet)
    tower = BertTower(bert, load_tokenizer(tokenizer or TOKENIZER, allow_download), pre.text_max_length,
                      position_ids="token_type")
    return PretrainedVLP(f"{name}_resnet50" if resnet else f"{name}_vit", image_encoder, tower, image_proj, text_proj, pre)


class MGCAFormat(CheckpointFormat):
    """``format: mgca`` (see the module docstring)."""

    name = "mgca"
    layout_source = "HKU-MedAI/MGCA: mgca/models/mgca/mgca_module.py, mgca/models/backbones/{encoder,vits,med,cnn_backbones}.py, mgca/configs/bert_config.json, mgca/datasets/transforms.py"
    paper = "Wang et al., Multi-Granularity Cross-modal Alignment, NeurIPS 2022"
    file = "Lightning .ckpt (ViT-B/16 or ResNet-50 image encoder)"
    convert = staticmethod(build)  # type: ignore[assignment]


class ConVIRTFormat(CheckpointFormat):
    """``format: convirt`` — ConVIRT as reimplemented in the MGCA repository (ResNet-50 by default)."""

    name = "convirt"
    layout_source = ("HKU-MedAI/MGCA: mgca/models/convirt/convirt_module.py with mgca/models/backbones/encoder.py "
                     "(the ConVIRT authors released no code)")
    paper = "Zhang et al., Contrastive Learning of Medical Visual Representations from Paired Images and Text, MLHC 2022"
    file = "Lightning .ckpt (ResNet-50 or ViT-B/16 image encoder)"
    convert = staticmethod(build_convirt)  # type: ignore[assignment]


class ASGFormat(CheckpointFormat):
    """``format: asg`` — the official ASG Lightning checkpoint."""

    name = "asg"
    layout_source = "ASGMVLP/ASGMVLP_CODE: main.py (class ASG), models/encoder.py, models/irl_model.py"
    paper = "Li et al., Anatomical Structure-Guided Medical Vision-Language Pre-training, MICCAI 2024"
    file = "Lightning .ckpt (ViT-B/16 or ResNet-50 image encoder)"
    convert = staticmethod(build_asg)  # type: ignore[assignment]
