"""Multi-GPU strategies from YAML: FSDP with wrapping and activation checkpointing by block class.

``trainer.strategy`` stays a Lightning string (``ddp``, ``fsdp``, ``auto`` …) or becomes a mapping::

    trainer:
      strategy:
        name: fsdp                           # or ddp
        auto_wrap_policy: [vit_block, bert_layer]
        activation_checkpointing_policy: [vit_block, bert_layer]
        sharding_strategy: FULL_SHARD        # other keys go to Lightning's FSDPStrategy / DDPStrategy

Block names are aliases (:data:`BLOCK_ALIASES`) or dotted class paths; each must resolve to an
``nn.Module`` subclass (checked through :func:`medvlp.registry.import_class_path` before anything is built).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn
from medvlp.registry import import_class_path
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import DDPStrategy

#: short names of the wrap/checkpoint units of the built-in encoders
BLOCK_ALIASES: dict[str, str] = {
    "vit_block": "medvlp.encoders.vit.Block",
    "bert_layer": "transformers.models.bert.modeling_bert.BertLayer",
    "swin_stage": "monai.networks.nets.swin_unetr.BasicLayer",
}
POLICY_KEYS = ("auto_wrap_policy", "activation_checkpointing_policy")


def block_classes(names: Any, key: str) -> set[type[nn.Module]]:
    """Resolve a list of aliases / class paths to ``nn.Module`` subclasses.

    Raises:
        ValueError: naming ``key`` when the value is not a list of strings.
        ClassPathError: when a name is not an importable ``nn.Module`` subclass.
    """

    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"trainer.strategy.{key} must be a list of block names {sorted(BLOCK_ALIASES)} or class "
                         f"paths, got {names!r}")
    return {import_class_path(BLOCK_ALIASES.get(n, n), nn.Module, f"nn.Module block for {key}") for n in names}


def build_strategy(spec: Any) -> Any:
    """Lightning strategy for ``trainer.strategy``: strings pass through; a mapping builds an
    ``FSDPStrategy`` (``name: fsdp``) or ``DDPStrategy`` (``name: ddp``) with block-class policies.

    Raises:
        ValueError: naming the key for an unknown ``name`` or a malformed policy.
    """
    if spec is None or isinstance(spec, str) or not isinstance(spec, Mapping):
        return spec
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    for key in POLICY_KEYS:
        if key in kwargs:
            kwargs[key] = block_classes(kwargs[key], key)
    if name == "fsdp":

        return FSDPStrategy(**kwargs)
    if name == "ddp":
        if set(POLICY_KEYS) & set(kwargs):
            raise ValueError("trainer.strategy: auto_wrap_policy/activation_checkpointing_policy need name: fsdp "
                             "(under DDP use the encoders' grad_checkpointing)")

        return DDPStrategy(**kwargs)
    raise ValueError(f"trainer.strategy.name must be fsdp or ddp when strategy is a mapping, got {name!r}")
