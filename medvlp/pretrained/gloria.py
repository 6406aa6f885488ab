"""GLoRIA (ResNet-50) checkpoints, marshuang80/gloria.

Layout (``gloria/models/{gloria_model,vision_model,text_model,cnn_backbones}.py``; the Lightning module keeps
the model as ``self.gloria``), in ``chexpert_resnet50.ckpt``'s ``state_dict``:

* ``gloria.img_encoder.model.*`` — torchvision ResNet-50 with ``fc`` replaced by ``Identity`` (no ``fc`` keys);
* ``gloria.img_encoder.global_embedder.{weight,bias}`` — Linear 2048 → 768;
  ``gloria.img_encoder.local_embedder.weight`` — 1×1 conv on ``layer3`` (local branch, unused here);
* ``gloria.text_encoder.model.*`` — ``AutoModel`` Bio_ClinicalBERT (with pooler; ``embeddings.position_ids`` in
  older files); no text projection (``emb_global`` is None).

Forward as released (``configs/chexpert_pretrain_config.yaml``: ``last_n_layers: 4``, ``aggregate_method:
sum``, ``agg_tokens: true``, ``word_num: 97``, ``imsize: 256``, crop 224, ``norm: half``): the image is
upsampled to 299 px (bilinear, corners aligned), the global feature is the ``layer4`` average, then
``global_embedder``. The report is cleaned as ``GLoRIA.process_text`` does (split at numbered points and
full stops, ``\\w+`` word tokens in lower case, one-word sentences dropped, ASCII only), padded to 97
tokens; word pieces are summed into words up to the first ``[SEP]``, and the sentence embedding is the mean
over the 97 word slots (padding slots are zero) summed over the last 4 layers — which equals the sum of
the token states from ``[CLS]`` to the first ``[SEP]`` divided by 97, summed over the 4 layers.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from medvlp.pretrained.formats import CheckpointFormat
from medvlp.pretrained.heads import linear_head
from medvlp.pretrained.model import KeyLedger, PretrainedVLP, bert_from_state, load_tokenizer
from medvlp.pretrained.preprocess import Preprocess
from medvlp.pretrained.vision import resnet_from_torchvision

TOKENIZER = "emilyalsentzer/Bio_ClinicalBERT"
NUM_HEADS = 12
WORD_NUM = 97
LAST_N_LAYERS = 4
PREPROCESS = Preprocess(image_size=224, resize=256, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, final_size=299,
                        text_max_length=WORD_NUM)


def clean_report(text: str) -> str:
    """``GLoRIA.process_text``'s cleaning of one report."""
    text = text.replace("\n", " ")
    points = re.split(r"[0-9]+\.", text)
    sentences = [s for p in points for s in p.split(".")]
    kept = []
    for s in sentences:
        s = s.replace("\ufffd\ufffd", " ")
        tokens = re.findall(r"\w+", s.lower())
        if len(tokens) <= 1:
            continue
        tokens = [t.encode("ascii", "ignore").decode("ascii") for t in tokens]
        kept.append(" ".join(t for t in tokens if t))
    return " ".join(kept)


class GloriaTextTower(nn.Module):
    """Bio_ClinicalBERT with GLoRIA's sentence embedding (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = WORD_NUM
        self.embed_dim = int(model.config.hidden_size)

    def forward(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``pooled`` sentence embeddings, ``tokens`` (last layer) and ``attention_mask``."""
        enc = self.tokenizer([clean_report(t) for t in texts], padding="max_length", truncation=True,
                             max_length=WORD_NUM, return_tensors="pt")
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = self.model(**enc, output_hidden_states=True)
        layers = torch.stack(out.hidden_states[-LAST_N_LAYERS:], dim=1)  # (B, 4, L, D)
        ids = enc["input_ids"]
        sep = (ids == self.tokenizer.sep_token_id).int()
        first_sep = torch.where(sep.any(1), sep.argmax(1), torch.full_like(sep[:, 0], ids.shape[1] - 1))
        upto = (torch.arange(ids.shape[1], device=device)[None] <= first_sep[:, None]).to(layers.dtype)
        pooled = (layers * upto[:, None, :, None]).sum(dim=(1, 2)) / WORD_NUM
        return {"pooled": pooled, "tokens": out.last_hidden_state, "attention_mask": enc["attention_mask"]}


def build(sd: Mapping[str, torch.Tensor], source: str, tokenizer: str | None = None, allow_download: bool = False,
          **_: Any) -> PretrainedVLP:
    """Convert a GLoRIA checkpoint into a :class:`PretrainedVLP`."""
    led = KeyLedger(sd, source)
    image_encoder = resnet_from_torchvision(led.take("gloria.img_encoder.model.", ["conv1.weight"]), source)
    g = led.take("gloria.img_encoder.global_embedder.", ["weight", "bias"])
    image_proj = linear_head(g["weight"], g["bias"])
    led.ignore("gloria.img_encoder.local_embedder.", "local (word–region) branch")
    bert = bert_from_state(led.take("gloria.text_encoder.model.", ["embeddings.word_embeddings.weight"]), NUM_HEADS,
                           source)
    led.finish()
    tower = GloriaTextTower(bert, load_tokenizer(tokenizer or TOKENIZER, allow_download))
    return PretrainedVLP("gloria_resnet50", image_encoder, tower, image_proj, nn.Identity(), PREPROCESS)


class GLoRIAFormat(CheckpointFormat):
    """``format: gloria``."""

    name = "gloria"
    layout_source = ("marshuang80/gloria: gloria/models/{gloria_model,vision_model,text_model,cnn_backbones}.py, "
                     "configs/chexpert_pretrain_config.yaml")
    paper = "Huang et al., GLoRIA, ICCV 2021"
    file = "chexpert_resnet50.ckpt (Lightning)"
    convert = staticmethod(build)  # type: ignore[assignment]
