"""Every official value in a method's packaged YAML, pinned against its source (file:line at the named
commit): changing one (e.g. asg.yaml soft_label_weight 0.2 → 0.3) fails here."""
from __future__ import annotations

from importlib import resources
from typing import Any

import pytest
import yaml

ASG = "ASGMVLP/ASGMVLP_CODE @ 088e896"
GTGM = "ydchen0806/GTGM @ e92b287"
MGCA = "HKU-MedAI/MGCA @ 680fe4a"

#: (packaged file, dotted key, official value, source file:line)
OFFICIAL: list[tuple[str, str, Any, str]] = [
    ("asg.yaml", "embed_dim", 128, f"{ASG} main.py L26 emb_dim=128"),
    ("asg.yaml", "proj_hidden_dim", 2048, f"{ASG} models/encoder.py L18 hidden_dim=2048"),
    ("asg.yaml", "local_hidden_dim", 2048, f"{ASG} models/encoder.py L35-43 LocalEmbedding(…, 2048, …)"),
    ("asg.yaml", "temperature", 0.07, f"{ASG} main.py L257 --softmax_temperature 0.07"),
    ("asg.yaml", "local_temperature", 0.07, f"{ASG} main.py L130 scores_re /= softmax_temperature"),
    ("asg.yaml", "decoder_layers", 4, f"{ASG} models/irl_model.py L15 TransformerDecoder(decoder_layer, 4)"),
    ("asg.yaml", "decoder_heads", 4, f"{ASG} models/irl_model.py L13 TransformerDecoderLayer(d_model, 4, 1024)"),
    ("asg.yaml", "decoder_ffn", 1024, f"{ASG} models/irl_model.py L13 dim_feedforward 1024"),
    ("asg.yaml", "soft_label_weight", 0.2, f"{ASG} main.py L157 0.8 * hard_label + 0.2 * soft_label"),
    ("asg.yaml", "loss_weights.ira_loss", 1.0, f"{ASG} main.py L180 loss_ira + loss_arsa + 5 * loss_bce + loss_soft"),
    ("asg.yaml", "loss_weights.arsa_loss", 1.0, f"{ASG} main.py L180"),
    ("asg.yaml", "loss_weights.irl_loss", 5.0, f"{ASG} main.py L180 5 * loss_bce"),
    ("asg.yaml", "loss_weights.erl_loss", 1.0, f"{ASG} main.py L180"),
    ("asg.yaml", "optimizer.lr", 4.0e-5, f"{ASG} main.py L258 --learning_rate 4e-5"),
    ("asg.yaml", "optimizer.weight_decay", 0.05, f"{ASG} main.py L260 --weight_decay 0.05"),
    ("asg.yaml", "optimizer.betas", [0.9, 0.999], f"{ASG} main.py L233, L259 betas=(momentum 0.9, 0.999)"),
    ("asg.yaml", "optimizer.decay_all", True, f"{ASG} main.py L229-235 AdamW(self.parameters(), …)"),
    ("asg.yaml", "optimizer.warmup_ratio", 0.4, f"{ASG} main.py L242 warmup_steps=int(training_steps * 0.4)"),
    ("asg.yaml", "optimizer.min_lr_ratio", 1e-8 / 4e-5, f"{ASG} main.py L241 min_lr=1e-8 (÷ lr 4e-5)"),
    ("asg.paper.yaml", "method.init_args.optimizer.lr", 4.0e-5, f"{ASG} main.py L258"),
    ("asg.paper.yaml", "method.init_args.optimizer.weight_decay", 0.05, f"{ASG} main.py L260"),
    ("asg.paper.yaml", "method.init_args.optimizer.decay_all", True, f"{ASG} main.py L229-235"),
    ("asg.paper.yaml", "method.init_args.optimizer.warmup_ratio", 0.4, f"{ASG} main.py L242"),
    ("asg.paper.yaml", "method.init_args.optimizer.min_lr_ratio", 1e-8 / 4e-5, f"{ASG} main.py L241"),
    ("asg.paper.yaml", "trainer.max_epochs", 50, f"{ASG} main.py L285 args.max_epochs = 50"),
    ("asg.paper.yaml", "trainer.deterministic", True, f"{ASG} main.py L284 args.deterministic = True"),
    ("asg.paper.yaml", "run.seed", 42, f"{ASG} main.py L262 --seed 42"),
    ("asg.paper.yaml", "data.init_args.batch_size", 72, f"{ASG} main.py L261 --batch_size 72"),
    ("gtgm.yaml", "embed_dim", 512, f"{GTGM} pretrain/utils/utils_builder.py L31-32 Linear(2048, 512), BN(512)"),
    ("gtgm.yaml", "proj_hidden_dim", 2048, f"{GTGM} pretrain/utils/utils_builder.py L28-29 Linear(2048, 2048)"),
    ("gtgm.yaml", "temperature", 0.07, f"{GTGM} pretrain/utils/utils_trainer.py L163 sim * 1 / 0.07"),
    ("gtgm.yaml", "barlow_lambda", 0.0051, f"{GTGM} pretrain/utils/utils_trainer.py L141 on_diag + 0.0051*off_diag"),
    ("gtgm.yaml", "loss_weights.clip1_loss", 1.0, f"{GTGM} pretrain/utils/utils_trainer.py L297"),
    ("gtgm.yaml", "loss_weights.clip2_loss", 1.0, f"{GTGM} pretrain/utils/utils_trainer.py L297"),
    ("gtgm.yaml", "loss_weights.barlow_loss", 0.01, f"{GTGM} pretrain/utils/utils_trainer.py L295 covar_loss(…) * 0.01"),
    ("gtgm.yaml", "optimizer.lr", 2.0e-5, f"{GTGM} config/pretraining_all.yaml L148 optimizer.params.lr"),
    ("gtgm.yaml", "optimizer.weight_decay", 0.05, f"{GTGM} config/pretraining_all.yaml L150 weight_decay 5.0e-2"),
    ("gtgm.yaml", "optimizer.betas", [0.9, 0.999], f"{GTGM} pretrain/main.py L78-82 AdamW(betas=(0.9, 0.999))"),
    ("gtgm.paper.yaml", "method.init_args.image_encoder.init_args.feature_size", 48,
     f"{GTGM} pretrain/utils/utils_builder.py L24 SwinUNETR(feature_size=48)"),
    ("gtgm.paper.yaml", "method.init_args.image_encoder.init_args.depths", [2, 4, 2, 2],
     f"{GTGM} pretrain/utils/utils_builder.py L24 depths=(2,4,2,2)"),
    ("gtgm.paper.yaml", "method.init_args.text_encoder.model", "dmis-lab/biobert-v1.1",
     f"{GTGM} pretrain/utils/utils_builder.py L42"),
    ("gtgm.paper.yaml", "method.init_args.text_encoder.max_length", 128, f"{GTGM} pretrain/utils/utils_builder.py L48-56"),
    ("gtgm.paper.yaml", "method.init_args.text_encoder.freeze_layers", 6, f"{GTGM} config/pretraining_all.yaml L119 free_layers: 6"),
    ("gtgm.paper.yaml", "method.init_args.optimizer.lr", 2.0e-5, f"{GTGM} config/pretraining_all.yaml L148"),
    ("gtgm.paper.yaml", "method.init_args.optimizer.weight_decay", 0.05, f"{GTGM} config/pretraining_all.yaml L150"),
    ("gtgm.paper.yaml", "method.init_args.optimizer.decay_all", True, f"{GTGM} pretrain/main.py L78 AdamW(model.parameters(), …)"),
    ("gtgm.paper.yaml", "method.init_args.optimizer.min_lr_ratio", 1e-8 / 2e-5, f"{GTGM} pretrain/utils/utils_trainer.py L242 eta_min=1e-8"),
    ("gtgm.paper.yaml", "trainer.max_steps", 200000, f"{GTGM} config/pretraining_all.yaml L138 max_iterations: 200000"),
    ("gtgm.paper.yaml", "trainer.sync_batchnorm", True, f"{GTGM} pretrain/main.py L70 convert_sync_batchnorm"),
    ("gtgm.paper.yaml", "data.init_args.batch_size", 2, f"{GTGM} config/pretraining_all.yaml L134 batch_size: 2 (per GPU)"),
    ("clip.paper.yaml", "method.init_args.embed_dim", 128, f"{MGCA} mgca/models/convirt/convirt_module.py --emb_dim 128"),
    ("clip.paper.yaml", "method.init_args.temperature", 0.07, f"{MGCA} convirt_module.py --softmax_temperature 0.07"),
    ("clip.paper.yaml", "method.init_args.optimizer.lr", 2.0e-5, f"{MGCA} convirt_module.py --learning_rate 2e-5"),
    ("clip.paper.yaml", "method.init_args.optimizer.weight_decay", 0.05, f"{MGCA} convirt_module.py --weight_decay 0.05"),
    ("clip.paper.yaml", "data.init_args.batch_size", 72, f"{MGCA} convirt_module.py --batch_size 72"),
]


def _value(name: str, key: str) -> Any:
    node: Any = yaml.safe_load(resources.files("medvlp.methods").joinpath(name).read_text())
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{name}: no key {key!r} (missing {part!r})")
        node = node[part]
    return node


@pytest.mark.parametrize("name,key,official,source", OFFICIAL, ids=[f"{n}:{k}" for n, k, _, _ in OFFICIAL])
def test_packaged_yaml_holds_the_official_value(name: str, key: str, official: Any, source: str) -> None:
    got = _value(name, key)
    if isinstance(official, float):
        assert got == pytest.approx(official, rel=1e-9), f"{name} {key} = {got!r}; official {official!r} ({source})"
    else:
        assert got == official, f"{name} {key} = {got!r}; official {official!r} ({source})"
