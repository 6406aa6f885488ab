"""A benchmark suite frees each evaluated model (and its cached features and maps) before the next one."""
from __future__ import annotations

import gc
import warnings

import pytest


def _live_methods() -> int:
    from medvlp.method import VLPMethod

    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated module attributes among gc's objects
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, VLPMethod))


def test_suite_keeps_at_most_two_models_alive(tmp_path, monkeypatch) -> None:
    from medvlp.benchmarks.suite import runner

    suite = runner.load_suite("smoke", [f"output={tmp_path}"])
    suite["methods"] = {"random_init": {"method": "clip", "pretrain": False}, "clip": {"method": "clip"},
                        "clip_b": {"method": "clip", "init_args": {"i2t_weight": 0.3}}}
    suite["protocols"] = {"zero_shot": {}, "linear_probe": {"fractions": [1.0], "seeds": [0]},
                          "segmentation": {"epochs": 1, "fractions": [1.0], "seeds": [0]}}
    after_eval, before_next = [], []
    evaluate, obtain = runner._evaluate_model, runner.obtain_model

    def counting_evaluate(*args, **kwargs):
        evaluate(*args, **kwargs)
        after_eval.append(_live_methods())

    def counting_obtain(*args, **kwargs):
        before_next.append(_live_methods())
        return obtain(*args, **kwargs)

    monkeypatch.setattr(runner, "_evaluate_model", counting_evaluate)
    monkeypatch.setattr(runner, "obtain_model", counting_obtain)
    baseline = _live_methods()
    runner.run_suite(suite, "cpu")
    assert len(after_eval) == 3
    assert all(n - baseline <= 2 for n in after_eval), after_eval
    assert [n - baseline for n in after_eval] == [1, 1, 1], after_eval  # only the model being evaluated
    assert [n - baseline for n in before_next] == [0, 0, 0], before_next  # the next pretrains alone


def test_release_drops_features_and_maps_and_weak_text_encoder(tmp_path) -> None:
    import weakref

    from medvlp.benchmarks.kit.features import FeatureCache, trim_heap
    from medvlp.compose import compose
    from medvlp.config import to_container
    from medvlp.datamodules.phantom.datamodule import PhantomDataModule
    from medvlp.train import build_method

    dm = PhantomDataModule(num_train=8, num_val=4, num_test=4, image_size=32, batch_size=4,
                           cache_dir=str(tmp_path / "data"))
    dm.prepare_data()
    model = build_method(to_container(compose(["method=clip", "preset=tiny"])), dm)
    cache = FeatureCache(tmp_path / "features")
    feats = cache.get(model, dm, "test")
    maps = cache.maps(model, dm, "test")
    assert len(feats.ids) == 4 and len(maps) == 4
    assert cache.release(model) == 2
    assert cache.release(model) == 0
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the cached features' lazy report encoder did not keep it
    with pytest.raises(RuntimeError, match="model was freed"):
        feats.text_embedding  # noqa: B018
    assert isinstance(trim_heap(), bool)


def test_phantom_arrays_are_memory_mapped_once_per_split(tmp_path) -> None:
    import numpy as np

    from medvlp.datamodules.phantom.datamodule import ARRAYS, PhantomDataModule

    dm = PhantomDataModule(num_train=8, num_val=4, num_test=4, image_size=32, cache_dir=str(tmp_path))
    plain, augmented = dm.build_dataset("train", augment=False), dm.build_dataset("train", augment=True)
    arrays = dm.split_arrays("train")
    assert dm.split_arrays("train") is arrays  # one mapping per split, shared by both datasets
    assert isinstance(arrays["image"], np.memmap) and not arrays["image"].flags.writeable
    assert plain[0]["image"].shape == augmented[0]["image"].shape == (1, 32, 32)
    # a folder of the earlier single-file layout is converted once, to the same arrays
    folder = arrays.folder
    want = {k: np.array(arrays[k]) for k in arrays}
    np.savez(folder / "arrays.npz", **want)
    import shutil

    shutil.rmtree(folder / ARRAYS)
    fresh = PhantomDataModule(num_train=8, num_val=4, num_test=4, image_size=32, cache_dir=str(tmp_path))
    got = fresh.split_arrays("train")
    assert (folder / ARRAYS / "image.npy").is_file() and sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)


def test_streamed_instance_voi_equals_the_voi_of_the_whole_test_prediction(tmp_path) -> None:
    import numpy as np

    from medvlp.benchmarks.kit.features import FeatureCache
    from medvlp.benchmarks.kit.protocol import EvalContext
    from medvlp.benchmarks.protocols.segmentation import InstanceVOI, instances_from_boundaries, voi
    from medvlp.compose import compose
    from medvlp.config import to_container
    from medvlp.datamodules.phantom.datamodule import PhantomDataModule
    from medvlp.train import build_method

    dm = PhantomDataModule(modality="em", num_train=6, num_val=3, num_test=5, volume_size=(8, 16, 16), batch_size=2,
                           cache_dir=str(tmp_path / "data"))
    dm.prepare_data()
    model = build_method(to_container(compose(["method=clip", "preset=tiny"])), dm)
    params = {"epochs": 1, "width": 8, "max_stages": 1, "batch_size": 2}
    ctx = EvalContext(model, dm, FeatureCache(tmp_path / "features"), params, "cpu", tmp_path)
    streamed = InstanceVOI().run(ctx, 1.0, 0)
    whole = InstanceVOI().fit_predict(ctx, 1.0, 0)  # every test volume's probabilities at once (the former way)
    instances = np.asarray(whole["instances"])
    assert isinstance(whole["instances"], np.memmap)  # the cached EM instances are memory-mapped
    terms = [voi(instances_from_boundaries(p[1].numpy()), inst[0]) for p, inst in zip(whole["prob"], instances)]
    assert streamed.values[0].value == pytest.approx(float(np.mean([s for s, _ in terms]) + np.mean([m for _, m in terms])))
    assert len(streamed.samples["voi"]) == 5
