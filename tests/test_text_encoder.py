"""Text encoder: the frozen-prefix cache must not change what the encoder computes."""
from __future__ import annotations

import pytest
import torch

from medvlp.encoders.text import TextEncoder

TEXTS = [
    "There is a small left apical pneumothorax. No pleural effusion.",
    "Normal chest.",
    "The heart size is enlarged. There is large consolidation in the right lower lung zone and more text "
    "that runs past the truncation length of this encoder so the last words are cut off.",
]


def _pair(freeze_layers: int = 1, cache: int = 8, **kwargs) -> tuple[TextEncoder, TextEncoder]:
    torch.manual_seed(0)
    plain = TextEncoder("builtin:tiny", max_length=24, pooling="mean", freeze_layers=freeze_layers, **kwargs)
    cached = TextEncoder("builtin:tiny", max_length=24, pooling="mean", freeze_layers=freeze_layers,
                         prefix_cache=cache, **kwargs)
    cached.load_state_dict(plain.state_dict())
    return plain, cached


@pytest.mark.parametrize("freeze_layers", [1, 2])
def test_prefix_cache_matches_the_uncached_encoder(freeze_layers: int) -> None:
    plain, cached = _pair(freeze_layers)
    plain.eval(), cached.eval()
    ref = plain(TEXTS)
    first, again = cached(TEXTS), cached(TEXTS[::-1])  # second call is served from the cache
    valid = ref["attention_mask"].bool()
    assert torch.equal(ref["pooled"], first["pooled"])
    assert torch.equal(ref["tokens"][valid], first["tokens"][valid])
    assert torch.equal(ref["pooled"].flip(0), again["pooled"])
    assert len(cached._prefix_cache) == len(TEXTS)


def test_prefix_cache_trains_only_the_unfrozen_layers_and_keeps_modes() -> None:
    _, cached = _pair(freeze_layers=1)
    cached.train()
    cached(TEXTS)["pooled"].sum().backward()
    with_grad = {n for n, p in cached.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("model.encoder.layer.1.") for n in with_grad)
    frozen = {id(m) for part in (cached.model.embeddings, cached.model.encoder.layer[0]) for m in part.modules()}
    # modes survive the cached forward: the frozen prefix stays in eval mode (no dropout), the rest trains
    assert all(m.training != (id(m) in frozen) for m in cached.modules())


def test_prefix_cache_evicts_least_recently_used_and_clears_on_load() -> None:
    plain, cached = _pair(cache=2)
    cached.eval()
    cached(TEXTS[:2])
    cached(TEXTS[:1])  # TEXTS[0] becomes most recent
    cached(TEXTS[2:])
    assert list(cached._prefix_cache) == [TEXTS[0], TEXTS[2]]
    cached.load_state_dict(plain.state_dict())
    assert not cached._prefix_cache


def test_prefix_cache_of_a_fully_frozen_encoder_and_config_errors() -> None:
    plain, cached = _pair(freeze_layers=0, freeze=True)
    plain.eval(), cached.eval()
    assert torch.equal(plain(TEXTS)["pooled"], cached(TEXTS)["pooled"])
    with pytest.raises(ValueError, match="frozen prefix"):
        TextEncoder("builtin:tiny", prefix_cache=4)
    with pytest.raises(ValueError, match=">= 0"):
        TextEncoder("builtin:tiny", freeze_layers=1, prefix_cache=-1)


def test_frozen_layers_run_without_dropout_in_training_mode() -> None:
    import torch

    from medvlp.encoders.text import TextEncoder

    torch.manual_seed(0)
    enc = TextEncoder("builtin:tiny", freeze_layers=1)
    enc.model.config.hidden_dropout_prob = 0.5
    for m in enc.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5  # make dropout impossible to miss
    enc.train()  # as Lightning does before each training epoch
    assert enc.training and enc.model.encoder.layer[1].training
    assert not enc.model.embeddings.training and not enc.model.encoder.layer[0].training
    inputs = enc.tokenize(["mild cardiomegaly", "no pleural effusion"])
    with enc._swapped(enc.model.embeddings, enc.model.encoder.layer[:1]):  # the frozen prefix alone
        a = enc.model(**{k: v for k, v in inputs.items() if k != "offset_mapping"}).last_hidden_state
        b = enc.model(**{k: v for k, v in inputs.items() if k != "offset_mapping"}).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # deterministic in training mode
    full_a, full_b = enc(["mild cardiomegaly"])["pooled"], enc(["mild cardiomegaly"])["pooled"]
    assert not torch.equal(full_a, full_b)  # the trainable layer still drops out
    official = TextEncoder("builtin:tiny", freeze_layers=1, frozen_dropout=True).train()
    assert official.model.encoder.layer[0].training  # the ASG/GTGM behaviour on request
    frozen_all = TextEncoder("builtin:tiny", freeze=True).train()
    assert not any(m.training for m in frozen_all.model.modules())
