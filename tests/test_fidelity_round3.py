"""Reference protocols against the official evaluation code (BenchX b874fa6, MGCA 680fe4a, GTGM e92b287 /
GTGM+ c67004a): schedules, subset seeds, MGCA's RSNA subset, GTGM's split and Dice, fidelity tables."""
from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from medvlp.benchmarks.kit.features import FeatureCache
from medvlp.benchmarks.kit.protocol import EvalContext
from tests.conftest import build_tiny


def _ctx(model, dm, tmp_path, subset_seed=None, **params):
    return EvalContext(model, dm, FeatureCache(None), params, "cpu", tmp_path, subset_seed)


@pytest.fixture(scope="module")
def tiny_xray():
    torch.manual_seed(0)
    model, dm = build_tiny("clip")
    return model.eval(), dm


# ----------------------------------------------------------------------------- BenchX schedule
def benchx_factor(step: int, warmup: int = 50, t_total: int = 3000, cycles: float = 0.5) -> float:
    """Transcription of BenchX WarmupCosineScheduler.lr_lambda (unifier/blocks/schedulers/
    WarmupCosineScheduler.py L19-24 @ b874fa6): progress is not clamped."""
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    progress = float(step - warmup) / float(max(1, t_total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress)))


PINNED = {0: 0.0, 1500: 0.513310, 3000: 0.0, 4475: 0.5, 5950: 1.0, 8000: 0.212606}


def test_benchx_lr_factor_is_not_clamped(tiny_xray, tmp_path) -> None:
    from medvlp.benchmarks.reference.benchx import BenchXFinetune

    model, dm = tiny_xray
    trainer, _ = BenchXFinetune().build(_ctx(model, dm, tmp_path, crop=24, fraction_source="hash"), 1.0, 0)
    lam = trainer.scheduler.lr_lambdas[0]
    for step, want in PINNED.items():
        assert benchx_factor(step) == pytest.approx(want, abs=1e-6), step  # the transcription itself
        assert lam(step) == pytest.approx(want, abs=1e-6), step
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0  # LambdaLR evaluates factor(0): BenchX's first step at lr 0


def test_medvlp_schedule_stays_clamped_after_total_steps() -> None:
    from medvlp.benchmarks.kit.head_loop import warmup_cosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lam = warmup_cosine(opt, 3000, 50).lr_lambdas[0]
    assert lam(3000) == pytest.approx(0.0) and lam(4475) == pytest.approx(0.0) and lam(5950) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- subset seeds
def test_reference_protocols_draw_the_subset_with_the_subset_seed(tiny_xray, tmp_path) -> None:
    """subset_seeds: the label subset follows ctx.subset_seed_for(seed), not the training seed."""
    from medvlp.benchmarks.kit.splits import fraction_rows
    from medvlp.benchmarks.kit.views import split_ids
    from medvlp.benchmarks.reference.benchx import BenchXFinetune
    from medvlp.benchmarks.reference.mgca_linear import MGCALinear

    model, dm = tiny_xray
    ids = split_ids(dm, "train")
    want, _ = fraction_rows(ids, 0.5, 7)
    assert want != fraction_rows(ids, 0.5, 0)[0]
    for proto, params in ((MGCALinear(), {"resize": 32, "crop": 24}), (BenchXFinetune(), {"crop": 24})):
        trainer, _ = proto.build(_ctx(model, dm, tmp_path, 7, fraction_source="hash", **params), 0.5, 0)
        assert trainer.info["rows"] == want, proto.name


def test_segmentation_references_draw_the_subset_with_the_subset_seed(tmp_path) -> None:
    from medvlp.benchmarks.kit.splits import fraction_rows
    from medvlp.benchmarks.kit.views import split_ids
    from medvlp.benchmarks.reference.benchx import BenchXSegmentation
    from medvlp.benchmarks.reference.mgca_segmentation import MGCASegmentation
    from medvlp.datamodules.xray.chest import SIIMDataModule
    from tests.fixtures import make_siim

    dm = SIIMDataModule(str(make_siim(tmp_path / "siim", n=16)), image_size=32, batch_size=4)
    torch.manual_seed(0)
    model, _ = build_tiny("clip", "method.init_args.image_encoder.depth=4")
    ids = split_ids(dm, "train")
    want, _ = fraction_rows(ids, 0.5, 7)
    assert want != fraction_rows(ids, 0.5, 0)[0]
    t, _ = MGCASegmentation().build(_ctx(model, dm, tmp_path, 7, fraction_source="hash", image_size=32,
                                         features=[8, 8, 8, 8]), 0.5, 0)
    assert t.info["rows"] == want
    t, _ = BenchXSegmentation().build(_ctx(model, dm, tmp_path, 7, fraction_source="hash", channels=8,
                                           aux_channels=8), 0.5, 0)
    assert t.info["rows"] == want


def test_gtgm_finetune_rejects_subset_seeds(tmp_path) -> None:
    from medvlp.benchmarks.reference.gtgm_finetune import GTGMFinetune
    from medvlp.datamodules.volume.ct import MSDDataModule
    from tests.fixtures import make_msd

    dm = MSDDataModule(str(make_msd(tmp_path / "msd", n=10)), volume_size=(8, 16, 16), test_fraction=0.3)
    model, _ = build_tiny("gtgm")
    with pytest.raises(ValueError, match="subset_seeds"):
        GTGMFinetune().build(_ctx(model, dm, tmp_path, 7, width=8, max_stages=1), 1.0, 0)


# ----------------------------------------------------------------------------- MGCA's RSNA subset
def mgca_rsna_subset(labels_csv, frac: float, tmp_path) -> list[str]:
    """Transcription of MGCA's RSNA classification path: preprocess_rsna_data (mgca/preprocess/rsna.py
    L22-64 @ 680fe4a) writes train.csv in train_test_split's order; RSNAImageDataset reads it and takes
    df.sample(frac, random_state=42) (mgca/datasets/classification_dataset.py L165-166)."""
    from sklearn.model_selection import train_test_split

    df = pd.read_csv(labels_csv)

    def box(row):
        return 0 if row["Target"] == 0 else [row["x"], row["y"], row["x"] + row["width"], row["y"] + row["height"]]

    df["bbox"] = df.apply(box, axis=1)
    df = df[["patientId", "bbox"]]
    df = df.groupby("patientId").agg(list).reset_index()
    df["bbox"] = df["bbox"].apply(lambda x: None if x == [0] else x)
    df["Target"] = df["bbox"].apply(lambda x: 0 if x is None else 1)
    train_df, test_val_df = train_test_split(df, test_size=0.15 * 2, random_state=0)
    tmp_path.mkdir(exist_ok=True)
    train_df.to_csv(tmp_path / "train.csv", index=False)
    train = pd.read_csv(tmp_path / "train.csv")
    return train.sample(frac=frac, random_state=42)["patientId"].astype(str).tolist()


def test_mgca_fraction_on_rsna_is_mgcas_subset(tmp_path) -> None:
    from medvlp.benchmarks.kit.splits import select_fraction
    from medvlp.benchmarks.kit.views import split_ids
    from medvlp.datamodules.xray.chest import RSNAPneumoniaDataModule

    rng = np.random.default_rng(3)
    rows = ["patientId,x,y,width,height,Target"]
    pids = [f"{rng.integers(16 ** 8):08x}-p{i}" for i in range(1200)]
    for i, pid in enumerate(rng.permutation(pids)):  # the labels file is not sorted by id
        if i % 3 == 0:
            rows += [f"{pid},4,4,8,8,1", f"{pid},16,16,6,10,1"]
        else:
            rows.append(f"{pid},,,,,0")
    root = tmp_path / "rsna"
    root.mkdir()
    (root / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    dm = RSNAPneumoniaDataModule(str(root), split_convention="mgca")
    ids = split_ids(dm, "train")
    assert len(ids) == 840  # 70 %
    for frac in (0.01, 0.1):
        rows_, _, _ = select_fraction(ids, frac, 0, "mgca")
        assert [ids[r] for r in rows_] == mgca_rsna_subset(root / "stage_2_train_labels.csv", frac, tmp_path / "m")


# ----------------------------------------------------------------------------- GTGM
def test_gtgm_best_val_dice_is_monai_mean_reduction() -> None:
    """MONAI DiceMetric(include_background=True, reduction="mean") as GTGM's task1.py L318: per image the
    mean over its present classes, then over images (7/9), not the per-class mean (0.7222)."""
    from medvlp.benchmarks.metrics.dice import dice_score, monai_mean_dice

    gt = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 2]]).reshape(2, 1, 6)
    pred = torch.tensor([[0, 0, 1, 2, 0, 0], [0, 1, 1, 2, 2, 2]]).reshape(2, 1, 6)
    assert monai_mean_dice(pred, gt, 3) == pytest.approx(7 / 9, abs=1e-6)
    assert dice_score(pred, gt, 3, "with_background") == pytest.approx((1 + 2 / 3 + 0.5) / 3, abs=1e-6)
    flattened = (1 + 2 / 3 + 1 + 2 / 3 + 0.5) / 5
    assert monai_mean_dice(pred, gt, 3) != pytest.approx(flattened, abs=1e-3)


def test_gtgm_task1_split_is_the_launchers_shuffled_80_20() -> None:
    """task1.py L179-185: random.seed(42); random.shuffle(datalist); train = [:int(N·train_rate)],
    val = [int(N·0.8):]."""
    from medvlp.benchmarks.reference.gtgm_finetune import gtgm_task1_split

    ids = [f"case{i}" for i in range(23)]
    datalist = list(ids)
    random.seed(42)
    random.shuffle(datalist)
    train, val = gtgm_task1_split(ids, 1.0)
    assert [ids[i] for i in train] == datalist[: int(23 * 0.8)] and [ids[i] for i in val] == datalist[int(23 * 0.8):]
    train, _ = gtgm_task1_split(ids, 0.5)
    assert [ids[i] for i in train] == datalist[: int(23 * 0.4)]


def test_gtgm_recipes_are_named_with_their_settings(tmp_path) -> None:
    from medvlp.benchmarks.reference.gtgm_finetune import GTGMFinetune

    proto = GTGMFinetune()
    p, extra = proto.settings(_ctx(None, None, tmp_path))
    assert (p["recipe"], p["lr"], p["batch_size"], p["max_iterations"], p["eval_interval"]) == ("task1", 1e-5, 2, 40000, 1000)
    p, extra = proto.settings(_ctx(None, None, tmp_path, recipe="gtgm_plus"))
    assert (p["lr"], p["batch_size"], p["max_iterations"], p["eval_interval"]) == (1e-4, 8, 25000, 500) and not extra


# ----------------------------------------------------------------------------- fidelity tables
REFERENCE = ["benchx_finetune", "benchx_segmentation", "mgca_linear", "mgca_segmentation", "gtgm_finetune", "em_cremi",
             "zero_shot_argmax", "category_retrieval"]


@pytest.mark.parametrize("name", REFERENCE)
def test_every_reference_protocol_documents_its_fidelity_table(name) -> None:
    from medvlp.registry import BENCHMARKS

    cls = BENCHMARKS.get(name)
    assert "| element | official (file:line @ commit) | medvlp | same / deviation |" in cls.__doc__
    assert cls.fidelity_elements and all(e.source for e in cls.fidelity_elements)


def test_fidelity_is_official_only_when_every_element_is_the_same() -> None:
    from medvlp.benchmarks.kit.fidelity import Element, fidelity

    same = [Element("a", "1", "f.py L1", "1", param="lr", value=1e-3)]
    assert fidelity(same, {}) == "official" and fidelity(same, {"lr": 0.001}) == "official"
    assert fidelity(same, {"lr": 0.01}).startswith("deviates: lr=0.01")
    assert fidelity(same + [Element("b", "x", "g.py L2", "y", "no AMP")], {}) == "deviates: b"
    assert fidelity(same, {}, ["run-time"]) == "deviates: run-time"


# ----------------------------------------------------------------------------- VOI / ARAND
def test_voi_and_adapted_rand_match_scikit_image() -> None:
    """The one VOI (metrics/voi.py) behind em_cremi (bits) and instance_voi (nats) agrees with
    scikit-image's variation_of_information / adapted_rand_error (what GTGM's NeuronSeg calls)."""
    skm = pytest.importorskip("skimage.metrics")
    from medvlp.benchmarks.metrics.voi import adapted_rand_error, variation_of_information
    from medvlp.benchmarks.protocols.segmentation import voi
    from medvlp.benchmarks.reference.em_cremi import cremi_voi

    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = rng.integers(0, 6, (4, 9, 9))
        seg = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(1, 9, gt.shape))
        split, merge = skm.variation_of_information(gt, seg, ignore_labels=[0])  # bits (log2)
        assert cremi_voi(seg, gt) == pytest.approx((split, merge), abs=1e-9)
        assert variation_of_information(seg, gt, base=2) == pytest.approx((split, merge), abs=1e-9)
        assert voi(seg, gt) == pytest.approx((split * math.log(2), merge * math.log(2)), abs=1e-9)  # nats
        assert adapted_rand_error(seg, gt) == pytest.approx(skm.adapted_rand_error(gt, seg, ignore_labels=(0,))[0], abs=1e-9)


# ----------------------------------------------------------------------------- UMCL
def test_umcl_jaccard_target_masks_unknown_labels() -> None:
    """Unknown (NaN) labels are not negatives: unlabelled samples are only their own positives, not
    positives of each other or of "no finding" samples (as label_set_targets)."""
    from medvlp.methods.umcl import UMCL, jaccard_targets, label_set_targets

    nan = float("nan")
    labels = torch.tensor([[nan, nan], [nan, nan], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    t = jaccard_targets(labels)
    assert torch.equal(t[0], torch.tensor([1.0, 0, 0, 0, 0, 0])) and torch.equal(t[1], torch.tensor([0, 1.0, 0, 0, 0, 0]))
    assert t[2, 5] == 1.0 and t[3, 4] == pytest.approx(0.5) and t[2, 3] == 0.0  # known rows: Jaccard overlap
    assert torch.equal(t[:2], label_set_targets(labels)[:2])
    model = UMCL.__new__(UMCL)
    model.target = "jaccard"
    assert torch.equal(model._targets(labels), t)


# ----------------------------------------------------------------------------- BenchX zero-shot / retrieval
def test_zero_shot_argmax_benchx_convention_zscores_per_batch(tmp_path) -> None:
    from medvlp.benchmarks.protocols.zero_shot import ZeroShotArgmax
    from tests.test_reference_protocols import _StubDM, _StubFeatures, _StubModel, _zs_features

    feats = _zs_features()
    ctx = EvalContext(_StubModel(), _StubDM(), _StubFeatures(feats), {"convention": "benchx", "batch_size": 3},
                      "cpu", tmp_path)
    res = ZeroShotArgmax().run(ctx, seed=0)
    vals = {v.metric: v.value for v in res.values}
    t = {k: _StubModel().encode_text(v).numpy() for k, v in _StubDM().class_prompts().items()}  # ≤ 5 prompts: all kept
    raw = np.stack([(feats.image_embedding @ t[k].T).max(1) for k in "abc"], 1)
    order = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0)).numpy()
    accs = []
    for idx in (order[:3], order[3:]):  # BenchX: z-score within each batch, accuracy averaged over batches
        s = raw[idx]
        s = (s - s.mean(0)) / s.std(0)
        accs.append(float((s.argmax(1) == feats.labels[idx].argmax(1)).mean()))
    assert vals["acc"] == pytest.approx(np.mean(accs))
    assert res.comparability["protocol_variant"] == "benchx_argmax"
    assert "z-scored per class within each of 2 random batches of 3" in res.values[0].definition


def test_benchx_batch_retrieval_counts_label_matches_over_n_times_k() -> None:
    from medvlp.benchmarks.protocols.retrieval import benchx_batch_retrieval

    labels = np.array([[1.0, 0], [1.0, 0], [0, 1.0]])
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.9], [0.1, 0.2, 0.8]])
    hit, prec = benchx_batch_retrieval(sim, labels, (1, 10))
    # top-1: 0→0 (match), 1→2 (no), 2→2 (match); top-10 = all 3: matches 2, 2, 1 of 3·10 slots
    assert hit[1] == pytest.approx(2 / 3) and prec[1] == pytest.approx(2 / 3)
    assert hit[10] == 1.0 and prec[10] == pytest.approx(5 / 30)


# ----------------------------------------------------------------------------- paper view of paper_benchx
def test_paper_benchx_on_fixtures_shows_its_rows_without_a_paper_number(tmp_path) -> None:
    """BenchX's tables are not available offline: the paper view lists medvlp's BenchX rows beside
    "no citable source available offline" and never estimates a paper number."""
    from medvlp.benchmarks.suite.paper_view import paper_numbers, paper_table
    from medvlp.benchmarks.suite.runner import load_suite, run_suite
    from tests.test_reference_protocols import make_nih

    nih = make_nih(tmp_path / "nih")
    for name, lines in (("train_list.txt", range(0, 12)), ("val_list.txt", range(12, 16)), ("test_list.txt", range(16, 20))):
        (nih / name).write_text("".join(f"{i // 2:08d}_{i % 2:03d}.png 0\n" for i in lines))
    (nih / "train_1.txt").write_text("00000000_000.png 0\n00000000_001.png 0\n")
    (nih / "train_10.txt").write_text("00000001_000.png 0\n00000001_001.png 0\n00000002_000.png 0\n")
    raw = load_suite("paper_benchx")
    assert raw["protocols"]["benchx_finetune_nih"]["seeds"] == [42, 0, 1]  # run_BenchX_*.sh L6-9
    suite = load_suite("paper_benchx", [f"output={tmp_path / 'out'}", "preset=tiny", f"datasets.nih.init_args.root={nih}",
                                        "datasets.nih.init_args.image_size=32", "protocols.benchx_finetune_nih.crop=24",
                                        "protocols.benchx_finetune_nih.max_epochs=1",
                                        "protocols.benchx_finetune_nih.batch_size=8",
                                        "protocols.benchx_finetune_nih.fractions=[1.0]",
                                        "protocols.benchx_finetune_nih.seeds=[42]"])
    suite["datasets"] = {"nih": suite["datasets"]["nih"]}
    suite["methods"] = {"random_init": {"method": "clip", "pretrain": False}}
    df = pd.read_csv(run_suite(suite, "cpu"))
    assert set(df["protocol"]) == {"benchx_finetune_nih"}
    assert df["comparability"].str.contains('"fidelity": "deviates').all()  # max_epochs=1 etc. are recorded
    md = paper_table(df)
    rows = [ln for ln in md.splitlines() if ln.startswith("| random_init | nih |")]
    assert rows and all("no citable source available offline" in ln and "no paper number" in ln for ln in rows)
    assert not any(r.get("protocol_variant", "").startswith("benchx") and r["values"] for r in paper_numbers())


# ----------------------------------------------------------------------------- GTGM captions
def test_located_captions_pick_the_nearest_to_the_crop_origin_with_the_name_prefix(tmp_path) -> None:
    """GTGM data_provider_pretraining_caption_match.py L290-305: the caption whose location is nearest
    (squared Euclidean) to the crop origin, as "<name>, <description>"."""
    from medvlp.datamodules.volume.captions import CaptionError, CaptionFile

    f = tmp_path / "caps.csv"
    f.write_text('id,location,caption\nvol1.nii.gz,"[0, 0, 0]",top left\nvol1.nii.gz,"[10, 200, 200]",bottom right\n'
                 'vol2.nii.gz,"[5, 5, 5]",only one\n')
    src = CaptionFile(str(f), location_column="location", prefix_name=True)
    assert src({"meta": {"id": "vol1.nii.gz", "crop_origin": [8, 150, 190]}}) == "vol1, bottom right"
    assert src({"meta": {"id": "vol1.nii.gz", "crop_origin": [1, 20, 0]}}) == "vol1, top left"
    assert src({"meta": {"id": "vol2", "crop_origin": [0, 0, 0]}}) == "vol2, only one"
    with pytest.raises(CaptionError, match="crop_origin"):
        src({"meta": {"id": "vol1"}})
    assert CaptionFile(str(tmp_path / "caps.csv"), location_column="location")(
        {"meta": {"id": "vol2", "crop_origin": [0, 0, 0]}}) == "only one"


# ----------------------------------------------------------------------------- GTGM views and batch
def test_gtgm_official_views_share_one_sub_volume_and_differ_by_perturbation() -> None:
    from medvlp.methods.gtgm import PERTURBATIONS, official_view, official_views

    torch.manual_seed(0)
    x = torch.rand(2, 1, 4, 24, 24)
    v1, v2 = official_views(x, padding=4, generator=torch.Generator().manual_seed(1))
    assert v1.shape == v2.shape == (2, 1, 4, 16, 16)
    assert all(float(v.min()) == pytest.approx(0.0) and float(v.max()) == pytest.approx(1.0) for v in (*v1, *v2))
    seen = {official_view(x[0], 4, torch.Generator().manual_seed(s))[1] for s in range(60)}
    assert seen == set(PERTURBATIONS)  # one perturbation per view, chosen among the five
    import itertools

    checked = 0
    for seed in range(30):  # a "flip" view is the centre crop of the shared sub-volume under simple_augment's bits
        view, kind = official_view(x[0], 4, torch.Generator().manual_seed(seed))
        if kind != "flip":
            continue
        c = x[0][..., 4:20, 4:20]
        c = (c - c.min()) / (c.max() - c.min())
        combos = []
        for fz, fy, fx, tr in itertools.product([0, 1], repeat=4):
            y = c.flip(1) if fz else c
            y = y.flip(-2) if fy else y
            y = y.flip(-1) if fx else y
            combos.append(y.transpose(-1, -2) if tr else y)
        assert any(torch.allclose(view, y) for y in combos)
        checked += 1
    assert checked


def test_gtgm_joint_batch_size_keeps_the_official_per_gpu_batch() -> None:
    model, _ = build_tiny("gtgm")
    model.joint_batch_size = 2
    seen = []
    model._view_features = lambda x: (seen.append(len(x)), (torch.zeros(len(x), 4), torch.zeros(len(x), 4)))[1]
    model._objective = lambda f1, f2, caps: {"n": len(f1), "caps": caps}
    batches = {m: {"image": torch.zeros(2, 1, 4, 8, 8), "caption": [f"{m}{i}" for i in range(2)]} for m in ("ct", "mri", "em")}
    out = model.compute_multimodal_losses(batches)
    assert out["n"] == 2 and len(out["caps"]) == 2 and sum(seen) == 2  # 2 of the 6 samples, not 2 per modality


# ----------------------------------------------------------------------------- UniMedI [CLS] term
def test_unimedi_cls_distill_is_an_option_off_by_default() -> None:
    torch.manual_seed(0)
    model, dm = build_tiny("unimedi")
    assert not model.cls_distill and "cls_center" not in model.state_dict()
    loader = dm.train_dataloader()
    iter(loader)  # a CombinedLoader needs iter() before it yields
    batch = next(iter(loader))
    batch = batch[0] if isinstance(batch, tuple) else batch  # CombinedLoader: (batches, batch_idx, dataloader_idx)
    multimodal = "image" not in batch
    terms = model.train().compute_multimodal_losses(batch) if multimodal else model.train().compute_losses(batch)
    assert not any(k.endswith("cls_distill_loss") for k in terms)
    model.cls_distill = True
    model.register_buffer("cls_center", torch.zeros_like(model.center))
    terms = model.compute_multimodal_losses(batch) if multimodal else model.compute_losses(batch)
    cls_terms = [v for k, v in terms.items() if k.endswith("cls_distill_loss")]
    assert cls_terms and all(torch.isfinite(v) and v > 0 for v in cls_terms)
    assert float(model.cls_center.abs().sum()) > 0  # its own running center moved


# ----------------------------------------------------------------------------- BenchX per-dataset configs
def test_benchx_finetune_reads_the_datasets_config(tiny_xray, tmp_path) -> None:
    """RSNA/mgca_vit.yml @ b874fa6: SGD 1e-2 (encoder ×0.1), batch 32, 2-way one-hot cross-entropy,
    early stop on multiclass F1; COVIDx/mgca_vit.yml: Adam 5e-4."""
    from medvlp.benchmarks.reference.benchx import BenchXFinetune, benchx_config
    from medvlp.datamodules.xray.chest import RSNAPneumoniaDataModule
    from tests.fixtures import make_rsna

    assert benchx_config("covidx", "mgca_vit")["optimizer"] == "adam" and benchx_config("covidx", "mgca_vit")["lr"] == 5e-4
    assert benchx_config("nih", "mrm")["lr"] == 0.03 and benchx_config("siim", "mgca_vit")["batch_size"] == 128
    model, _ = tiny_xray
    dm = RSNAPneumoniaDataModule(str(make_rsna(tmp_path / "rsna", n=40)), image_size=32, batch_size=8)
    trainer, parts = BenchXFinetune().build(_ctx(model, dm, tmp_path, crop=24, fraction_source="hash"), 1.0, 0)
    p = trainer.info["params"]
    assert (p["optimizer"], p["lr"], p["backbone_lr_mult"], p["batch_size"]) == ("sgd", 0.01, 0.1, 32)
    assert trainer.monitor == "val_f1" and parts["head"].fc.out_features == 2
    batch = next(iter(dm.eval_dataloader("train", 4)))
    logits = parts["head"](torch.randn(len(batch["labels"]), parts["head"].fc.in_features))
    y = batch["labels"].float()
    want = torch.nn.functional.cross_entropy(logits, y[:, 0].long())  # one-hot [1 − y, y] → class index y
    assert float(parts["loss_of"](logits, y)) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(KeyError, match="no BenchX classification config"):
        BenchXFinetune().build(_ctx(model, dm, tmp_path, crop=24, benchx_dataset="tbx11k"), 1.0, 0)
