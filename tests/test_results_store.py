"""The results store shared by many writers: one atomic file per unit, results.csv derived from them; 4
concurrent writers on overlapping units, a writer killed mid-unit, older CSVs migrated, and per-sample paths
that can never leave the output folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medvlp.benchmarks.suite.results import COLUMNS, ResultStore, unit_name

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("auc", "acc", "f1")

#: a writer process: adds units ``first..last`` (3 rows + per-sample arrays each) in a shuffled order
WRITER = textwrap.dedent("""
    import random, sys, time
    import numpy as np
    from medvlp.benchmarks.suite.results import ResultStore
    out, first, last, seed, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    units = list(range(first, last))
    random.Random(seed).shuffle(units)
    store = ResultStore(out + "/results.csv")
    for u in units:
        key = dict(label="m", dataset="d", protocol="p", params="{}", fraction=1.0, seed=u, weights="w")
        if store.done(**key):
            continue
        rows = [{**key, "metric": m, "value": u + i / 10} for i, m in enumerate(("auc", "acc", "f1"))]
        store.add(rows, {"scores": np.full(2000, u, dtype=np.float32)}, {"auc": {"fn": "auc"}})
        time.sleep(pause)
""")


def _writer(out: Path, first: int, last: int, seed: int, pause: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(first), str(last), str(seed), str(pause)],
                            env=env, stderr=subprocess.PIPE, text=True)


def _check_complete(df: pd.DataFrame) -> None:
    """Every unit visible has all its rows, once."""
    if df.empty:
        return
    per_unit = df.groupby("seed")["metric"].apply(sorted)
    assert all(m == sorted(METRICS) for m in per_unit), per_unit[per_unit.map(len) != 3]


@pytest.mark.slow  # four interpreters importing torch: ~60 s on 2 loaded cores
def test_four_concurrent_writers_on_overlapping_units_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    ranges = [(0, 30), (10, 40), (20, 50), (0, 50)]  # overlapping: units 20..29 are written by all four
    procs = [_writer(tmp_path, a, b, seed=i) for i, (a, b) in enumerate(ranges)]
    reads = 0
    while any(p.poll() is None for p in procs):  # read while they write: never a half-written unit
        if (tmp_path / "results.csv").is_file():
            _check_complete(pd.read_csv(tmp_path / "results.csv"))
            _check_complete(ResultStore(tmp_path / "results.csv").df)
            reads += 1
        time.sleep(0.1)
    for p in procs:
        assert p.returncode == 0, p.stderr.read()[-2000:]
    assert reads > 0
    df = pd.read_csv(tmp_path / "results.csv")
    assert len(df) == 50 * 3 and not df.duplicated(["seed", "metric"]).any()
    assert sorted(set(df["seed"])) == list(range(50))
    assert np.allclose(df.sort_values(["seed", "metric"])["value"],
                       [u + i / 10 for u in range(50) for i in (1, 0, 2)])  # acc, auc, f1 order
    assert len(list((tmp_path / "units").glob("*.json"))) == 50
    assert not list((tmp_path / "units").glob(".*.tmp")) and not list((tmp_path / "samples").glob(".*.tmp"))
    store = ResultStore(tmp_path / "results.csv")
    arrays, recipes = store.load_samples(df["samples"].iloc[0])
    assert arrays["scores"].shape == (2000,) and recipes == {"auc": {"fn": "auc"}}


@pytest.mark.slow
def test_writer_killed_mid_unit_leaves_no_partial_unit_and_a_rerun_completes(tmp_path: Path) -> None:
    for kill_after in (0.4, 0.7, 1.0):
        proc = _writer(tmp_path, 0, 400, seed=1)
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = ResultStore(tmp_path / "results.csv")
        _check_complete(store.df)  # temp files of the unit in progress are ignored
        for name in (tmp_path / "units").glob("*.json"):
            json.loads(name.read_text())  # every visible unit file is complete JSON
    before = len(ResultStore(tmp_path / "results.csv").df)
    rerun = _writer(tmp_path, 0, 400, seed=2)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()[-2000:]
    df = pd.read_csv(tmp_path / "results.csv")
    assert before < len(df) == 400 * 3 and not df.duplicated(["seed", "metric"]).any()


def test_csv_is_derived_from_unit_files_and_rereads_other_writers(tmp_path: Path) -> None:
    a, b = ResultStore(tmp_path / "results.csv"), ResultStore(tmp_path / "results.csv")
    unit = dict(label="m", dataset="d", protocol="p", params="{}", fraction=0.5, seed=0)
    a.add([{**unit, "metric": "auc", "value": 0.7}])
    assert b.done(**unit)  # another process's unit is seen without reopening
    b.add([{**unit, "seed": 1, "metric": "auc", "value": 0.8}])
    assert sorted(pd.read_csv(tmp_path / "results.csv")["seed"]) == [0, 1]
    assert sorted(a.refresh()["seed"].astype(int)) == [0, 1]
    assert (tmp_path / "units" / f"{unit_name(unit)}.json").is_file()


def test_older_results_csv_is_migrated_into_unit_files(tmp_path: Path) -> None:
    rows = [dict(label="m", dataset="d", protocol="p", params="{}", fraction=1.0, seed=s, metric=m, value=s + 0.5,
                 weights="w", suite="s", method="clip", checkpoint="c", dataset_version="1", split_hash="h",
                 definition="d", config_hash="c", timestamp="t") for s in (0, 1) for m in ("auc", "acc")]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)  # a file from before the unit files
    store = ResultStore(tmp_path / "results.csv")
    assert len(store.df) == 4 and list(store.df.columns) == COLUMNS
    assert len(list((tmp_path / "units").glob("*.json"))) == 2
    assert store.done(label="m", dataset="d", protocol="p", params="{}", fraction=1.0, seed=1, weights="w",
                      config_hash="c", dataset_version="1", subset_seed=1)


@pytest.mark.parametrize("cell", ["absolute", "../../victim.txt"])
def test_stale_rows_never_delete_a_file_outside_the_output_folder(tmp_path: Path, cell: str) -> None:
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    victim = out.parent.parent / "victim.txt"  # what ../../victim.txt names from the output folder
    victim.write_text("keep me")
    samples = str(victim) if cell == "absolute" else cell
    row = dict(label="m", dataset="d", protocol="p", params="{}", fraction=1.0, seed=0, metric="auc", value=0.5,
               weights="old", suite="s", method="clip", checkpoint="c", dataset_version="1", split_hash="h",
               definition="d", config_hash="c", timestamp="t", samples=samples)
    pd.DataFrame([row]).to_csv(out / "results.csv", index=False)
    store = ResultStore(out / "results.csv")
    assert store.drop_stale({"weights": "new"}, label="m", dataset="d") == 1  # the row is stale ...
    assert victim.read_text() == "keep me"  # ... and the file its samples cell named survives
    with pytest.raises(ValueError, match="outside the output folder"):
        store.load_samples(samples)


@pytest.mark.slow  # five `medvlp benchmark` processes: ~1-2 min on 2 loaded cores
def test_four_concurrent_benchmarks_on_overlapping_suites_share_one_output_folder(tmp_path: Path) -> None:
    import yaml

    base = yaml.safe_load((ROOT / "benchmarks" / "suites" / "smoke.yaml").read_text())
    base["methods"] = {"random_init": {"method": "clip", "pretrain": False}}
    protocols = base["protocols"]
    subsets = [["zero_shot", "retrieval"], ["retrieval", "linear_probe"], ["linear_probe", "zero_shot"], list(protocols)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = []
    for i, keys in enumerate(subsets):
        suite = tmp_path / f"suite{i}.yaml"
        suite.write_text(yaml.safe_dump({**base, "protocols": {k: protocols[k] for k in keys}}))
        procs.append(subprocess.Popen([sys.executable, "-m", "medvlp.cli", "benchmark", f"suite={suite}",
                                       f"output={tmp_path / 'shared'}"], env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stderr.read()[-3000:]
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(base))
    ref = subprocess.run([sys.executable, "-m", "medvlp.cli", "benchmark", f"suite={tmp_path / 'ref.yaml'}",
                          f"output={tmp_path / 'ref'}"], env=env, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    key = ["label", "dataset", "protocol", "fraction", "subset_seed", "seed", "metric"]
    shared, single = pd.read_csv(tmp_path / "shared" / "results.csv"), pd.read_csv(tmp_path / "ref" / "results.csv")
    assert not shared.duplicated(key).any()
    merged = shared.merge(single, on=key, suffixes=("_a", "_b"))
    assert len(merged) == len(shared) == len(single)  # no row lost, none duplicated
    assert np.allclose(merged["value_a"], merged["value_b"], rtol=1e-5, atol=1e-6)
