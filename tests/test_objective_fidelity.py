"""Shared-base loss weights, normalisation heads across modalities, preset precedence, and the GTGM/UniMedI
objectives as their official code / paper define them."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.conftest import build_tiny, first_batch


# ----------------------------------------------------------------------------------------- loss weights
def _gtgm(**kw):
    from medvlp.methods.gtgm import GTGM

    enc = {"embed_dim": 32, "depth": 1, "num_heads": 2, "spatial_dims": [3], "img_size_3d": [8, 16, 16],
           "patch_size_3d": [4, 8, 8]}
    return GTGM(image_encoder=enc, text_encoder={"model": "builtin:tiny", "tiny_hidden_size": 32}, embed_dim=16, **kw)


def test_loss_weight_matches_registered_terms_under_any_modality_prefix() -> None:
    m = _gtgm(loss_weights={"clip1_loss": 1.0, "clip2_loss": 1.0, "barlow_loss": 0.01})
    assert m._weight("barlow_loss") == 0.01
    assert m._weight("ct_rate_barlow_loss") == 0.01  # underscores in the modality prefix
    assert m._weight("msd_liver_barlow_loss") == 0.01
    assert m._weight("em_clip1_loss") == 1.0
    m2 = _gtgm(loss_weights={"barlow_loss": 0.01, "ct_rate_barlow_loss": 0.5})
    assert m2._weight("ct_rate_barlow_loss") == 0.5 and m2._weight("mri_barlow_loss") == 0.01
    from medvlp.methods.unimedi import UniMedI

    u = UniMedI.__new__(UniMedI)  # the rule only needs the registered terms and the weights
    u.loss_weights = {"itc_loss": 2.0}
    assert u._weight("ct_itc_loss") == 2.0 and u._weight("ct_pseudo_itc_loss") == 1.0


def test_unknown_loss_weight_key_is_an_error_naming_the_known_terms() -> None:
    with pytest.raises(ValueError, match=r"unknown loss_weights keys \['barlow'\].*barlow_loss"):
        _gtgm(loss_weights={"barlow": 0.01})


def test_unknown_loss_weight_key_of_an_undeclared_method_fails_at_the_first_step() -> None:
    method, dm = build_tiny("clip", "method.init_args.loss_weights={itc: 2.0}")
    with pytest.raises(ValueError, match="unknown loss_weights keys"):
        method.training_step(first_batch(dm), 0)


# ----------------------------------------------------------------------------------------- GTGM objective
def test_gtgm_official_barlow_on_fixed_inputs() -> None:
    """Official covar_loss: raw features, C = f1ᵀf2 / B, (on + 0.0051·off) / 2 — hand-computed at B = 2."""
    from medvlp.losses.barlow import gtgm_barlow_loss

    f1 = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    f2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # C = f1ᵀ f2 / 2 = [[3, 4], [0, 2]] / 2 = [[1.5, 2], [0, 1]]
    on = (1.5 - 1) ** 2 + (1 - 1) ** 2
    off = 2.0 ** 2 + 0.0 ** 2
    assert gtgm_barlow_loss(f1, f2).item() == pytest.approx((on + 0.0051 * off) / 2)
    # at batch 2 the standardised form saturates (every entry ±1), the official one stays informative
    from medvlp.losses import barlow_twins_loss

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    c = (a - a.mean(0)) / a.std(0, unbiased=False)
    assert torch.allclose(c.abs(), torch.ones_like(c), atol=1e-3)
    assert barlow_twins_loss(a, b).item() != pytest.approx(gtgm_barlow_loss(a, b).item(), rel=0.1)


def test_gtgm_uses_official_barlow_and_sums_clip_directions(monkeypatch) -> None:
    import medvlp.methods.gtgm as gtgm_mod
    from medvlp.losses import clip_loss
    from medvlp.losses.barlow import gtgm_barlow_loss

    monkeypatch.setattr(gtgm_mod, "random_view", lambda x, **_: x)
    m = _gtgm()
    assert (m.barlow_form, m.clip_reduction) == ("official", "sum")
    torch.manual_seed(0)
    batch = {"image": torch.randn(2, 1, 8, 16, 16), "caption": ["a ct volume", "an mri volume"]}
    m.train()
    out = m.compute_losses(batch)
    f = m.image_features(batch["image"])["pooled"]
    assert out["barlow_loss"].item() == pytest.approx(gtgm_barlow_loss(f, f).item(), rel=1e-5)
    m.eval()  # deterministic heads/text for the CLIP check
    out = m.compute_losses(batch)
    v = m.image_proj(f)
    t = m.text_proj(m.text_encoder(batch["caption"])["pooled"])
    assert out["clip1_loss"].item() == pytest.approx(2 * clip_loss(v, t, 0.07).item(), rel=1e-5)


def test_gtgm_heads_and_config_follow_the_official_code() -> None:
    from tests.conftest import tiny_config

    cfg = tiny_config("gtgm")["method"]["init_args"]
    assert (cfg["proj_hidden_dim"], cfg["barlow_form"], cfg["clip_reduction"]) == (2048, "official", "sum")
    m = _gtgm(proj_hidden_dim=2048)
    for head in (m.image_proj, m.text_proj):
        layers = list(head.net)
        assert [type(x).__name__ for x in layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
        assert layers[0].out_features == 2048 and layers[1].affine and not layers[4].affine


def test_text_encoder_freezes_layers_but_can_keep_embeddings_trainable() -> None:
    from medvlp.encoders.text import TextEncoder

    enc = TextEncoder("builtin:tiny", freeze_layers=1, freeze_embeddings=False, tiny_hidden_size=32)
    assert all(p.requires_grad for p in enc.model.embeddings.parameters())
    assert not any(p.requires_grad for p in enc.model.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in enc.model.encoder.layer[1].parameters())
    frozen = TextEncoder("builtin:tiny", freeze_layers=1, tiny_hidden_size=32)
    assert not any(p.requires_grad for p in frozen.model.embeddings.parameters())
    with pytest.raises(ValueError, match="frozen embeddings"):
        TextEncoder("builtin:tiny", freeze_layers=1, freeze_embeddings=False, prefix_cache=8, tiny_hidden_size=32)


def test_warm_restart_cosine_matches_torch_and_decay_all() -> None:
    m = _gtgm(optimizer={"lr": 2e-5, "schedule": "cosine_restarts", "restart_steps": 4, "min_lr_ratio": 5e-4,
                         "decay_all": True, "weight_decay": 0.05})
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, T_0=4, T_mult=1, eta_min=1e-8)
    for _ in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-6)
        opt.step()
        sched.step()
        ref_opt.step()
        ref.step()
    default = _gtgm().configure_optimizers()["optimizer"]
    assert any(g["weight_decay"] == 0.0 for g in default.param_groups)


def test_gtgm_paper_config_composes_the_official_setup_with_sources() -> None:
    from importlib import resources

    from medvlp.compose import compose

    cfg = compose(["method=gtgm", "preset=paper"])
    m = cfg.method.init_args
    assert m.image_encoder.class_path == "medvlp.encoders.swin.SwinEncoder"
    assert set(m.image_encoder) == {"class_path", "init_args"}  # no ViT keys merged into the Swin spec
    assert m.image_encoder.init_args.feature_size == 48 and list(m.image_encoder.init_args.depths) == [2, 4, 2, 2]
    assert (m.text_encoder.model, m.text_encoder.freeze_layers, m.text_encoder.freeze_embeddings) == (
        "dmis-lab/biobert-v1.1", 6, False)
    assert (m.optimizer.lr, m.optimizer.schedule, m.optimizer.restart_steps) == (2e-5, "cosine_restarts", 10000)
    assert m.optimizer.lr * m.optimizer.min_lr_ratio == pytest.approx(1e-8)
    assert (cfg.trainer.max_steps, cfg.trainer.sync_batchnorm, cfg.data.init_args.batch_size) == (200000, True, 2)
    msd = compose(["method=gtgm", "preset=paper", "data=msd"]).data.init_args
    # the official two-view provider's shared sub-volume: view 32x160x160 + 2 x 80 in-plane padding
    assert (list(msd.volume_size), msd.resize) == ([32, 320, 320], "random_crop")
    assert (m.view_mode, m.view_padding, m.joint_batch_size) == ("official", 80, 2)
    clip = compose(["method=clip", "preset=paper"]).method.init_args  # MGCA's ConVIRT re-implementation
    assert (clip.loss_weights.clip_loss, clip.optimizer.warmup_ratio, clip.optimizer.decay_all) == (2.0, 0.4, True)
    for name in ("gtgm.yaml", "gtgm.paper.yaml", "unimedi.yaml", "unimedi.paper.yaml", "clip.paper.yaml"):
        text = resources.files("medvlp.methods").joinpath(name).read_text()
        for line in text.splitlines():
            if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
                assert "#" in line, f"{name}: value without a source: {line!r}"


def test_presets_print_overrides_of_method_values(caplog) -> None:
    from medvlp.compose import compose, compose_with_overrides

    _, overrides = compose_with_overrides(["method=gtgm"])  # default preset: demo
    by_key = {o.key: o for o in overrides}
    lr = by_key["method.init_args.optimizer.lr"]
    assert (lr.old, lr.old_source, lr.new, lr.new_source) == (2e-5, "methods/gtgm.yaml", 1e-3, "presets/demo.yaml")
    with caplog.at_level(logging.WARNING, logger="medvlp.compose"):
        compose(["method=gtgm"])
    assert "optimizer.lr: 2e-05 (methods/gtgm.yaml) -> 0.001 (presets/demo.yaml)" in caplog.text
    # under preset=paper the method's paper config wins over the generic paper preset: nothing overridden
    cfg, overrides = compose_with_overrides(["method=gtgm", "preset=paper"])
    assert overrides == [] and cfg.method.init_args.optimizer.lr == 2e-5
    _, overrides = compose_with_overrides(["method=gtgm", "preset=paper", "method.init_args.optimizer.lr=1e-4"])
    assert [o.key for o in overrides] == ["method.init_args.optimizer.lr"]


# ----------------------------------------------------------------------------------------- norm heads
def _train_eval_agreement(method, batch) -> dict[str, float]:
    """Min cosine, per head, between the train-step embeddings and the eval-mode head on the same inputs,
    with running statistics equal to the average of the step's batch statistics (momentum None)."""
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"image_proj": [], "text_proj": []}
    hooks = []
    for name in calls:
        head = getattr(method, name)
        for mod in head.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.momentum = None
                mod.reset_running_stats()
        hooks.append(head.register_forward_hook(
            lambda mod, inp, out, name=name: calls[name].append((inp[0].detach(), out.detach()))))
    method.train()
    with torch.no_grad():
        method._losses(batch)
    for h in hooks:
        h.remove()
    method.eval()
    for name, pairs in calls.items():  # running_var is unbiased; train mode normalises with the biased one
        sizes = {x.shape[0] for x, _ in pairs}
        assert len(sizes) == 1, sizes
        n = sizes.pop()
        for mod in getattr(method, name).modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_var.mul_((n - 1) / n)
    worst = {}
    with torch.no_grad():
        for name, pairs in calls.items():
            head = getattr(method, name)
            cos = [torch.nn.functional.cosine_similarity(head(x), y, dim=-1).min().item() for x, y in pairs]
            worst[name] = min(cos)
    return worst


def test_gtgm_bn_heads_agree_between_train_and_eval_on_mixed_modalities(monkeypatch) -> None:
    import medvlp.methods.gtgm as gtgm_mod

    monkeypatch.setattr(gtgm_mod, "random_view", lambda x, **_: x)  # identical views: one population
    method, dm = build_tiny("gtgm")
    batch = first_batch(dm)
    assert set(batch) == {"ct", "mri", "em"}
    worst = _train_eval_agreement(method, batch)
    assert worst["image_proj"] > 0.999 and worst["text_proj"] > 0.999, worst


def test_unimedi_bn_heads_agree_between_train_and_eval_on_mixed_modalities() -> None:
    method, dm = build_tiny("unimedi")
    batch = first_batch(dm)
    assert set(batch) == {"xray", "ct"}
    worst = _train_eval_agreement(method, batch)
    assert worst["image_proj"] > 0.999 and worst["text_proj"] > 0.999, worst


# ----------------------------------------------------------------------------------------- UniMedI
def test_unimedi_terms_cannot_be_driven_below_chance_by_unrelated_text() -> None:
    """Identical images with distinct, unrelated texts: no image–text term may learn to tell the pairs
    apart (the old token_itc pooled each image by its own report and reached ~0 here)."""
    method, dm = build_tiny("unimedi")
    batch = dict(first_batch(dm)["xray"])
    b = batch["image"].shape[0]
    batch["image"] = torch.randn(1, *batch["image"].shape[1:]).expand_as(batch["image"]).contiguous()
    batch["text"] = [f"unrelated words {w} number {i}" for i, w in enumerate(["apple", "river", "cloud", "stone"][:b])]
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    method.train()
    lowest: dict[str, float] = {}
    for _ in range(15):
        terms = method.compute_losses(batch)
        itc = {k: v for k, v in terms.items() if k.endswith("itc_loss")}
        for k, v in itc.items():
            lowest[k] = min(lowest.get(k, math.inf), v.item())
        opt.zero_grad()
        sum(itc.values()).backward()
        opt.step()
    assert lowest and all(v >= math.log(b) - 1e-3 for v in lowest.values()), lowest


def test_unimedi_2d_selection_steers_the_itc_term() -> None:
    method, dm = build_tiny("unimedi")
    batch = first_batch(dm)["xray"]
    method.eval()
    out = {}
    for ratio in (0.05, 0.95):
        method.select_ratio = ratio
        torch.manual_seed(0)
        with torch.no_grad():
            out[ratio] = method.compute_losses(batch)["itc_loss"].item()
    assert out[0.05] != pytest.approx(out[0.95], abs=1e-4), out


def test_unimedi_3d_selection_is_at_slice_resolution_and_feeds_pseudo_pairs() -> None:
    from medvlp.methods.unimedi import select_slices

    with pytest.raises(ValueError, match="candidate slabs"):
        select_slices(torch.rand(2, 2 * 4), (2, 2, 2), 2)  # k = number of slabs: no selection
    with pytest.raises(ValueError, match="max_slab_depth"):
        build_tiny("unimedi", "method.init_args.image_encoder.patch_size_3d=[16,8,8]")
    with pytest.raises(ValueError, match="2D path"):
        build_tiny("unimedi", "method.init_args.image_encoder.spatial_dims=[3]")
    method, dm = build_tiny("unimedi")
    out = method._losses(first_batch(dm))
    assert "ct_pseudo_itc_loss" in out and torch.isfinite(out["ct_pseudo_itc_loss"])


def test_unimedi_self_distillation_centers_the_teacher_and_does_not_collapse(tmp_path) -> None:
    import lightning as L

    method, dm = build_tiny("unimedi", "trainer.max_steps=12", "method.init_args.optimizer.lr=1e-3")
    L.Trainer(max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, enable_checkpointing=False).fit(method, datamodule=dm)
    assert method.center.abs().sum() > 0  # the center is tracked
    batch = first_batch(dm)
    method.eval()
    with torch.no_grad():
        for sub in batch.values():
            from medvlp.methods.unimedi import cls_attention

            tokens, _ = cls_attention(method.teacher_encoder, sub["image"])
            probs = torch.softmax((method.teacher_head(tokens) - method.center) / method.teacher_temp, -1)
            probs = probs.reshape(-1, probs.shape[-1])
            used = probs.argmax(-1).unique().numel()
            mean = probs.mean(0)
            entropy = -(mean * mean.clamp_min(1e-12).log()).sum().item()
            assert used > 1 and entropy > 1.0, (used, entropy)


# ----------------------------------------------------------------------------------------- captions, crops
def test_caption_text_filter_and_hf_captioner_on_a_random_slice() -> None:
    from medvlp.datamodules.volume.captions import HFImageCaptioner, text_filter

    assert text_filter("figure 1 : a ct scan of the liver") == "a ct scan of the liver"
    assert text_filter("fig. 2. axial slice") == "axial slice"
    assert text_filter("an image figure 3 of a kidney") == "an image of a kidney"
    seen: list[float] = []

    def pipe(img):  # stands in for BLIP: records which slice it saw
        seen.append(float(__import__("numpy").asarray(img)[0, 1, 0]))
        return [{"generated_text": "figure 4 : a grey organ"}]

    vol = torch.full((1, 16, 4, 4), 100.0)
    vol[0, :, 0, 0] = 0.0
    vol[0, :, 0, 1] = torch.arange(16.0) + 1  # after min–max scaling pixel (0, 1) still encodes the slice index
    cap = HFImageCaptioner(pipe=pipe, seed=0)
    texts = [cap({"image": vol, "meta": {"id": "liver_007.nii.gz"}}) for _ in range(12)]
    assert texts[0] == "liver_007, a grey organ"
    assert len(set(seen)) > 3  # random slices, not always the middle one


def test_template_captions_are_flagged_as_label_derived(caplog) -> None:
    from medvlp.datamodules.volume.captions import TemplateCaptioner, uses_label_derived_captions
    from medvlp.methods.gtgm import GTGM

    with caplog.at_level(logging.WARNING):
        TemplateCaptioner()
    assert "offline demo only" in caplog.text
    assert uses_label_derived_captions(GTGM.example_data)
    assert not uses_label_derived_captions({"name": "msd", "init_args": {"captions": {"type": "hf", "model": "m"}}})


def test_benchmark_report_marks_results_pretrained_on_label_derived_captions(tmp_path) -> None:
    import json

    from medvlp.benchmarks.suite.paper_view import LABEL_DERIVED, pretrain_data_of
    from medvlp.benchmarks.suite.results import COLUMNS, ResultStore
    from medvlp.benchmarks.report.tables import report
    from medvlp.methods.gtgm import GTGM

    tagged = pretrain_data_of({}, GTGM.example_data, "x.ckpt")
    assert tagged.endswith(LABEL_DERIVED)
    assert LABEL_DERIVED not in pretrain_data_of({}, {"name": "msd", "init_args": {}}, "x.ckpt")
    store = ResultStore(tmp_path / "results.csv")
    rows = []
    for label, pdata in (("gtgm", tagged), ("clip", "phantom")):
        row = {c: "" for c in COLUMNS}
        row.update(suite="s", method=label, label=label, dataset="d", protocol="zero_shot", params="{}", fraction=1.0,
                   seed=0, metric="auc", value=0.5, definition="auc", comparability=json.dumps({"pretrain_data": pdata}))
        rows.append(row)
    store.add(rows)
    md = report(store.path, plots=False)
    assert "Pretrained on label-derived captions" in md and md.rstrip().endswith("gtgm")


def test_random_crop_volumes_for_gtgm(tmp_path) -> None:
    from medvlp.datamodules.volume.ct import MSDDataModule
    from tests import fixtures as fx

    root = fx.make_msd(tmp_path / "Task03_Liver")
    dm = MSDDataModule(str(root), volume_size=(8, 12, 12), resize="random_crop")
    train = dm.build_dataset("train", augment=True)
    crops = [train[0]["image"] for _ in range(4)]
    assert all(c.shape == (1, 8, 12, 12) for c in crops)
    assert any(not torch.equal(crops[0], c) for c in crops[1:])  # random positions
    val = dm.build_dataset("train", augment=False)
    assert torch.equal(val[0]["image"], val[0]["image"])  # centre crop in evaluation
    with pytest.raises(ValueError, match="resize must be one of"):
        MSDDataModule(str(root), resize="crop")
