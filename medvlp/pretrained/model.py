"""``PretrainedVLP``: a released (or exported) image–text model behind the harness's encoder API.

It holds an image encoder returning :class:`~medvlp.encoders.vit.ImageFeatures`, a BERT text tower, the
two projection heads of the source model and the source's :class:`Preprocess`; every protocol then calls
``encode_image`` / ``encode_text`` / ``image_representation`` / ``image_feature_maps`` as it does for a
medvlp-trained method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.checks import check_choice
from medvlp.encoders.vit import ImageFeatures, tokens_to_map
from medvlp.pretrained.preprocess import Preprocess
from medvlp.pretrained.surgery import LayoutError, StateDict, layout_error


class KeyLedger:
    """Tracks which checkpoint keys a converter used or ignored, so that none is silently dropped.

    Args:
        sd: the checkpoint's state dict.
        source: file name for messages.
    """

    def __init__(self, sd: Mapping[str, torch.Tensor], source: str) -> None:
        self.sd = dict(sd)
        self.source = source
        self.used: set[str] = set()
        self.ignored: dict[str, str] = {}

    def take(self, prefix: str, required: Sequence[str] = ()) -> StateDict:
        """Keys under ``prefix`` (prefix removed), marked used; ``required`` keys (relative) must exist."""
        out = {k[len(prefix):]: v for k, v in self.sd.items() if k.startswith(prefix)}
        missing = [r for r in required if r not in out]
        if not out or missing:
            raise layout_error(self.source, f"no keys under {prefix!r}" if not out else
                               f"missing {[prefix + m for m in missing]}", [prefix + r for r in required] or [prefix + "..."],
                               self.sd)
        self.used.update(prefix + k for k in out)
        return out

    def ignore(self, prefix: str, reason: str) -> None:
        """Mark keys starting with ``prefix`` as deliberately unused (training-only heads, buffers)."""
        for k in self.sd:
            if k.startswith(prefix) and k not in self.used:
                self.ignored[k] = reason

    def finish(self) -> None:
        """Raise naming every key that was neither used nor declared ignored."""
        left = sorted(set(self.sd) - self.used - set(self.ignored))
        if left:
            raise layout_error(self.source, f"{len(left)} unexpected key(s) {left[:6]}", sorted(self.used)[:12], self.sd)


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """``load_state_dict(strict=True)`` with a :class:`LayoutError` that names expected and found keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise layout_error(source, f"{what}: missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {shapes[:3]}",
                           own, sd)
    module.load_state_dict(dict(sd), strict=True)


def load_tokenizer(name_or_path: str, allow_download: bool = False) -> Any:
    """A Hugging Face tokenizer from a local folder, or from the hub cache (download only when allowed).

    Raises:
        FileNotFoundError: naming the tokenizer and how to provide it offline.
    """
    from transformers import AutoTokenizer  # lazy: heavy optional import (transformers)

    local = Path(name_or_path).expanduser()
    try:
        if local.is_dir():
            return AutoTokenizer.from_pretrained(str(local), local_files_only=True)
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"tokenizer {name_or_path!r} is not available offline ({type(exc).__name__}); pass tokenizer=<folder "
            "with vocab.txt/tokenizer.json> in the ckpt spec, or allow_download: true") from exc


def bert_from_state(sd: Mapping[str, torch.Tensor], num_heads: int, source: str, layer_norm_eps: float = 1e-12,
                    token_types: bool = True) -> nn.Module:
    """Build a ``transformers.BertModel`` whose sizes are read from ``sd`` and load it strictly.

    ``token_types=False`` is for BLIP/MGCA-style BERTs without a token-type embedding: the model's
    token-type table gets one zero row, so it adds nothing.
    """
    from transformers import BertConfig, BertModel  # lazy: heavy optional import (transformers)

    sd = {k: v for k, v in sd.items() if k != "embeddings.position_ids"}
    need = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "encoder.layer.0.intermediate.dense.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise layout_error(source, f"not a BERT state dict (missing {missing})", need, sd)
    vocab, hidden = sd["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    cfg = BertConfig(vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers,
                     num_attention_heads=num_heads, intermediate_size=int(sd["encoder.layer.0.intermediate.dense.weight"].shape[0]),
                     max_position_embeddings=int(sd["embeddings.position_embeddings.weight"].shape[0]),
                     type_vocab_size=int(sd["embeddings.token_type_embeddings.weight"].shape[0]) if token_types else 1,
                     layer_norm_eps=layer_norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(cfg, add_pooling_layer="pooler.dense.weight" in sd)
    if not token_types:
        sd = {**sd, "embeddings.token_type_embeddings.weight": torch.zeros(1, int(hidden))}
    load_strict(model, sd, source, "text encoder")
    return model.eval()


class BertTower(nn.Module):
    """Tokenizer + ``BertModel`` with CLS pooling.

    Args:
        model: the BERT.
        tokenizer: its tokenizer.
        max_length: truncation length.
        position_ids: ``default`` (0..L-1) or ``token_type`` (MGCA's official forward passes the token-type ids
            — all zeros — in the position-ids slot, so every token gets position 0; reproduced as released).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int, position_ids: str = "default") -> None:
        super().__init__()
        check_choice("position_ids", position_ids, ("default", "token_type"), type(self).__name__)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.position_ids = position_ids
        self.embed_dim = int(model.config.hidden_size)

    def forward(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``pooled`` (CLS), ``tokens`` and ``attention_mask`` of raw strings."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        kwargs: dict[str, Any] = {}
        if self.position_ids == "token_type":
            kwargs["position_ids"] = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])).to(device)
        tokens = self.model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), **kwargs).last_hidden_state
        return {"pooled": tokens[:, 0], "tokens": tokens, "attention_mask": mask}


class PretrainedVLP(nn.Module):
    """Encoder API over converted weights (see module docstring).

    Args:
        name: format name (shown as the method in results).
        image_encoder: module returning ``ImageFeatures``.
        text_encoder: :class:`BertTower` (or any module with the same output).
        image_proj: pooled image feature → joint space.
        text_proj: pooled text feature → joint space.
        preprocess: the source model's preprocessing.
        logit_scale: the source's learned ``log(1/τ)`` when it has one.
    """

    def __init__(self, name: str, image_encoder: nn.Module, text_encoder: nn.Module | None, image_proj: nn.Module,
                 text_proj: nn.Module | None, preprocess: Preprocess, logit_scale: float | None = None) -> None:
        super().__init__()
        self.name = name
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_proj = image_proj
        self.text_proj = text_proj
        self.preprocess = preprocess
        self.logit_scale = logit_scale
        self.eval()

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """Input dimensionalities the image encoder accepts."""
        return tuple(getattr(self.image_encoder, "spatial_dims", (self.preprocess.spatial_dims,)))

    def image_features(self, image: torch.Tensor) -> ImageFeatures:
        """Backbone features of a batch in the datamodule convention (the model's preprocessing applied)."""
        return self.image_encoder(self.preprocess(image))

    def image_representation(self, image: torch.Tensor) -> torch.Tensor:
        """Backbone global feature before projection (linear probing)."""
        return self.image_features(image)["pooled"]

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Joint-space image embedding."""
        z = self.image_proj(self.image_representation(image))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Joint-space text embedding of raw strings."""
        if self.text_encoder is None or self.text_proj is None:
            raise ValueError(f"{self.name}: this checkpoint has no text encoder")
        z = self.text_proj(self.text_encoder(list(texts))["pooled"])
        return F.normalize(z, dim=-1) if normalize else z

    def image_feature_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Multi-level maps for segmentation decoders (ResNet/Swin stages, or ViT blocks as grids)."""
        feats = self.image_features(image)
        if "maps" in feats:
            return list(feats["maps"])  # type: ignore[typeddict-item]
        return [tokens_to_map(h, feats["grid"]) for h in feats["hidden"]]

    def image_backbone(self) -> nn.Module:
        """The image encoder, for fine-tuning."""
        return self.image_encoder

    def zero_shot_classifier(self, class_prompts: Mapping[str, Sequence[str]]) -> torch.Tensor:
        """``(K, E)`` class embeddings: mean of normalised prompt embeddings."""
        rows = [F.normalize(self.encode_text(list(p)).mean(0), dim=-1) for p in class_prompts.values()]
        return torch.stack(rows)

    def train(self, mode: bool = True) -> "PretrainedVLP":
        """Train mode for the image encoder only when fine-tuned; projection BatchNorms stay in eval (their
        running statistics are part of the released model)."""
        super().train(mode)
        for head in (self.image_proj, self.text_proj):
            if head is not None:
                head.eval()
        return self


__all__ = ["BertTower", "KeyLedger", "LayoutError", "PretrainedVLP", "bert_from_state", "load_strict", "load_tokenizer"]
