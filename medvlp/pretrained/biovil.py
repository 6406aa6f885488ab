"""BioViL image model (ResNet-50) + CXR-BERT-specialized, microsoft/hi-ml (``hi-ml-multimodal``).

Layouts (``health_multimodal/image/model/{model,encoder,modules}.py``,
``health_multimodal/text/model/{modelling,configuration}_cxrbert.py``, ``image/data/transforms.py``):

* image file ``biovil_image_resnet50_proj_size_128.pt`` (``ImageModel.state_dict()``):
  ``encoder.encoder.*`` — torchvision ResNet-50 (its unused ImageNet ``fc`` may be present);
  ``projector.model.{0,1,3}`` — ``MLP(use_1x1_convs=True)``: Conv1×1 2048 → 128 (no bias) → BatchNorm2d →
  ReLU → Conv1×1 128 → 128;
* text file (the ``pytorch_model.bin`` of ``microsoft/BiomedVLP-CXR-BERT-specialized``, ``CXRBertModel``):
  ``bert.*`` — BERT without pooler; ``cls.predictions.*`` — masked-LM head (unused);
  ``cls_projection_head.{dense_to_hidden, LayerNorm, dense_to_output}`` — Linear 768 → 128 → GELU →
  LayerNorm → Linear 128 → 128.

Forward as released: the joint image embedding is the spatial mean of the projector applied to the
``layer4`` map (``ImageModel.forward``: ``projected_global_embedding``); the backbone feature is the
``layer4`` average; the text embedding is ``cls_projection_head`` of the last layer's CLS token
(``get_projected_text_embeddings``). Preprocessing (``create_chest_xray_transform_for_inference(512, 448)``):
bilinear resize of the shorter side to 512, centre crop 448, ``[0, 1]`` intensities repeated to 3 channels,
no mean/std normalisation.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.pretrained.formats import CheckpointFormat
from medvlp.pretrained.model import KeyLedger, PretrainedVLP, bert_from_state, load_strict, load_tokenizer
from medvlp.pretrained.preprocess import Preprocess
from medvlp.pretrained.surgery import LayoutError, load_state_file
from medvlp.pretrained.vision import resnet_from_torchvision

TOKENIZER = "microsoft/BiomedVLP-CXR-BERT-specialized"
NUM_HEADS = 12
PREPROCESS = Preprocess(image_size=448, resize=512, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3, text_max_length=512)


class PatchProjector(nn.Module):
    """hi-ml's ``MLP(use_1x1_convs=True)`` on the ``layer4`` map, averaged over positions (the joint image
    embedding); takes the backbone's ``ImageFeatures`` tokens through :meth:`project_map`."""

    def __init__(self, in_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(in_dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                   nn.Conv2d(hidden, out, 1, bias=True))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, out)``."""
        return self.model(feature_map).mean(dim=(2, 3))


class BioViLModel(PretrainedVLP):
    """:class:`PretrainedVLP` whose image projection acts on the ``layer4`` map rather than the pooled vector."""

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Joint-space image embedding (spatial mean of the projected ``layer4`` map)."""
        z = self.image_proj(self.image_features(image)["maps"][-1])  # type: ignore[typeddict-item]
        return F.normalize(z, dim=-1) if normalize else z


class CXRBertTower(nn.Module):
    """CXR-BERT: CLS of the last layer → ``cls_projection_head``; ``pooled`` is already projected."""

    def __init__(self, model: nn.Module, head: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.tokenizer = tokenizer
        self.max_length = PREPROCESS.text_max_length
        self.embed_dim = int(model.config.hidden_size)

    def forward(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``pooled`` = projected CLS embedding (before normalisation)."""
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        tokens = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return {"pooled": self.head(tokens[:, 0]), "tokens": tokens, "attention_mask": mask}


class _CXRBertHead(nn.Module):
    def __init__(self, hidden: int, proj: int) -> None:
        super().__init__()
        self.dense_to_hidden = nn.Linear(hidden, proj)
        self.LayerNorm = nn.LayerNorm(proj, eps=1e-12)
        self.dense_to_output = nn.Linear(proj, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_to_output(self.LayerNorm(F.gelu(self.dense_to_hidden(x))))


def build(sd: Mapping[str, torch.Tensor], source: str, text_path: str | None = None, tokenizer: str | None = None,
          allow_download: bool = False, **_: Any) -> PretrainedVLP:
    """Convert the BioViL image file (and, with ``text_path``, the CXR-BERT file) into a model."""
    led = KeyLedger(sd, source)
    trunk = {k: v for k, v in led.take("encoder.encoder.", ["conv1.weight"]).items() if not k.startswith("fc.")}
    image_encoder = resnet_from_torchvision(trunk, source)
    p = led.take("projector.model.", ["0.weight", "1.running_mean", "3.weight", "3.bias"])
    hidden, in_dim = p["0.weight"].shape[:2]
    projector = PatchProjector(int(in_dim), int(hidden), int(p["3.weight"].shape[0]))
    load_strict(projector, {f"model.{k}": v for k, v in p.items()}, source, "projector")
    led.finish()
    tower, text_proj = None, None
    if text_path:
        tled = KeyLedger(load_state_file(text_path), str(text_path))
        bert = bert_from_state(tled.take("bert.", ["embeddings.word_embeddings.weight"]), NUM_HEADS, str(text_path))
        h = tled.take("cls_projection_head.", ["dense_to_hidden.weight", "dense_to_output.weight"])
        head = _CXRBertHead(int(h["dense_to_hidden.weight"].shape[1]), int(h["dense_to_hidden.weight"].shape[0]))
        load_strict(head, h, str(text_path), "CXR-BERT projection head")
        tled.ignore("cls.predictions.", "masked-language-model head")
        tled.finish()
        tower, text_proj = CXRBertTower(bert, head, load_tokenizer(tokenizer or TOKENIZER, allow_download)), nn.Identity()
    elif tokenizer:
        raise LayoutError(f"{source}: a tokenizer was given but no text_path (the CXR-BERT weights file)")
    return BioViLModel("biovil", image_encoder, tower, projector, text_proj, PREPROCESS)


class BioViLFormat(CheckpointFormat):
    """``format: biovil`` (``path``: the image file; ``text_path``: CXR-BERT's ``pytorch_model.bin``)."""

    name = "biovil"
    layout_source = ("microsoft/hi-ml: hi-ml-multimodal/src/health_multimodal/image/model/{model,encoder,modules}.py, "
                     "text/model/modelling_cxrbert.py, image/data/transforms.py")
    paper = "Boecking et al., Making the Most of Text Semantics to Improve Biomedical Vision-Language Processing, ECCV 2022"
    file = "biovil_image_resnet50_proj_size_128.pt + CXR-BERT-specialized pytorch_model.bin"
    convert = staticmethod(build)  # type: ignore[assignment]
