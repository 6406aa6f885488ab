"""``VLPMethod``: the one LightningModule base class that owns the training loop.

A method subclasses it, adds heads, implements :meth:`VLPMethod.compute_losses` returning a dict whose
``*_loss`` entries are weighted (``loss_weights``) and summed, and declares ``required_keys``. The base
owns ``training_step``/``validation_step``, logging, the non-finite guard, optimizer parameter groups
and the warm-up cosine schedule, EMA (momentum) pairs, checkpoint metadata, and the encoder API that
the benchmark harness uses: :meth:`encode_image`, :meth:`encode_text`, :meth:`image_feature_maps`,
:meth:`image_representation`, :meth:`image_backbone`, :meth:`zero_shot_classifier` and
:meth:`dense_text_similarity`.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from medvlp.batch import batch_size, check_required_keys, is_multimodal
from medvlp.config import reads_environment, resolve_environment, to_container
from medvlp.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER, ProjectionHead, build_encoder
from medvlp.encoders.vit import ImageFeatures, tokens_to_map
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from medvlp.io import safe_load
from medvlp.registry import METHODS

DEFAULT_OPTIMIZER: dict[str, Any] = {
    "lr": 2e-5,
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "text_lr_mult": 1.0,
    "warmup_ratio": 0.0,
    "min_lr_ratio": 0.0,
    "schedule": "cosine",
    "restart_steps": 0,
    "decay_all": False,
}


class NonFiniteLossError(FloatingPointError):
    """A loss term or gradient became NaN/Inf; the message names the term (or parameter) and step."""


class VLPMethod(L.LightningModule):
    """Base class for vision-language pretraining objectives.

    Args:
        image_encoder: ``{class_path, init_args}`` or init args of :class:`~medvlp.encoders.ViTEncoder`.
        text_encoder: ``{class_path, init_args}`` or init args of :class:`~medvlp.encoders.TextEncoder`.
        embed_dim: width of the shared image–text embedding space.
        proj_hidden_dim: hidden width of the projection heads (defaults to the encoder width).
        proj_layers: Linear layers per projection head (2 = MGCA/ASG ``GlobalEmbedding``).
        proj_norm: ``bn`` (MGCA/ASG/GTGM heads) | ``ln`` | ``none``.
        temperature: contrastive temperature τ (initial value when learnable).
        learn_temperature: learn ``log(1/τ)`` as in CLIP (clamped to τ ≥ 0.01).
        gather_negatives: gather embeddings across ranks for global negatives (off = per-device, as in
            the official MGCA/ASG/GTGM code).
        loss_weights: weight per loss term (see :meth:`_weight` for the matching rule); unlisted terms weigh
            1; a key naming no term of the method is an error.
        optimizer: keys of ``DEFAULT_OPTIMIZER`` (``lr``, ``weight_decay``, ``betas``, ``text_lr_mult``,
            ``warmup_ratio``, ``min_lr_ratio``, ``schedule`` ∈ {cosine, constant, cosine_restarts},
            ``restart_steps`` (period T₀ of ``cosine_restarts``: SGDR / ``CosineAnnealingWarmRestarts`` with
            T_mult 1, floor ``min_lr_ratio · lr``), ``decay_all`` (weight decay also on biases, norms and
            embeddings, as ``AdamW(model.parameters())`` in GTGM's code)).
        ema_momentum: ``[start, end]`` momentum of EMA pairs, cosine-increased over training.
        nan_guard: raise :class:`NonFiniteLossError` on a non-finite loss term or gradient.
        compile_encoders: wrap the encoders' ``forward`` with ``torch.compile`` at fit start (parameter
            names and checkpoints are unchanged).
    """

    name: ClassVar[str] = "base"
    required_keys: ClassVar[frozenset[str]] = frozenset({"image", "text"})
    #: every ``*_loss`` term :meth:`compute_losses` can return (unprefixed); ``loss_weights`` keys are checked
    #: against it at construction (empty: checked against the terms of the first step instead)
    loss_terms: ClassVar[tuple[str, ...]] = ()
    #: whether the objective uses :attr:`temperature` (logged as ``train/temperature`` only then)
    uses_temperature: ClassVar[bool] = True
    #: datamodule spec this method trains on in the demo and the contract tests
    example_data: ClassVar[dict[str, Any]] = {"name": "phantom", "init_args": {"modality": "xray"}}

    def __init__(
        self,
        image_encoder: Mapping[str, Any] | None = None,
        text_encoder: Mapping[str, Any] | None = None,
        embed_dim: int = 128,
        proj_hidden_dim: int | None = None,
        proj_layers: int = 2,
        proj_norm: str = "bn",
        temperature: float = 0.07,
        learn_temperature: bool = False,
        gather_negatives: bool = False,
        loss_weights: Mapping[str, float] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        ema_momentum: Sequence[float] = (0.996, 1.0),
        nan_guard: bool = True,
        compile_encoders: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.image_encoder = build_encoder(to_container(image_encoder) or {}, DEFAULT_IMAGE_ENCODER)
        self.text_encoder = build_encoder(to_container(text_encoder) or {}, DEFAULT_TEXT_ENCODER)
        self.embed_dim = embed_dim
        self.image_proj = ProjectionHead(self.image_encoder.embed_dim, embed_dim, proj_hidden_dim, proj_layers,
                                         proj_norm)  # type: ignore[arg-type]
        self.text_proj = ProjectionHead(self.text_encoder.embed_dim, embed_dim, proj_hidden_dim, proj_layers,
                                        proj_norm)  # type: ignore[arg-type]
        init = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.gather_negatives = gather_negatives
        self.loss_weights = {str(k): float(v) for k, v in dict(to_container(loss_weights) or {}).items()}
        self._weights_checked = False
        if self.loss_terms:
            self._check_weight_keys(self.loss_terms)
        self.optim_cfg = {**DEFAULT_OPTIMIZER, **dict(to_container(optimizer) or {})}
        unknown = set(self.optim_cfg) - set(DEFAULT_OPTIMIZER)
        if unknown:
            raise ValueError(f"unknown optimizer keys {sorted(unknown)}; known: {sorted(DEFAULT_OPTIMIZER)}")
        self.ema_momentum = tuple(ema_momentum)
        self.nan_guard = nan_guard
        self.compile_encoders = compile_encoders

    def setup(self, stage: str) -> None:
        if self.compile_encoders and stage == "fit":
            for module in self.compile_targets():
                if not getattr(module, "_medvlp_compiled", False):
                    # dynamic=None: a second shape of a path (another batch or sequence length) marks the
                    # changing dims dynamic instead of compiling one graph per shape
                    module.forward = torch.compile(module.forward, dynamic=None)  # type: ignore[method-assign]
                    module._medvlp_compiled = True

    def compile_targets(self) -> list[nn.Module]:
        """Modules whose ``forward`` ``compile_encoders`` compiles (parameter names stay unchanged): the
        image encoder, and the text encoder's transformer only — tokenisation (Python strings) stays outside
        the graph, where every new report would otherwise be a guard failure and a recompilation."""
        text = getattr(self.text_encoder, "model", self.text_encoder)
        return [self.image_encoder, text]

    # ------------------------------------------------------------------ what a method implements
    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Return the objective's terms; keys ending in ``_loss`` are weighted and summed.

        Other keys (e.g. ``acc``) are logged but not optimised.
        """
        raise NotImplementedError

    def compute_multimodal_losses(self, batches: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Losses for a dict of per-modality batches; default: per-modality terms prefixed by modality."""
        out: dict[str, torch.Tensor] = {}
        for modality, sub in batches.items():
            for k, v in self.compute_losses(sub).items():
                out[f"{modality}_{k}"] = v
        return out

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, ema_target)`` module pairs updated after every optimiser step."""
        return []

    # ------------------------------------------------------------------ encoder API (benchmarks)
    @property
    def temperature(self) -> torch.Tensor:
        """Current τ (clamped at 0.01 as CLIP clamps its logit scale at 100)."""
        return 1.0 / self.logit_scale.exp().clamp(max=100.0)

    def image_features(self, image: torch.Tensor, token_mask: torch.Tensor | None = None) -> ImageFeatures:
        """Backbone features (pooled, tokens, grid, hidden) of a 2D or 3D batch."""
        return self.image_encoder(image, token_mask) if token_mask is not None else self.image_encoder(image)

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Global image embedding ``(B, embed_dim)`` in the joint space."""
        z = self.image_proj(self.image_features(image)["pooled"])
        return F.normalize(z, dim=-1) if normalize else z

    def image_representation(self, image: torch.Tensor) -> torch.Tensor:
        """Backbone global feature ``(B, D_backbone)`` before projection (linear probing, as MGCA)."""
        return self.image_features(image)["pooled"]

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Global text embedding ``(B, embed_dim)`` of raw strings."""
        z = self.text_proj(self.text_encoder(list(texts))["pooled"])
        return F.normalize(z, dim=-1) if normalize else z

    def image_feature_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Multi-level backbone maps ``(B, D, *grid)`` for segmentation decoders."""
        feats = self.image_features(image)
        if "maps" in feats:  # hierarchical encoders (Swin) return their stage maps directly
            return list(feats["maps"])  # type: ignore[typeddict-item]
        return [tokens_to_map(h, feats["grid"]) for h in feats["hidden"]]

    def dense_text_similarity(self, image: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """``(B, h, w)`` cosine similarity of text ``i`` with every patch cell of image ``i`` (2D).

        Default (dense CLIP in the spirit of MaskCLIP, Zhou et al. 2022): the global image projection
        :attr:`image_proj` applied to each final patch token (BN heads use their running statistics: call
        in eval mode), L2-normalised, dot the normalised :meth:`encode_text` embedding. Deviation from
        MaskCLIP: the projected tokens are the backbone's output patch tokens, not the value embeddings of
        its last attention layer. Methods with a local image–text head override it (ASG).
        """
        feats = self.dense_image_features(image, texts)
        patches = F.normalize(self.image_proj(feats["tokens"]), dim=-1)
        text = self.encode_text(list(texts)).to(patches.dtype)
        return torch.einsum("bne,be->bn", patches, text).reshape(image.shape[0], *feats["grid"])

    def dense_image_features(self, image: torch.Tensor, texts: Sequence[str]) -> ImageFeatures:
        """:meth:`image_features` of 2D ``image`` for a dense map against ``texts`` (text ``i`` ↔ image ``i``).

        Raises:
            ValueError: for a non-2D token grid or a text count that differs from the batch size.
        """
        feats = self.image_features(image)
        if len(feats["grid"]) != 2:
            raise ValueError(f"dense_text_similarity needs 2D images, got a token grid {tuple(feats['grid'])}")
        if len(texts) != image.shape[0]:
            raise ValueError(f"dense_text_similarity pairs text i with image i: {len(texts)} texts, {image.shape[0]} images")
        return feats

    def image_backbone(self) -> nn.Module:
        """The image encoder, for fine-tuning."""
        return self.image_encoder

    def zero_shot_classifier(self, class_prompts: Mapping[str, Sequence[str]]) -> torch.Tensor:
        """``(K, embed_dim)`` class embeddings: mean of normalised prompt embeddings (CLIP recipe)."""
        rows = []
        for prompts in class_prompts.values():
            rows.append(F.normalize(self.encode_text(list(prompts)).mean(0), dim=-1))
        return torch.stack(rows)

    # ------------------------------------------------------------------ the loop
    def _losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        check_required_keys(batch, self.required_keys, type(self).__name__)
        if is_multimodal(batch):
            return self.compute_multimodal_losses(batch)
        return self.compute_losses(batch)

    def _total(self, terms: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        loss_terms = {k: v for k, v in terms.items() if k.endswith("_loss")}
        if not loss_terms:
            raise ValueError(f"{type(self).__name__}.compute_losses returned no '*_loss' key: {sorted(terms)}")
        if self.nan_guard and not all_finite(list(loss_terms.values())):  # one host sync for all terms
            k, v = next((k, v) for k, v in loss_terms.items() if not torch.isfinite(v).all())
            raise NonFiniteLossError(
                f"{type(self).__name__}: loss term {k!r} is {v.detach().float().mean().item()} at {stage} step "
                f"{self.global_step}")
        if not self._weights_checked:  # methods without declared loss_terms: check against the first step's terms
            self._check_weight_keys(list(loss_terms))
        return sum(self._weight(k) * v for k, v in loss_terms.items())  # type: ignore[return-value]

    def _weight(self, key: str) -> float:
        """Weight of a produced loss term ``key``.

        Rule: an exact ``loss_weights`` key wins; otherwise the key is ``<modality>_<term>`` for the longest
        registered term (:attr:`loss_terms`) it ends with (a prefix of any length, e.g.
        ``msd_liver_barlow_loss`` → ``barlow_loss``; ``ct_pseudo_itc_loss`` → ``pseudo_itc_loss``, not
        ``itc_loss``) and takes that term's weight; methods without declared terms use the longest weight key
        ``w`` with ``key.endswith("_" + w)``; otherwise 1. Weight keys that name no term the
        method can produce (:attr:`loss_terms`, or the terms seen at the first step) raise ``ValueError``.
        """
        if key in self.loss_weights:
            return float(self.loss_weights[key])
        if self.loss_terms:  # the registered term this key names (longest, so pseudo_itc_loss is not itc_loss)
            terms = [t for t in self.loss_terms if key == t or key.endswith("_" + t)]
            term = max(terms, key=len) if terms else None
            return float(self.loss_weights.get(term, 1.0)) if term else 1.0
        matches = [w for w in self.loss_weights if key.endswith("_" + w)]
        return float(self.loss_weights[max(matches, key=len)]) if matches else 1.0

    def _check_weight_keys(self, produced: Sequence[str]) -> None:
        """Raise on ``loss_weights`` keys that match none of ``produced`` (exactly or as a suffix)."""
        known = set(produced)
        unknown = [w for w in self.loss_weights
                   if not any(t == w or t.endswith("_" + w) or w.endswith("_" + t) for t in known)]
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown loss_weights keys {sorted(unknown)}; "
                             f"known loss terms: {sorted(known)}")
        self._weights_checked = True

    def _log_terms(self, terms: Mapping[str, torch.Tensor], total: torch.Tensor, stage: str, bs: int) -> None:
        on_step = stage == "train"
        self.log(f"{stage}/loss", total, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=bs,
                 sync_dist=not on_step)
        for k, v in terms.items():
            self.log(f"{stage}/{k}", v.detach().float(), on_step=on_step, on_epoch=True, batch_size=bs,
                     sync_dist=not on_step)

    def _bs(self, batch: Mapping[str, Any]) -> int:
        if is_multimodal(batch):
            return sum(batch_size(b) for b in batch.values())
        return batch_size(batch)

    def training_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every sample of the batch was skipped under the datamodule's policy
            return None
        terms = self._losses(batch)
        total = self._total(terms, "train")
        self._log_terms(terms, total, "train", self._bs(batch))
        if self.uses_temperature:
            self.log("train/temperature", self.temperature, on_step=True, on_epoch=False)
        return total

    def validation_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:
            return None
        terms = self._losses(batch)
        total = self._total(terms, "val")
        self._log_terms(terms, total, "val", self._bs(batch))
        return total

    def on_after_backward(self) -> None:
        if not self.nan_guard or _grad_scaler(self) is not None:
            return  # a GradScaler (16-mixed) expects scaled-gradient overflow and skips those steps itself
        named = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        if all_finite([g for _, g in named]):  # one fused check, one host sync
            return
        name = next(name for name, g in named if not torch.isfinite(g).all())
        raise NonFiniteLossError(f"{type(self).__name__}: non-finite gradient in {name!r} at step {self.global_step}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pairs = self.momentum_pairs()
        if not pairs:
            return
        m = self.current_momentum()
        root = getattr(getattr(getattr(self, "_trainer", None), "strategy", None), "model", None)
        for online, target in pairs:
            ema_update(online, target, m, root=root)

    def current_momentum(self) -> float:
        """EMA momentum, cosine-increased from ``ema_momentum[0]`` to ``ema_momentum[1]`` (BYOL eq. in §3.2)."""
        start, end = self.ema_momentum
        total = self._total_steps()
        progress = min(self.global_step / max(total, 1), 1.0)
        return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2

    # ------------------------------------------------------------------ optimisation
    def _total_steps(self) -> int:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 1
        try:
            return max(int(trainer.estimated_stepping_batches), 1)
        except Exception:
            return 1

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on biases, norms and embeddings; text encoder lr × ``text_lr_mult``."""
        lr, wd = self.optim_cfg["lr"], self.optim_cfg["weight_decay"]
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        text_ids = {id(p) for p in self.text_encoder.parameters()}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = not self.optim_cfg["decay_all"] and (
                p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name)
            groups.setdefault((id(p) in text_ids, no_decay), []).append(p)
        out = []
        for (is_text, no_decay), params in sorted(groups.items()):
            out.append({
                "params": params,
                "lr": lr * (self.optim_cfg["text_lr_mult"] if is_text else 1.0),
                "weight_decay": 0.0 if no_decay else wd,
                "name": f"{'text' if is_text else 'vision'}_{'no_decay' if no_decay else 'decay'}",
            })
        return out

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.param_groups(), betas=tuple(self.optim_cfg["betas"]))
        total = self._total_steps()
        warmup = int(total * float(self.optim_cfg["warmup_ratio"]))
        min_ratio = float(self.optim_cfg["min_lr_ratio"])
        schedule = self.optim_cfg["schedule"]
        if schedule not in ("cosine", "constant", "cosine_restarts"):
            raise ValueError(f"optimizer.schedule must be cosine|constant|cosine_restarts, got {schedule!r}")
        period = int(self.optim_cfg["restart_steps"])
        if schedule == "cosine_restarts" and period <= 0:
            raise ValueError(f"optimizer.schedule cosine_restarts needs restart_steps > 0, got {period}")

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(warmup, 1)
            if schedule == "constant":
                return 1.0
            if schedule == "cosine_restarts":  # T_cur = steps since the last restart
                cycle = ((step - warmup) % period) / period
                return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * cycle))
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def persist_hparams(self, values: Mapping[str, Any]) -> None:
        """Store ``values`` instead of the built-with values of those hyperparameters wherever they are
        written (Lightning's ``hparams.yaml``, checkpoints): the literal ``${oc.env:NAME}`` of arguments read
        from the environment, so no environment value is persisted."""
        self._persisted_hparams = {**getattr(self, "_persisted_hparams", {}), **dict(values)}
        initial = getattr(self, "_hparams_initial", None)
        if initial is not None:  # what loggers write to hparams.yaml
            for k, v in values.items():
                initial[k] = v

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hparams = _plain({**dict(self.hparams), **getattr(self, "_persisted_hparams", {})})
        checkpoint["hyper_parameters"] = hparams
        checkpoint["medvlp"] = {
            "method": self.name,
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "hparams": hparams,
        }


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host synchronisation in total.

    Each tensor is reduced on its device to one flag (no sync); the flags are stacked and read once.
    """
    if not tensors:
        return True
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def _grad_scaler(module: L.LightningModule) -> Any:
    trainer = getattr(module, "_trainer", None)
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    return getattr(plugin, "scaler", None)


def ema_update(online: nn.Module, target: nn.Module, momentum: float, root: nn.Module | None = None) -> None:
    """``θ_target ← m·θ_target + (1−m)·θ_online`` for parameters (fused ``_foreach`` ops); buffers are copied.

    Args:
        online, target: modules with the same parameter structure.
        momentum: ``m``.
        root: the FSDP-wrapped model when training under FSDP. Sharded online and target parameters are
            flattened into different shards (their local views differ in size, even empty on some ranks),
            so the update runs inside ``summon_full_params(root, writeback=True)`` on every rank.

    Raises:
        ValueError: when the two modules' parameters do not pair up (names the first mismatch).
    """

    if isinstance(root, FSDP):
        with FSDP.summon_full_params(root, writeback=True, with_grads=False):
            _ema_local(online, target, momentum)
    else:
        _ema_local(online, target, momentum)


@torch.no_grad()
def _ema_local(online: nn.Module, target: nn.Module, momentum: float) -> None:
    po, pt = list(online.parameters()), list(target.parameters())
    bad = next((i for i, (a, b) in enumerate(zip(po, pt)) if a.shape != b.shape), None)
    if len(po) != len(pt) or bad is not None:
        raise ValueError(f"EMA pair does not match: {len(po)} vs {len(pt)} parameters"
                         + (f", parameter {bad}: {tuple(po[bad].shape)} vs {tuple(pt[bad].shape)}" if bad is not None else "")
                         + " (under FSDP pass the wrapped model as root)")
    if pt:
        torch._foreach_mul_(pt, momentum)
        torch._foreach_add_(pt, po, alpha=1.0 - momentum)
    for bo, bt in zip(online.buffers(), target.buffers()):
        bt.copy_(bo)


def _plain(x: Any) -> Any:
    """Convert to containers that ``torch.load(weights_only=True)`` accepts."""
    x = to_container(x)
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    raise TypeError(f"hyperparameter value {x!r} of type {type(x).__name__} cannot be stored safely")


def load_method(path: str, map_location: str = "cpu", allow_class_path: bool = False) -> VLPMethod:
    """Rebuild a method from a medvlp checkpoint, loading with ``weights_only=True``.

    The checkpoint's metadata may name only a *registered* method; its recorded ``class_path`` is used
    only with ``allow_class_path=True`` and then only if it names a :class:`VLPMethod` subclass. Nested
    encoder specs in the hyperparameters resolve only to ``nn.Module`` subclasses. All checks run before
    any class is called.

    Raises:
        ValueError: naming the file when it is not a medvlp checkpoint, names an unregistered method
            (without ``allow_class_path``), or its class path is not a ``VLPMethod``.
    """

    ckpt = safe_load(path, map_location)
    meta = ckpt.get("medvlp") if isinstance(ckpt, dict) else None
    if not meta or not isinstance(meta, Mapping):
        raise ValueError(f"{path} is not a medvlp checkpoint (no 'medvlp' metadata)")
    name, class_path = meta.get("method"), meta.get("class_path")
    if isinstance(name, str) and name in METHODS:
        cls = METHODS.get(name)
    elif allow_class_path:
        cls = METHODS.get(str(class_path))  # a class path resolves only to a VLPMethod subclass
    else:
        raise ValueError(
            f"{path}: checkpoint names method {name!r} (class_path {class_path!r}), which is not registered; "
            f"registered: {', '.join(METHODS.names())}. Install its plugin, or pass allow_class_path=true to "
            f"import the class path (only a VLPMethod subclass is accepted)")
    hparams = meta.get("hparams") or {}
    if not isinstance(hparams, Mapping):
        raise ValueError(f"{path}: checkpoint hparams must be a mapping, got {type(hparams).__name__}")
    env_keys = {k: v for k, v in hparams.items() if reads_environment(v)}  # stored as ${oc.env:NAME}
    model = cls(**{**hparams, **resolve_environment(env_keys)})  # reads no file: the weights replace any init_from
    model.persist_hparams(env_keys)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: state dict mismatch for {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
