"""Method-specific behaviour: UniMedI selection/EMA/ablation, UMCL targets/prompts, GTGM, ASG."""
from __future__ import annotations

import pytest
import torch

from medvlp.datamodules.volume.captions import CaptionError, CaptionFile
from medvlp.method import ema_update
from medvlp.roi import roi_align
from tests.conftest import build_tiny, first_batch


# ----------------------------------------------------------------------------------------- UniMedI
def test_unimedi_selects_the_lesion_slice_from_relevance() -> None:
    from medvlp.methods.unimedi import keep_most_attended, select_slices, slices_from_slabs

    grid = (8, 4, 4)
    rel = torch.randn(2, 128) * 0.05
    rel.view(2, *grid)[0, 5] += 1.0  # volume 0: lesion in slab 5
    rel.view(2, *grid)[1, 2] += 1.0  # volume 1: lesion in slab 2
    slabs = select_slices(rel, grid, 1)
    assert slabs[:, 0].tolist() == [5, 2]
    vol = torch.arange(32, dtype=torch.float).view(1, 1, 32, 1, 1).expand(2, 1, 32, 2, 2)
    sl = slices_from_slabs(vol, slabs, 4)
    assert sl[:, 0, 0, 0].tolist() == [22.0, 10.0]  # middle slice of slab 5 (20..23) and slab 2 (8..11)
    patches = keep_most_attended(torch.tensor([[0.1, 0.9, 0.2, 0.8]]), 0.5)
    assert patches.tolist() == [[False, True, False, True]]


def test_unimedi_selection_on_phantom_ct_with_planted_relevance() -> None:
    """A phantom CT case with one nodule: relevance = lesion-mask overlap per token → its slab is picked."""
    from medvlp.datamodules.phantom.render import render_ct
    from medvlp.methods.unimedi import select_slices

    rng = __import__("numpy").random.default_rng(3)
    case = None
    for _ in range(500):
        c = render_ct(rng, (32, 64, 64), prevalence=0.3)
        f = [x for x in c.findings if x.label == "Lung nodule"]
        if f and len([x for x in c.findings if x.slices]) == 1:
            case = c
            break
    assert case is not None
    mask = torch.from_numpy(case.mask).float()[None, None]
    rel = torch.nn.functional.avg_pool3d(mask, (4, 16, 16)).flatten(1)  # token grid (8, 4, 4)
    slab = int(select_slices(rel, (8, 4, 4), 1)[0, 0])
    lo, hi = [x for x in case.findings if x.slices][0].slices
    assert lo // 4 <= slab <= hi // 4


def test_ema_update_moves_target_towards_online() -> None:
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = target.weight.detach().clone()
    ema_update(online, target, 0.9)
    assert torch.allclose(target.weight, 0.9 * before + 0.1 * online.weight)


def test_unimedi_2d_only_3d_only_and_joint_batches() -> None:
    method, dm = build_tiny("unimedi")
    batch = first_batch(dm)
    joint = method._losses(batch)
    assert any(k.startswith("xray_") for k in joint) and "ct_pseudo_itc_loss" in joint
    method.modalities = "2d"
    assert all(k.startswith("xray_") for k in method._losses(batch))
    method.modalities = "3d"
    assert all(k.startswith("ct_") for k in method._losses(batch))
    with pytest.raises(ValueError, match="2D batch"):
        method.compute_losses(batch["xray"])


def test_unimedi_teacher_follows_student_after_a_step(tmp_path) -> None:
    import lightning as L

    method, dm = build_tiny("unimedi", "method.init_args.ema_momentum=[0.5,0.5]")
    before = [p.detach().clone() for p in method.teacher_encoder.parameters()]
    L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, enable_checkpointing=False).fit(method, datamodule=dm)
    after = list(method.teacher_encoder.parameters())
    online = list(method.image_encoder.parameters())
    moved = [i for i, (a, b) in enumerate(zip(before, after)) if not torch.equal(a, b)]
    assert moved
    i = moved[0]
    assert torch.allclose(after[i], 0.5 * before[i] + 0.5 * online[i].detach(), atol=1e-6)
    assert not any(p.requires_grad for p in method.teacher_encoder.parameters())


# ----------------------------------------------------------------------------------------- UMCL
def test_umcl_label_set_targets() -> None:
    from medvlp.methods.umcl import label_set_targets

    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [float("nan"), 0]])
    t = label_set_targets(labels)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float)
    assert torch.equal(t, expected)


def test_umcl_prompts_learn_with_frozen_text_encoder() -> None:
    method, dm = build_tiny("umcl", "method.init_args.freeze_text=true")
    batch = first_batch(dm)
    method._total(method._losses(batch), "train").backward()
    assert method.prompts.ctx.grad is not None and method.prompts.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.text_encoder.parameters())


@pytest.mark.parametrize("position,specific", [("front", False), ("middle", True), ("end", True)])
def test_umcl_prompt_positions(position: str, specific: bool) -> None:
    method, dm = build_tiny("umcl", f"method.init_args.prompt_position={position}",
                           f"method.init_args.class_specific={str(specific).lower()}")
    pos, neg = method.learned_zero_shot_classifier(dm.label_names)
    assert pos.shape == neg.shape == (len(dm.label_names), method.embed_dim)


def test_umcl_trains_on_label_only_and_report_only_batches() -> None:
    method, dm = build_tiny("umcl")
    batch = first_batch(dm)
    label_only = {k: v for k, v in batch.items() if k not in ("text", "sections")}
    report_only = {k: v for k, v in batch.items() if k not in ("labels", "label_names")}
    for b in (label_only, report_only):
        loss = method._total(method._losses(b), "train")
        loss.backward()
        assert torch.isfinite(loss)
    mixed = dict(batch)
    mixed["text"] = ["" if i % 2 else t for i, t in enumerate(batch["text"])]
    assert torch.isfinite(method._total(method._losses(mixed), "train"))


# ----------------------------------------------------------------------------------------- GTGM
def test_gtgm_caption_file_join_errors_are_clear(tmp_path) -> None:
    good = tmp_path / "captions.csv"
    good.write_text("id,caption\nvol_1.nii.gz,a ct volume\n")
    src = CaptionFile(str(good))
    assert src({"meta": {"id": "vol_1"}}) == "a ct volume"
    with pytest.raises(CaptionError, match="vol_2.*captions.csv"):
        src({"meta": {"id": "vol_2"}})
    dup = tmp_path / "dup.csv"
    dup.write_text("id,caption\na,x\na.nii.gz,y\n")
    with pytest.raises(ValueError, match="duplicate ids"):
        CaptionFile(str(dup))
    bad = tmp_path / "bad.csv"
    bad.write_text("name,text\na,x\n")
    with pytest.raises(ValueError, match="missing columns"):
        CaptionFile(str(bad))


def test_gtgm_swin_backbone_option() -> None:
    pytest.importorskip("einops")
    method, dm = build_tiny(
        "gtgm", "method.init_args.image_encoder.class_path=medvlp.encoders.swin.SwinEncoder",
        "method.init_args.image_encoder.init_args.feature_size=12",
        "method.init_args.image_encoder.init_args.depths=[1,1,1,1]",
        "method.init_args.image_encoder.init_args.num_heads=[1,1,1,1]",
        "method.init_args.image_encoder.init_args.window_size=2")
    out = method._losses(first_batch(dm))  # CT + MRI + EM sub-batches: one objective over their concatenation
    assert set(out) == {"clip1_loss", "clip2_loss", "barlow_loss"}
    assert all(m.ndim == 5 for m in method.image_feature_maps(torch.randn(2, 1, 16, 32, 32)))


# ----------------------------------------------------------------------------------------- ASG
def test_roi_align_averages_inside_the_box() -> None:
    fmap = torch.zeros(1, 1, 4, 4)
    fmap[..., :, :2] = 1.0  # left half of the image is 1
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 31.0], [20.0, 0.0, 31.0, 31.0]]])  # 32x32 image, map cells at x = 0..3
    out = roi_align(fmap, boxes, 4 / 32, sampling_ratio=4)
    assert out[0, 0, 0] > 0.95 and out[0, 1, 0] < 0.05


def test_asg_annotations_link_region_sentences_and_tags() -> None:
    method, dm = build_tiny("asg")
    text = "FINDINGS: There is a small right pleural effusion. The left upper lung zone is clear. No pneumothorax."
    tags, spans = method.annotator(text)
    names = method.parser.region_names
    assert tags[method.parser.tag_names.index("pleural effusion")] == 1.0
    assert spans[names.index("right costophrenic angle")] and spans[names.index("left upper lung zone")]
    assert not spans[names.index("cardiac silhouette")]
    s, e = spans[names.index("left upper lung zone")][0]
    assert text[s:e] == "The left upper lung zone is clear."


def test_umcl_learned_prompts_embed_the_same_in_train_and_eval_mode() -> None:
    """Zero-shot with learned prompts must score the embeddings the loss trained (no BatchNorm mixing)."""
    method, dm = build_tiny("umcl")
    for m in method.modules():  # isolate normalisation behaviour from dropout noise
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = first_batch(dm)
    method.train()
    for _ in range(3):  # report batches update the text head's running statistics
        method._total(method._losses(batch), "train")
    names = dm.label_names
    train_pos, train_neg = (torch.nn.functional.normalize(z, dim=-1) for z in method.prompt_embeddings(names))
    method.eval()
    eval_pos, eval_neg = method.learned_zero_shot_classifier(names)
    cos = torch.cat([(train_pos * eval_pos).sum(-1), (train_neg * eval_neg).sum(-1)])
    assert cos.min() > 0.9999, cos


def test_umcl_yaml_marks_every_choice_not_from_the_paper() -> None:
    """The UMCL paper has no code and only an abstract: every configured value is our choice."""
    from importlib import resources

    text = resources.files("medvlp.methods").joinpath("umcl.yaml").read_text()
    value_lines = [ln for ln in text.splitlines() if ":" in ln and not ln.lstrip().startswith("#")
                   and not ln.rstrip().endswith(":")]
    assert value_lines and all("[not from paper]" in ln for ln in value_lines), value_lines
    assert "label source [not from paper]" in text
