"""Released-checkpoint fixtures: state dicts with the official key layout, random values, reduced widths
(the slow tests use the official widths). Each builder also returns the oracle modules."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

HEADS = 12


def randomise(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return module.eval()


def write_tokenizer(folder: Path) -> Path:
    """A WordPiece tokenizer (radiology words + characters) saved with save_pretrained."""
    from transformers import BertTokenizerFast

    from medvlp.encoders.text import _tiny_vocab

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(_tiny_vocab()))}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(str(folder))
    return folder


def vocab_size() -> int:
    from medvlp.encoders.text import _tiny_vocab

    return len(dict.fromkeys(_tiny_vocab()))


def hf_vit(dim: int, depth: int, seed: int = 0, img: int = 224, patch: int = 16) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=HEADS, intermediate_size=4 * dim,
                    image_size=img, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
    return randomise(ViTModel(cfg, add_pooling_layer=False), seed)


def hf_bert(dim: int, depth: int, seed: int = 1, token_types: bool = True, max_pos: int = 512,
            vocab: int | None = None) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=vocab or vocab_size(), hidden_size=dim, num_hidden_layers=depth, num_attention_heads=HEADS,
                     intermediate_size=4 * dim, max_position_embeddings=max_pos, type_vocab_size=2 if token_types else 1)
    model = randomise(BertModel(cfg, add_pooling_layer=False), seed)
    if not token_types:
        with torch.no_grad():
            model.embeddings.token_type_embeddings.weight.zero_()
    return model


def bn_head(in_dim: int, hidden: int, out: int, seed: int) -> nn.Sequential:
    head = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out),
                         nn.BatchNorm1d(out, affine=False))
    return randomise(head, seed)


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in sd.items()}


def mgca_checkpoint(path: Path, arch: str = "vit", dim: int = 48, depth: int = 2, text_dim: int = 48,
                    text_depth: int = 2, emb: int = 16, hidden: int = 32, convirt: bool = False,
                    vocab: int | None = None, asg: bool = False) -> dict[str, Any]:
    """Write an MGCA (or, with ``convirt``, MGCA's ConVIRT) Lightning checkpoint; returns the oracle modules."""
    ip, tp = ("img_encoder.", "text_encoder.") if convirt else ("img_encoder_q.", "text_encoder_q.")
    from medvlp.encoders.resnet import ResNetEncoder
    from medvlp.pretrained.vit import hf_vit_to_timm

    sd: dict[str, torch.Tensor] = {}
    if arch == "vit":
        vit = hf_vit(dim, depth)
        sd.update(_prefixed(ip + "model.", hf_vit_to_timm(vit.state_dict())))
        img_dim, local_in = dim, dim
    else:
        vit = randomise(ResNetEncoder(in_channels=3, layers=(1, 1, 1, 1)), 0)
        sd.update(_prefixed(ip + "model.", vit.state_dict()))
        img_dim, local_in = 2048, 1024
    img_head, txt_head = bn_head(img_dim, hidden, emb, 2), bn_head(text_dim, hidden, emb, 3)
    sd.update(_prefixed(ip + "global_embed.head.", img_head.state_dict()))
    bert = hf_bert(text_dim, text_depth, token_types=False, vocab=vocab)
    bsd = {k: v for k, v in bert.state_dict().items() if "token_type" not in k}
    bsd["embeddings.position_ids"] = torch.arange(512).expand(1, -1)
    for i in range(text_depth):  # med.py cross-attention blocks (add_cross_attention: true)
        for name, shape in (("self.query", (text_dim, text_dim)), ("self.key", (text_dim, dim)),
                            ("self.value", (text_dim, dim)), ("output.dense", (text_dim, text_dim)),
                            ("output.LayerNorm", (text_dim,))):
            w = torch.randn(*shape)
            bsd[f"encoder.layer.{i}.crossattention.{name}.weight"] = w
            bsd[f"encoder.layer.{i}.crossattention.{name}.bias"] = torch.randn(shape[0])
    sd.update(_prefixed(tp + "model.", bsd))
    sd.update(_prefixed(tp + "global_embed.head.", txt_head.state_dict()))
    for prefix, cin in ((ip + "local_embed.head.", local_in), (tp + "local_embed.head.", text_dim)):
        local = nn.Sequential(nn.Conv1d(cin, hidden, 1), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Conv1d(hidden, emb, 1),
                              nn.BatchNorm1d(emb, affine=False))
        sd.update(_prefixed(prefix, local.state_dict()))
    if asg:  # ASG: IRL decoder (models/irl_model.py) and the frozen tag-text BERT instead of prototypes
        sd.update(_prefixed("irl.decoder.", nn.TransformerDecoderLayer(text_dim, 4, 64).state_dict()))
        sd.update(_prefixed("irl.mlp_head.0.", nn.Linear(text_dim, 1).state_dict()))
        sd.update(_prefixed("text_encoder.", hf_bert(text_dim, 1, seed=7).state_dict()))
    elif not convirt:
        for name in ("patch_local_atten_layer.", "word_local_atten_layer."):
            sd.update(_prefixed(name, nn.MultiheadAttention(emb, 1, batch_first=True).state_dict()))
        sd["prototype_layer.weight"] = torch.randn(50, emb)
    torch.save({"epoch": 49, "global_step": 1000, "state_dict": sd,
                "hyper_parameters": {"img_encoder": "vit_base" if arch == "vit" else "resnet_50", "emb_dim": emb}}, path)
    return {"image": vit, "bert": bert, "image_head": img_head, "text_head": txt_head}


def biomedclip_checkpoint(path: Path, dim: int = 48, depth: int = 2, text_dim: int = 48, text_depth: int = 2,
                          emb: int = 32, vocab: int | None = None) -> dict[str, Any]:
    """Write an open_clip BiomedCLIP state dict; returns the oracle modules."""
    from medvlp.pretrained.vit import hf_vit_to_timm

    vit, bert = hf_vit(dim, depth, seed=4), hf_bert(text_dim, text_depth, seed=5, vocab=vocab)
    sd = _prefixed("visual.trunk.", hf_vit_to_timm(vit.state_dict()))
    sd["visual.head.proj.weight"] = torch.randn(emb, dim) * 0.1
    sd.update(_prefixed("text.transformer.", bert.state_dict()))
    sd["text.proj.0.weight"] = torch.randn((text_dim + emb) // 2, text_dim) * 0.1
    sd["text.proj.2.weight"] = torch.randn(emb, (text_dim + emb) // 2) * 0.1
    sd["logit_scale"] = torch.tensor(4.6052)
    torch.save(sd, path)
    return {"image": vit, "bert": bert, "sd": sd}


def gloria_checkpoint(path: Path, text_dim: int = 48, text_depth: int = 4) -> dict[str, Any]:
    """Write a GLoRIA Lightning checkpoint (ResNet-50 layout with one block per stage); returns oracles."""
    from medvlp.encoders.resnet import ResNetEncoder

    rn = randomise(ResNetEncoder(in_channels=3, layers=(1, 1, 1, 1)), 8)
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=vocab_size(), hidden_size=text_dim, num_hidden_layers=text_depth, num_attention_heads=HEADS,
                     intermediate_size=4 * text_dim)
    bert = randomise(BertModel(cfg), 9)  # AutoModel keeps the pooler
    sd = _prefixed("gloria.img_encoder.model.", rn.state_dict())
    g = nn.Linear(2048, text_dim)
    sd.update(_prefixed("gloria.img_encoder.global_embedder.", randomise(g, 10).state_dict()))
    sd["gloria.img_encoder.local_embedder.weight"] = torch.randn(text_dim, 1024, 1, 1)
    bsd = dict(bert.state_dict())
    bsd["embeddings.position_ids"] = torch.arange(512).expand(1, -1)
    sd.update(_prefixed("gloria.text_encoder.model.", bsd))
    torch.save({"epoch": 10, "state_dict": sd}, path)
    return {"image": rn, "global": g, "bert": bert}


def medclip_checkpoint(path: Path, text_dim: int = 48, text_depth: int = 2, emb: int = 32) -> dict[str, Any]:
    """Write a MedCLIP-ViT ``pytorch_model.bin``: the Swin part in the names ``save_pretrained`` writes (the
    released transformers-4 names), reduced width (embed 24, depths 1-1-2-1, heads 3-6-12-24, window 7)."""
    import tempfile

    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel, SwinConfig, SwinModel

    swin = randomise(SwinModel(SwinConfig(embed_dim=24, depths=[1, 1, 2, 1], num_heads=[3, 6, 12, 24], window_size=7,
                                          image_size=224)), 11)
    with tempfile.TemporaryDirectory() as tmp:
        swin.save_pretrained(tmp)
        swin_sd = load_file(f"{tmp}/model.safetensors")
    bert = randomise(BertModel(BertConfig(vocab_size=vocab_size(), hidden_size=text_dim, num_hidden_layers=text_depth,
                                          num_attention_heads=HEADS, intermediate_size=4 * text_dim)), 12)
    sd = _prefixed("vision_model.model.", swin_sd)
    sd["vision_model.projection_head.weight"] = torch.randn(emb, swin.num_features) * 0.1
    sd.update(_prefixed("text_model.model.", bert.state_dict()))
    sd["text_model.projection_head.weight"] = torch.randn(emb, text_dim) * 0.1
    sd["logit_scale"] = torch.tensor(3.2)
    torch.save(sd, path)
    return {"image": swin, "bert": bert, "sd": sd}


def biovil_checkpoints(image_path: Path, text_path: Path, text_dim: int = 48, text_depth: int = 2,
                       proj: int = 16) -> dict[str, Any]:
    """Write BioViL's image file (``ImageModel.state_dict()``) and a CXR-BERT ``pytorch_model.bin``."""
    from transformers import BertConfig, BertForMaskedLM

    from medvlp.encoders.resnet import ResNetEncoder

    rn = randomise(ResNetEncoder(in_channels=3, layers=(1, 1, 1, 1)), 13)
    projector = randomise(nn.Sequential(nn.Conv2d(2048, proj, 1, bias=False), nn.BatchNorm2d(proj), nn.ReLU(),
                                        nn.Conv2d(proj, proj, 1)), 14)
    sd = _prefixed("encoder.encoder.", rn.state_dict())
    sd["encoder.encoder.fc.weight"], sd["encoder.encoder.fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    sd.update(_prefixed("projector.model.", projector.state_dict()))
    torch.save(sd, image_path)
    mlm = randomise(BertForMaskedLM(BertConfig(vocab_size=vocab_size(), hidden_size=text_dim, num_hidden_layers=text_depth,
                                               num_attention_heads=HEADS, intermediate_size=4 * text_dim)), 15)
    head = randomise(nn.ModuleDict({"dense_to_hidden": nn.Linear(text_dim, proj), "LayerNorm": nn.LayerNorm(proj),
                                    "dense_to_output": nn.Linear(proj, proj)}), 16)
    tsd = dict(mlm.state_dict())
    tsd.update(_prefixed("cls_projection_head.", head.state_dict()))
    torch.save(tsd, text_path)
    return {"image": rn, "projector": projector, "bert": mlm.bert, "head": head}
