"""Pretrained initialisation: ViT checkpoints (HF / timm / DeiT layouts) into ViTEncoder, checked against
transformers' ViTModel as the oracle; BERT truncation (text_encoder.num_layers)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from medvlp.encoders import ViTEncoder
from medvlp.pretrained.init import load_initial_weights
from medvlp.pretrained.surgery import LayoutError, adapt_input_conv, load_state_file
from medvlp.pretrained.vit import encoder_to_timm, hf_vit_to_timm

D, DEPTH, HEADS, IMG, PATCH = 48, 2, 3, 32, 8


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (LayerNorm scales, biases, CLS/pos embeddings), so no term is trivially 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def hf_vit(img: int = IMG) -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * D,
                    image_size=img, patch_size=PATCH, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu",
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    _randomise(model)
    return model


def encoder(path: Path | None, in_channels: int = 3, img: int = IMG, **kw: object) -> ViTEncoder:
    enc = ViTEncoder(in_channels=in_channels, embed_dim=D, depth=DEPTH, num_heads=HEADS, img_size_2d=img,
                     patch_size_2d=PATCH, init_from=str(path) if path else None, **kw).eval()
    load_initial_weights(enc)  # building reads no file; loading is its own step
    return enc


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = hf_vit()
    path = tmp_path_factory.mktemp("vit") / "hf_vit.bin"
    torch.save(model.state_dict(), path)
    return model, path


@torch.no_grad()
def test_hf_vit_matches_transformers_oracle_rgb(oracle) -> None:
    model, path = oracle
    x = torch.randn(2, 3, IMG, IMG)
    ref = model(pixel_values=x).last_hidden_state
    out = encoder(path)(x)
    torch.testing.assert_close(out["pooled"], ref[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["tokens"], ref[:, 1:], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_one_channel_sums_rgb_kernels(oracle) -> None:
    """A grey image through the 1-channel encoder equals the RGB oracle on the image repeated 3 times."""
    model, path = oracle
    x = torch.randn(2, 1, IMG, IMG)
    ref = model(pixel_values=x.repeat(1, 3, 1, 1)).last_hidden_state
    torch.testing.assert_close(encoder(path, in_channels=1)(x)["pooled"], ref[:, 0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_position_embedding_resampled_like_oracle(oracle) -> None:
    """Built at 48 px from a 32 px checkpoint: matches transformers' interpolate_pos_encoding at 48 px."""
    model, path = oracle
    x = torch.randn(2, 3, 48, 48)
    ref = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    enc = encoder(path, img=48)
    assert enc.pos_embed["2"].shape == (1, 36, D)
    torch.testing.assert_close(enc(x)["tokens"], ref[:, 1:], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_timm_and_deit_layouts_match_oracle(oracle, tmp_path: Path) -> None:
    """timm layout written by hand from the HF weights (an independent transcription), also DeiT-wrapped."""
    model, _ = oracle
    sd = model.state_dict()
    timm: dict[str, torch.Tensor] = {
        "cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
        "head.weight": torch.randn(10, D), "head.bias": torch.randn(10),
    }
    v4 = {k: v for k, v in sd.items() if not k.startswith("layers.")}  # the released (transformers 4) names
    for i in range(DEPTH):
        p, q4 = f"layers.{i}.", f"encoder.layer.{i}."
        q, k, v = (sd[p + f"attention.{n}_proj.weight"] for n in ("q", "k", "v"))
        qb, kb, vb = (sd[p + f"attention.{n}_proj.bias"] for n in ("q", "k", "v"))
        pairs = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        v4_names = {"layernorm_before": "layernorm_before", "layernorm_after": "layernorm_after",
                    "attention.o_proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                    "mlp.fc2": "output.dense", "attention.q_proj": "attention.attention.query",
                    "attention.k_proj": "attention.attention.key", "attention.v_proj": "attention.attention.value"}
        timm.update({f"blocks.{i}.attn.qkv.weight": torch.cat([q, k, v]), f"blocks.{i}.attn.qkv.bias": torch.cat([qb, kb, vb])})
        for ours, theirs in pairs.items():
            for s_ in ("weight", "bias"):
                timm[f"blocks.{i}.{ours}.{s_}"] = sd[p + f"{theirs}.{s_}"]
        for theirs, old in v4_names.items():
            for s_ in ("weight", "bias"):
                v4[q4 + f"{old}.{s_}"] = sd[p + f"{theirs}.{s_}"]
    assert set(hf_vit_to_timm(sd)) == set(timm) - {"head.weight", "head.bias"}
    for a, b in zip(sorted(hf_vit_to_timm(v4).items()), sorted(hf_vit_to_timm(sd).items())):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    torch.save({f"vit.{k}": t for k, t in v4.items()}, tmp_path / "hf_v4.bin")
    x = torch.randn(2, 3, IMG, IMG)
    ref = model(pixel_values=x).last_hidden_state[:, 0]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm.items()}, tmp_path / "timm.safetensors")
    torch.save({"model": timm, "epoch": 300}, tmp_path / "deit.pth")
    for name in ("timm.safetensors", "deit.pth", "hf_v4.bin"):
        torch.testing.assert_close(encoder(tmp_path / name)(x)["pooled"], ref, atol=1e-5, rtol=1e-4)
    # export back to timm: same function of the input
    enc = encoder(tmp_path / "deit.pth")
    torch.save(encoder_to_timm(enc), tmp_path / "back.pth")
    torch.testing.assert_close(encoder(tmp_path / "back.pth")(x)["pooled"], ref, atol=1e-5, rtol=1e-4)


def test_3d_parts_keep_initialisation(oracle) -> None:
    _, path = oracle
    enc = ViTEncoder(in_channels=1, embed_dim=D, depth=DEPTH, num_heads=HEADS, spatial_dims=[2, 3], img_size_2d=IMG,
                     patch_size_2d=PATCH, img_size_3d=(8, 32, 32), patch_size_3d=(4, 8, 8), init_from=str(path))
    load_initial_weights(enc)
    assert enc(torch.randn(1, 1, 8, 32, 32))["pooled"].shape == (1, D)


def test_unknown_layout_names_expected_and_found(tmp_path: Path) -> None:
    torch.save({"backbone.conv.weight": torch.zeros(3, 3)}, tmp_path / "odd.pt")
    with pytest.raises(LayoutError, match=r"expected keys like \[.*patch_embed\.proj\.weight.*found \[backbone\.conv\.weight"):
        encoder(tmp_path / "odd.pt")


def test_shape_mismatch_is_an_error(oracle) -> None:
    _, path = oracle
    with pytest.raises(LayoutError, match="blocks"):
        load_initial_weights(ViTEncoder(in_channels=3, embed_dim=D, depth=DEPTH + 1, num_heads=HEADS, img_size_2d=IMG,
                                        patch_size_2d=PATCH, init_from=str(path)))


class _Evil:
    def __reduce__(self):  # noqa: D105 - executed only if a loader runs pickled code
        return (Path.touch, (Path(_Evil.marker),))


def test_pickle_with_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    _Evil.marker = str(marker)
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": {"x": _Evil()}}))
    with pytest.raises(RuntimeError, match="refusing to load"):
        load_state_file(path)
    with pytest.raises(RuntimeError, match="refusing to load"):
        encoder(path)
    assert not marker.exists()


def test_hub_id_needs_download_permission() -> None:
    with pytest.raises(FileNotFoundError, match="init_allow_download"):
        encoder(Path("facebook/deit-base-patch16-224"))


def test_adapt_input_conv() -> None:
    w = torch.randn(4, 3, 2, 2)
    assert torch.equal(adapt_input_conv(w, 1), w.sum(1, keepdim=True))
    assert adapt_input_conv(w, 6).shape == (4, 6, 2, 2)


@torch.no_grad()
def test_num_layers_truncates_bert_like_a_shallower_oracle() -> None:
    from transformers import BertConfig, BertModel

    from medvlp.encoders import TextEncoder

    full = TextEncoder("builtin:tiny", tiny_hidden_size=32).eval()
    torch.manual_seed(0)
    full_state = {k: torch.randn_like(v) * 0.2 for k, v in full.model.state_dict().items()}
    full.model.load_state_dict(full_state)
    cut = TextEncoder("builtin:tiny", tiny_hidden_size=32, num_layers=1).eval()
    cut.model.load_state_dict({k: v for k, v in full_state.items() if not k.startswith("encoder.layer.1.")})
    assert len(cut.model.encoder.layer) == 1 and cut.model.config.num_hidden_layers == 1
    cfg = BertConfig(**{**full.model.config.to_dict(), "num_hidden_layers": 1})
    oracle = BertModel(cfg, add_pooling_layer=False).eval()
    oracle.load_state_dict(cut.model.state_dict())
    texts = ["no pleural effusion", "mild cardiomegaly"]
    enc = cut.tokenize(texts)
    ref = oracle(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(cut(texts)["tokens"], ref)
    assert not torch.allclose(full(texts)["tokens"], ref)
    with pytest.raises(ValueError, match="num_layers"):
        TextEncoder("builtin:tiny", num_layers=5)
