"""Loss properties, checked as pure functions (no Lightning)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medvlp.losses import (
    barlow_twins_loss, clip_loss, gather_with_grad, masked_token_distillation_loss,
    region_sentence_alignment_loss, soft_target_contrastive_loss, symmetric_kl_contrastive_loss,
)


def test_clip_loss_aligned_pairs_beat_random_and_are_permutation_invariant() -> None:
    torch.manual_seed(0)
    x = F.normalize(torch.randn(16, 32), dim=-1)
    aligned = clip_loss(x, x, 0.07)
    shuffled = clip_loss(x, x[torch.randperm(16)], 0.07)
    assert aligned < 0.05 < shuffled
    perm = torch.randperm(16)
    y = torch.randn(16, 32)
    assert torch.allclose(clip_loss(x, y), clip_loss(x[perm], y[perm]), atol=1e-5)


def test_soft_target_with_identity_equals_clip() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    assert torch.allclose(soft_target_contrastive_loss(a, b, torch.eye(8), 0.1), clip_loss(a, b, 0.1), atol=1e-5)


def test_soft_target_same_label_samples_are_not_false_negatives() -> None:
    # samples 0 and 1 share a label set: pairing image 0 with text 1 must not be punished
    torch.manual_seed(0)
    x = F.normalize(torch.randn(4, 8), dim=-1)
    swapped = x[[1, 0, 2, 3]]
    eye = torch.eye(4)
    merged = eye.clone()
    merged[0, 1] = merged[1, 0] = 1
    assert torch.allclose(soft_target_contrastive_loss(x, swapped, merged, 0.1),
                          soft_target_contrastive_loss(x, x, merged, 0.1), atol=1e-5)
    assert soft_target_contrastive_loss(x, swapped, eye, 0.1) > soft_target_contrastive_loss(x, x, eye, 0.1)


def test_barlow_twins_identity_cross_correlation_is_zero() -> None:
    torch.manual_seed(0)
    z = torch.randn(64, 8)
    z = z - z.mean(0)
    q, _ = torch.linalg.qr(z)  # orthonormal, zero-mean columns → standardised C = I
    assert barlow_twins_loss(q, q).item() < 1e-6
    assert barlow_twins_loss(q, torch.randn(64, 8)).item() > 1.0


def test_barlow_twins_rejects_batch_of_one() -> None:
    import pytest

    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(torch.randn(1, 4), torch.randn(1, 4))


def test_region_alignment_masked_regions_contribute_nothing() -> None:
    torch.manual_seed(0)
    r, s = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    present = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]]).bool()
    base = region_sentence_alignment_loss(r, s, present)
    r2, s2 = r.clone(), s.clone()
    r2[~present] = torch.randn(int((~present).sum()), 8) * 100
    s2[~present] = torch.randn(int((~present).sum()), 8) * 100
    assert torch.allclose(base, region_sentence_alignment_loss(r2, s2, present), atol=1e-5)
    aligned = region_sentence_alignment_loss(s, s, present, 0.05)
    assert aligned < base


def test_region_alignment_with_nothing_present_is_zero_with_graph() -> None:
    r = torch.randn(2, 3, 4, requires_grad=True)
    loss = region_sentence_alignment_loss(r, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and r.grad is not None


def test_symmetric_kl_is_minimal_at_matching_distribution() -> None:
    torch.manual_seed(0)
    x = F.normalize(torch.randn(6, 16), dim=-1)
    target = 0.8 * torch.eye(6) + 0.2 * torch.full((6, 6), 1 / 6)
    target = target / target.sum(1, keepdim=True)
    good = symmetric_kl_contrastive_loss(x, x, target, 0.3)
    bad = symmetric_kl_contrastive_loss(x, x[torch.randperm(6)], target, 0.3)
    assert 0 <= good < bad


def test_masked_distillation_only_uses_masked_tokens_and_no_teacher_grad() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 6, 10, requires_grad=True)
    t = torch.randn(2, 6, 10, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :2] = True
    loss = masked_token_distillation_loss(s, t, mask)
    s2 = s.detach().clone()
    s2[:, 2:] = 1000.0
    assert torch.allclose(loss, masked_token_distillation_loss(s2, t, mask))
    loss.backward()
    assert t.grad is None and s.grad[:, 2:].abs().sum() == 0


def test_gather_with_grad_is_identity_outside_distributed() -> None:
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
