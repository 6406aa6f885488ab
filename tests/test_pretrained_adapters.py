"""Released-checkpoint adapters: official key layouts (random values) load with every key accounted for,
and outputs match transformers oracles (ViT, BERT, ResNet) plus the source's heads written out by hand."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medvlp.pretrained.formats import load_checkpoint
from medvlp.pretrained.surgery import LayoutError
from tests.pretrained_fixtures import (biomedclip_checkpoint, biovil_checkpoints, gloria_checkpoint, medclip_checkpoint, mgca_checkpoint,
                                      randomise, write_tokenizer)

TEXTS = ["no pleural effusion", "mild cardiomegaly with small left effusion"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def _bn_eval(x: torch.Tensor, sd: dict, p: str, eps: float = 1e-5) -> torch.Tensor:
    y = (x - sd[p + "running_mean"]) / torch.sqrt(sd[p + "running_var"] + eps)
    return y * sd[p + "weight"] + sd[p + "bias"] if p + "weight" in sd else y


def _mgca_head(x: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """GlobalEmbedding in eval mode, transcribed from mgca/models/backbones/encoder.py."""
    sd = head.state_dict()
    h = F.relu(_bn_eval(F.linear(x, sd["0.weight"], sd["0.bias"]), sd, "1."))
    return _bn_eval(F.linear(h, sd["3.weight"], sd["3.bias"]), sd, "4.")


def _mgca_pixels(x: torch.Tensor) -> torch.Tensor:
    """MGCA eval transform on a medvlp batch: [0,1] → resize 256 → centre crop 224 → RGB → (x-0.5)/0.5."""
    x = F.interpolate(x * 0.25 + 0.5, size=(256, 256), mode="bilinear", align_corners=False)[..., 16:240, 16:240]
    return (x.repeat(1, 3, 1, 1) - 0.5) / 0.5


@torch.no_grad()
def test_mgca_vit_matches_oracles(tmp_path: Path, tok: Path) -> None:
    oracle = mgca_checkpoint(tmp_path / "mgca_vit.ckpt")
    model = load_checkpoint("mgca", tmp_path / "mgca_vit.ckpt", tokenizer=str(tok))
    x = torch.randn(2, 1, 32, 32)
    cls = oracle["image"](pixel_values=_mgca_pixels(x)).last_hidden_state[:, 0]
    torch.testing.assert_close(model.image_representation(x), cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.encode_image(x, normalize=False), _mgca_head(cls, oracle["image_head"]),
                               atol=1e-4, rtol=1e-4)
    enc = model.text_encoder.tokenizer(TEXTS, padding=True, return_tensors="pt")
    out = oracle["bert"](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         position_ids=torch.zeros_like(enc["input_ids"])).last_hidden_state[:, 0]
    torch.testing.assert_close(model.encode_text(TEXTS, normalize=False), _mgca_head(out, oracle["text_head"]),
                               atol=1e-4, rtol=1e-4)
    maps = model.image_feature_maps(x)
    assert maps and all(m.shape[-2:] == (14, 14) for m in maps)


@torch.no_grad()
def test_mgca_resnet50_layout(tmp_path: Path, tok: Path) -> None:
    oracle = mgca_checkpoint(tmp_path / "mgca_rn.ckpt", arch="resnet")
    model = load_checkpoint("mgca", tmp_path / "mgca_rn.ckpt", tokenizer=str(tok))
    x = torch.randn(2, 1, 32, 32)
    pix = F.interpolate(_mgca_pixels(x), size=(299, 299), mode="bilinear", align_corners=True)
    ref = oracle["image"](pix)["pooled"]
    torch.testing.assert_close(model.image_representation(x), ref, atol=1e-4, rtol=1e-4)
    assert [m.shape[1] for m in model.image_feature_maps(x)] == [256, 512, 1024, 2048]


@torch.no_grad()
def test_convirt_layout_of_the_mgca_reimplementation(tmp_path: Path, tok: Path) -> None:
    oracle = mgca_checkpoint(tmp_path / "convirt.ckpt", arch="resnet", convirt=True)
    model = load_checkpoint("convirt", tmp_path / "convirt.ckpt", tokenizer=str(tok))
    x = torch.randn(2, 1, 32, 32)
    pix = F.interpolate(_mgca_pixels(x), size=(299, 299), mode="bilinear", align_corners=True)
    ref = _mgca_head(oracle["image"](pix)["pooled"], oracle["image_head"])
    torch.testing.assert_close(model.encode_image(x, normalize=False), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(LayoutError, match="img_encoder_q"):  # an MGCA file is not a ConVIRT file
        mgca_checkpoint(tmp_path / "m.ckpt")
        load_checkpoint("convirt", tmp_path / "m.ckpt", tokenizer=str(tok))


@torch.no_grad()
def test_asg_layout(tmp_path: Path, tok: Path) -> None:
    oracle = mgca_checkpoint(tmp_path / "asg.ckpt", asg=True)
    model = load_checkpoint("asg", tmp_path / "asg.ckpt", tokenizer=str(tok))
    x = torch.randn(2, 1, 32, 32)
    cls = oracle["image"](pixel_values=_mgca_pixels(x)).last_hidden_state[:, 0]
    torch.testing.assert_close(model.encode_image(x, normalize=False), _mgca_head(cls, oracle["image_head"]),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(LayoutError, match="irl"):  # an ASG file is not an MGCA file
        load_checkpoint("mgca", tmp_path / "asg.ckpt", tokenizer=str(tok))


@torch.no_grad()
def test_gloria_matches_official_aggregation(tmp_path: Path, tok: Path) -> None:
    """Sentence embedding transcribed from gloria/models/text_model.py (word aggregation loop, mean over 97 word
    slots, sum over the last 4 layers); image from vision_model.py (299 px upsampling, layer4 average, Linear)."""
    from medvlp.pretrained.gloria import clean_report

    oracle = gloria_checkpoint(tmp_path / "chexpert_resnet50.ckpt")
    model = load_checkpoint("gloria", tmp_path / "chexpert_resnet50.ckpt", tokenizer=str(tok))
    x = torch.randn(2, 1, 32, 32)
    pix = F.interpolate(_mgca_pixels(x), size=(299, 299), mode="bilinear", align_corners=True)
    ref = oracle["global"](oracle["image"](pix)["pooled"])
    torch.testing.assert_close(model.encode_image(x, normalize=False), ref, atol=1e-4, rtol=1e-4)
    reports = ["1. No pleural effusion. 2. Mild cardiomegaly.", "Heart size normal. Lungs clear."]
    assert clean_report(reports[0]) == "no pleural effusion mild cardiomegaly"
    t = model.text_encoder.tokenizer
    enc = t([clean_report(r) for r in reports], padding="max_length", max_length=97, truncation=True, return_tensors="pt")
    hidden = oracle["bert"](**enc, output_hidden_states=True).hidden_states[-4:]
    emb = torch.stack(hidden).permute(1, 0, 2, 3)  # batch, layers, words, dim
    idx2word = {v: k for k, v in t.get_vocab().items()}
    rows = []
    for embs, ids in zip(emb.permute(0, 2, 1, 3), enc["input_ids"]):  # loop over words as the official code
        agg, bank = [], []
        for e, i in zip(embs, ids):
            word = idx2word[int(i)]
            if word == "[SEP]":
                agg.append(torch.stack(bank).sum(0))
                agg.append(e)
                break
            if not word.startswith("##") and bank:
                agg.append(torch.stack(bank).sum(0))
                bank = []
            bank.append(e)
        agg = torch.cat([torch.stack(agg), torch.zeros(97 - len(agg), *agg[0].shape)])
        rows.append(agg.mean(0).sum(0))
    torch.testing.assert_close(model.encode_text(reports, normalize=False), torch.stack(rows), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_biomedclip_matches_oracles(tmp_path: Path, tok: Path) -> None:
    oracle = biomedclip_checkpoint(tmp_path / "open_clip_pytorch_model.bin")
    model = load_checkpoint("biomedclip", tmp_path / "open_clip_pytorch_model.bin", tokenizer=str(tok))
    x = torch.randn(2, 1, 32, 32)
    pix = F.interpolate(x * 0.25 + 0.5, size=(224, 224), mode="bicubic", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    cls = oracle["image"](pixel_values=(pix - mean) / std).last_hidden_state[:, 0]
    sd = oracle["sd"]
    torch.testing.assert_close(model.encode_image(x, normalize=False), cls @ sd["visual.head.proj.weight"].T,
                               atol=1e-4, rtol=1e-4)
    enc = model.text_encoder.tokenizer(TEXTS, padding=True, return_tensors="pt")
    t = oracle["bert"](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
    ref = F.gelu(t @ sd["text.proj.0.weight"].T) @ sd["text.proj.2.weight"].T
    torch.testing.assert_close(model.encode_text(TEXTS, normalize=False), ref, atol=1e-4, rtol=1e-4)
    assert model.logit_scale == pytest.approx(4.6052)


@torch.no_grad()
def test_medclip_swin_matches_transformers_swin(tmp_path: Path, tok: Path) -> None:
    from medvlp.pretrained.medclip import MEAN, STD

    oracle = medclip_checkpoint(tmp_path / "pytorch_model.bin")
    model = load_checkpoint("medclip", tmp_path / "pytorch_model.bin", tokenizer=str(tok))
    x = torch.randn(2, 1, 32, 32)
    pix = F.interpolate(x * 0.25 + 0.5, size=(224, 224), mode="bicubic", align_corners=False).repeat(1, 3, 1, 1)
    pooled = oracle["image"](pixel_values=(pix - MEAN) / STD).pooler_output
    sd = oracle["sd"]
    torch.testing.assert_close(model.image_representation(x), pooled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.encode_image(x, normalize=False), pooled @ sd["vision_model.projection_head.weight"].T,
                               atol=1e-4, rtol=1e-4)
    rows = []
    for text in TEXTS:
        enc = model.text_encoder.tokenizer([text], return_tensors="pt")
        hs = oracle["bert"](**enc, output_hidden_states=True).hidden_states
        rows.append(torch.stack([hs[1], hs[2], hs[-1]]).permute(1, 0, 2, 3).mean(2).mean(1)[0])
    ref = torch.stack(rows) @ sd["text_model.projection_head.weight"].T
    torch.testing.assert_close(model.encode_text(TEXTS, normalize=False), ref, atol=1e-4, rtol=1e-4)
    assert len(model.image_feature_maps(x)) == 4


@torch.no_grad()
def test_biovil_and_cxr_bert(tmp_path: Path, tok: Path) -> None:
    o = biovil_checkpoints(tmp_path / "biovil.pt", tmp_path / "cxrbert.bin")
    model = load_checkpoint("biovil", tmp_path / "biovil.pt", text_path=str(tmp_path / "cxrbert.bin"), tokenizer=str(tok))
    x = torch.randn(2, 1, 32, 32)
    pix = F.interpolate(x * 0.25 + 0.5, size=(512, 512), mode="bilinear", align_corners=False)[..., 32:480, 32:480]
    fmap = o["image"](pix.repeat(1, 3, 1, 1))["maps"][-1]
    torch.testing.assert_close(model.encode_image(x, normalize=False), o["projector"](fmap).mean(dim=(2, 3)),
                               atol=1e-4, rtol=1e-4)
    enc = model.text_encoder.tokenizer(TEXTS, padding="longest", return_tensors="pt")
    cls = o["bert"](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
    h = o["head"]
    ref = h["dense_to_output"](h["LayerNorm"](F.gelu(h["dense_to_hidden"](cls))))
    torch.testing.assert_close(model.encode_text(TEXTS, normalize=False), ref, atol=1e-4, rtol=1e-4)


def test_unexpected_key_is_named(tmp_path: Path, tok: Path) -> None:
    mgca_checkpoint(tmp_path / "m.ckpt")
    ck = torch.load(tmp_path / "m.ckpt", weights_only=True)
    ck["state_dict"]["img_encoder_q.extra_head.weight"] = torch.zeros(2)
    torch.save(ck, tmp_path / "m2.ckpt")
    with pytest.raises(LayoutError, match="img_encoder_q.extra_head.weight"):
        load_checkpoint("mgca", tmp_path / "m2.ckpt", tokenizer=str(tok))


def test_wrong_format_names_expected_and_found(tmp_path: Path, tok: Path) -> None:
    biomedclip_checkpoint(tmp_path / "b.bin")
    with pytest.raises(LayoutError, match=r"img_encoder_q\.model\..*found \[logit_scale"):
        load_checkpoint("mgca", tmp_path / "b.bin", tokenizer=str(tok))


def test_unknown_format_lists_formats(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="biomedclip.*mgca"):
        load_checkpoint("nope", tmp_path / "x.bin")


class _Evil:
    marker = ""

    def __reduce__(self):  # noqa: D105
        return (Path.touch, (Path(_Evil.marker),))


@pytest.mark.parametrize("fmt", ["mgca", "asg", "convirt", "gloria", "biomedclip", "medclip", "biovil", "medvlp", "export"])
def test_pickle_with_code_refused_for_every_format(tmp_path: Path, fmt: str) -> None:
    _Evil.marker = str(tmp_path / "executed")
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"a": _Evil()}}))
    options = {}
    if fmt == "export":  # an export folder whose weights file is a pickle
        import json

        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "config.json").write_text(json.dumps({"format": "medvlp-export/1", "method": "clip",
                                                                 "class_path": "x.Y", "hparams": {"text_encoder": {}}}))
        (tmp_path / "x" / "model.safetensors").write_bytes(path.read_bytes())
        path = tmp_path / "x"
    if fmt == "biovil":  # the text weights file is checked the same way
        options["text_path"] = str(tmp_path / "evil.ckpt")
    with pytest.raises(RuntimeError, match="refusing to load"):
        load_checkpoint(fmt, path, **options)
    assert not (tmp_path / "executed").exists()


@torch.no_grad()
def test_resnet50_matches_transformers_resnet() -> None:
    """ResNetEncoder (torchvision names) against transformers' ResNetModel with the weights renamed."""
    from transformers import ResNetConfig, ResNetModel

    from medvlp.encoders.resnet import ResNetEncoder

    hf = randomise(ResNetModel(ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                                            layer_type="bottleneck")), 7)
    ours = ResNetEncoder(in_channels=3).eval()
    sd = {}
    for k, v in hf.state_dict().items():
        k = k.replace("embedder.embedder.convolution", "conv1").replace("embedder.embedder.normalization", "bn1")
        if k.startswith("encoder.stages."):
            _, _, s, _, b, *rest = k.split(".")
            rest = ".".join(rest)
            for i in range(3):
                rest = rest.replace(f"layer.{i}.convolution", f"conv{i + 1}").replace(f"layer.{i}.normalization", f"bn{i + 1}")
            rest = rest.replace("shortcut.convolution", "downsample.0").replace("shortcut.normalization", "downsample.1")
            k = f"layer{int(s) + 1}.{b}.{rest}"
        sd[k] = v
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    out = hf(pixel_values=x, output_hidden_states=True)
    feats = ours(x)
    torch.testing.assert_close(feats["pooled"], out.pooler_output.flatten(1), atol=1e-4, rtol=1e-4)
    for ours_map, ref in zip(feats["maps"], out.hidden_states[1:]):
        torch.testing.assert_close(ours_map, ref, atol=1e-4, rtol=1e-4)


def test_resnet_3d_feature_maps() -> None:
    from medvlp.encoders.resnet import ResNetEncoder

    enc = ResNetEncoder(in_channels=1, spatial_dims=3, layers=(1, 1, 1, 1)).eval()
    maps = enc(torch.randn(1, 1, 32, 32, 32))["maps"]
    assert [tuple(m.shape[1:]) for m in maps] == [(256, 8, 8, 8), (512, 4, 4, 4), (1024, 2, 2, 2), (2048, 1, 1, 1)]


@pytest.mark.slow
@torch.no_grad()
def test_official_shapes_load(tmp_path: Path, tok: Path) -> None:
    """Full widths: MGCA ViT-B/16 + 6-layer Bio_ClinicalBERT (vocab 28996), BiomedCLIP ViT-B/16 + 12-layer
    PubMedBERT (vocab 30522, 512-d joint space)."""
    mgca_checkpoint(tmp_path / "mgca.ckpt", dim=768, depth=12, text_dim=768, text_depth=6, emb=128, hidden=2048,
                    vocab=28996)
    model = load_checkpoint("mgca", tmp_path / "mgca.ckpt", tokenizer=str(tok))
    assert model.encode_image(torch.randn(1, 1, 64, 64)).shape == (1, 128)
    assert model.encode_text(TEXTS).shape == (2, 128)
    biomedclip_checkpoint(tmp_path / "b.bin", dim=768, depth=12, text_dim=768, text_depth=12, emb=512, vocab=30522)
    model = load_checkpoint("biomedclip", tmp_path / "b.bin", tokenizer=str(tok))
    assert model.encode_image(torch.randn(1, 1, 64, 64)).shape == (1, 512)
    assert model.encode_text(TEXTS).shape == (2, 512)
