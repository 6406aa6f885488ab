"""Loss functions: pure tensor-in, tensor-out functions, testable without Lightning."""
from medvlp.losses.alignment import region_sentence_alignment_loss
from medvlp.losses.barlow import barlow_twins_loss
from medvlp.losses.contrastive import (
    asg_soft_targets,
    clip_loss,
    contrastive_logits,
    soft_target_contrastive_loss,
    symmetric_kl_contrastive_loss,
)
from medvlp.losses.distill import masked_token_distillation_loss
from medvlp.losses.distributed import gather_global, gather_tensor, gather_with_grad

__all__ = [
    "asg_soft_targets",
    "barlow_twins_loss",
    "clip_loss",
    "contrastive_logits",
    "gather_global",
    "gather_tensor",
    "gather_with_grad",
    "masked_token_distillation_loss",
    "region_sentence_alignment_loss",
    "soft_target_contrastive_loss",
    "symmetric_kl_contrastive_loss",
]
