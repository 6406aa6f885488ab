"""UniMedI's ``modalities`` ablation (paper Table 4) is evaluable across modalities: a 2D-only arm keeps a
3D-capable encoder, a 3D-only arm trains on a CT-only datamodule, and every arm gets CT and X-ray rows."""
from __future__ import annotations

import pandas as pd
import torch

XRAY = {"name": "phantom", "init_args": {"modality": "xray", "num_train": 8, "num_val": 4, "num_test": 12,
                                         "image_size": 32, "batch_size": 4}}
CT = {"name": "phantom", "init_args": {"modality": "ct", "num_train": 8, "num_val": 4, "num_test": 12,
                                       "volume_size": [16, 32, 32], "batch_size": 4}}
# a single-modality arm gets the other modality's input size, so the three arms share one architecture
SIZES = {"image_encoder": {"img_size_2d": 32, "img_size_3d": [16, 32, 32]}}


def test_modalities_arms_train_on_their_data_and_are_evaluated_on_ct_and_xray(tmp_path) -> None:
    from medvlp.benchmarks.suite.runner import run_suite
    from medvlp.method import load_method

    suite = {
        "name": "unimedi_modalities", "output": str(tmp_path / "out"), "preset": "tiny",
        "pretrain": {"trainer": {"max_steps": 2, "enable_progress_bar": False}},
        "methods": {
            "unimedi_2d": {"method": "unimedi", "init_args": {"modalities": "2d", **SIZES}, "data": XRAY},
            "unimedi_3d": {"method": "unimedi", "init_args": {"modalities": "3d", **SIZES}, "data": CT},
            "unimedi_joint": {"method": "unimedi", "data": {"name": "mixed", "init_args": {
                "batch_size": 4, "datamodules": {"xray": XRAY, "ct": CT}}}},
        },
        "datasets": {"phantom_ct": CT, "phantom_xray": XRAY},
        "protocols": {"zero_shot": {}, "linear_probe": {"fractions": [1.0], "seeds": [0]}},
    }
    df = pd.read_csv(run_suite(suite, "cpu"))
    arms = {"unimedi_2d", "unimedi_3d", "unimedi_joint"}
    for ds in ("phantom_ct", "phantom_xray"):
        rows = df[df.dataset == ds]
        assert set(rows["label"]) == arms, (ds, sorted(set(rows["label"])))
        assert set(zip(rows["label"], rows["protocol"])) == {(a, p) for a in arms for p in ("zero_shot", "linear_probe")}
    assert df["value"].notna().all()
    shapes = {}
    for arm in arms:
        model = load_method(str(tmp_path / "out" / "runs" / arm / "checkpoints" / "last.ckpt"))
        assert model.modalities == arm.split("_")[1] and model.image_encoder.spatial_dims == (2, 3)
        shapes[arm] = {k: tuple(v.shape) for k, v in model.image_encoder.state_dict().items()}
    assert shapes["unimedi_2d"] == shapes["unimedi_3d"] == shapes["unimedi_joint"]


def test_3d_arm_trains_on_a_ct_only_datamodule() -> None:
    """modalities=3d on phantom CT alone (no mixed datamodule): single-modality batches, CT terms only."""
    from medvlp.testing import build_tiny, first_batch

    method, dm = build_tiny("unimedi", "method.init_args.modalities=3d", "data=phantom", "data.init_args.modality=ct")
    assert dm.spatial_dims == 3 and method.image_encoder.spatial_dims == (2, 3)
    terms = method._losses(first_batch(dm))
    assert {"itc_loss", "pseudo_itc_loss", "distill_loss"} <= set(terms)
    assert all(torch.isfinite(v) for k, v in terms.items() if k.endswith("_loss"))
