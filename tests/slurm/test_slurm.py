"""A suite, multi-task pretraining and preemption on a real SLURM (single node, CPU, gloo; ``make test-slurm``).

- a 2-method x 2-seed phantom suite with ``launcher=slurm`` (pretraining jobs, then evaluation jobs that depend
  on them, all through slurmctld) gives the rows and values of ``launcher=local``; a rerun submits nothing, and
  after an arm's results are lost only that arm's evaluation is submitted again;
- ``sbatch --ntasks-per-node=2`` + ``srun medvlp pretrain ... trainer.devices=2`` trains with DDP on gloo and
  both ranks end with equal parameters;
- a pretraining job signalled with ``scancel --signal=USR1`` mid-run checkpoints, is requeued
  (``scontrol show job``: Restarts=1), resumes, and logs every step exactly once up to the uninterrupted run's
  step count, with the uninterrupted run's losses up to the checkpoint (not after it: the resumed loader's
  batch order differs) and the same result rows.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
KEY = ["label", "pretrain_seed", "dataset", "protocol", "fraction", "subset_seed", "seed", "metric"]
PHANTOM = {"name": "phantom", "init_args": {"modality": "xray", "num_train": 24, "num_val": 8, "num_test": 16,
                                            "image_size": 32, "batch_size": 8}}


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", MEDVLP_LOG="INFO", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _medvlp(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medvlp.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _scontrol(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout


def _field(text: str, name: str) -> str:
    m = re.search(rf"\b{name}=(\S+)", text)
    return m.group(1) if m else ""


def _evidence(name: str, text: str) -> None:
    """Keep what a run printed (``MEDVLP_SLURM_EVIDENCE=DIR``) for the record."""
    folder = os.environ.get("MEDVLP_SLURM_EVIDENCE")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_text(text)


def _jobs(out: Path) -> list[dict]:
    return json.loads((out / "slurm" / "jobs.json").read_text())


def _write_suite(path: Path, suite: dict) -> Path:
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _compare(a: pd.DataFrame, b: pd.DataFrame) -> None:
    for df in (a, b):
        assert not df.duplicated(KEY).any()
    m = a.merge(b, on=KEY, suffixes=("_a", "_b"))
    assert len(m) == len(a) == len(b), (len(m), len(a), len(b))
    assert np.allclose(m["value_a"], m["value_b"], rtol=1e-5, atol=1e-6, equal_nan=True), \
        m.loc[~np.isclose(m["value_a"], m["value_b"], rtol=1e-5, atol=1e-6), KEY + ["value_a", "value_b"]]


# ------------------------------------------------------------------------------------------- suite on SLURM
def test_suite_on_slurm_equals_local_and_reruns_only_what_is_missing(slurm_cluster: Path, tmp_path: Path) -> None:
    suite = _write_suite(tmp_path / "suite.yaml", {
        "name": "slurm_smoke", "preset": "tiny", "pretrain_seeds": [0, 1],
        # augment: the phantom's MONAI intensity transforms draw from an unseeded RandomState, so pretraining
        # with them differs between any two processes (local or SLURM); without them it is reproducible
        "pretrain": {"trainer": {"max_steps": 2, "enable_progress_bar": False},
                     "data": {"init_args": {"augment": False}}},
        "methods": {"random_init": {"method": "clip", "pretrain": False}, "clip": {"method": "clip"}},
        "datasets": {"phantom_xray": PHANTOM},
        "protocols": {"zero_shot": {}, "retrieval": {}, "linear_probe": {"fractions": [0.5, 1.0], "seeds": [0, 1]}},
        "launcher": {"name": "slurm", "cpus_per_task": 1, "time": "00:20:00"},
    })
    slurm_out, local_out = tmp_path / "slurm", tmp_path / "local"
    t0 = time.time()
    local = subprocess.Popen([sys.executable, "-m", "medvlp.cli", "benchmark", f"suite={suite}", f"output={local_out}",
                              "launcher=local"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    sub = _medvlp("benchmark", f"suite={suite}", f"output={slurm_out}", "wait=true", cwd=tmp_path)
    _, local_err = local.communicate(timeout=900)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    assert local.returncode == 0, local_err[-3000:]
    submitted = re.findall(r"submitted (\d+): (\S+) (\w+)(?: \(afterok:(\S+)\))?", sub.stdout)
    arms = {"random_init@0", "random_init@1", "clip@0", "clip@1"}
    assert {(a, s) for _, a, s, _ in submitted} == {(a, "evaluate") for a in arms} | {("clip@0", "pretrain"),
                                                                                   ("clip@1", "pretrain")}
    ids = {(a, s): j for j, a, s, _ in submitted}
    for arm in ("clip@0", "clip@1"):  # evaluation waits for its pretraining (afterok)
        dep = next(d for j, a, s, d in submitted if a == arm and s == "evaluate")
        assert dep == ids[(arm, "pretrain")]
    shows = {j: _scontrol(j) for j, _, _, _ in submitted}
    _evidence("suite_scontrol.txt", "\n".join(shows.values()))
    for j, text in shows.items():
        assert _field(text, "JobState") == "COMPLETED", text
        assert _field(text, "BatchFlag") == "1" and _field(text, "NumCPUs") == "1"
    _compare(pd.read_csv(slurm_out / "results.csv"), pd.read_csv(local_out / "results.csv"))
    print(f"suite: 6 jobs through slurmctld + local reference in {time.time() - t0:.0f}s")

    status = _medvlp("status", f"out={slurm_out}", cwd=tmp_path, timeout=300)
    _evidence("suite_status.txt", status.stdout)
    assert status.returncode == 0, status.stdout + status.stderr
    lines = [ln for ln in status.stdout.splitlines()[1:] if ln.strip()]
    assert len(lines) == 6 and all(" done " in ln for ln in lines), status.stdout

    again = _medvlp("benchmark", f"suite={suite}", f"output={slurm_out}", "wait=true", cwd=tmp_path)
    assert again.returncode == 0 and not re.search(r"submitted \d+", again.stdout), again.stdout + again.stderr
    assert again.stdout.count("done (results exist), not submitted") == 4

    # an arm whose results were lost (a failed evaluation): only its evaluation is submitted again
    before = pd.read_csv(slurm_out / "results.csv")
    lost = [p for p in (slurm_out / "units").glob("*.json")
            if json.loads(p.read_text())["key"]["label"] == "clip" and json.loads(p.read_text())["key"]["pretrain_seed"] == "1"]
    assert lost
    for p in lost[: len(lost) // 2]:
        p.unlink()
    third = _medvlp("benchmark", f"suite={suite}", f"output={slurm_out}", "wait=true", cwd=tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    assert re.findall(r"submitted \d+: (\S+ \w+)", third.stdout) == ["clip@1 evaluate"], third.stdout
    _compare(pd.read_csv(slurm_out / "results.csv"), before)


# ------------------------------------------------------------------------------------------- srun DDP
def test_two_task_srun_ddp_pretraining_keeps_ranks_equal(slurm_cluster: Path, tmp_path: Path) -> None:
    dump = tmp_path / "ranks"
    cfg = _write_suite(tmp_path / "ddp.yaml", {"trainer": {"callbacks": [
        {"class_path": "tests.slurm.rank_dump.DumpRankState", "init_args": {"out": str(dump)}}]}})
    script = tmp_path / "ddp.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=medvlp-ddp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --output={tmp_path}/ddp-%j.out
set -euo pipefail
export OMP_NUM_THREADS=1
srun {sys.executable} -m medvlp.cli pretrain method=clip preset=tiny -c {cfg} trainer.devices=2 trainer.num_nodes=1 \\
  trainer.accelerator=cpu trainer.strategy=ddp trainer.max_steps=3 trainer.enable_progress_bar=false \\
  run.dir={tmp_path}/run
""")
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=_env(),
                         cwd=tmp_path, check=True).stdout.strip()
    for _ in range(1800):
        if _field(_scontrol(job), "JobState") not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            break
        time.sleep(0.5)
    show = _scontrol(job)
    _evidence("ddp_scontrol.txt", show)
    log = (tmp_path / f"ddp-{job}.out").read_text()
    assert _field(show, "JobState") == "COMPLETED", show + log[-3000:]
    assert _field(show, "NumTasks") == "2"
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["procid"] for r in ranks] == ["0", "1"] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["env"] == "SLURMEnvironment" for r in ranks)  # Lightning took ranks from srun
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 3
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    bn = ("running_mean", "running_var", "num_batches_tracked")  # per rank under DDP by design
    assert s0.keys() == s1.keys()
    differ = [k for k in s0 if not k.endswith(bn) and not torch.equal(s0[k], s1[k])]
    assert not differ, differ[:5]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


# ------------------------------------------------------------------------------------------- preemption
def _losses(run: Path) -> pd.Series:
    """Per-step training loss logged across every version (a requeued run logs into a new one)."""
    frames = [pd.read_csv(f) for f in sorted((run / "logs").glob("version_*/metrics.csv"))]
    df = pd.concat(frames, ignore_index=True)
    col = "train/loss_step" if "train/loss_step" in df.columns else "train/loss"
    df = df.dropna(subset=[col])
    return df.set_index("step")[col]


def test_preempted_pretraining_is_requeued_and_resumes_without_lost_or_repeated_steps(slurm_cluster: Path,
                                                                                   tmp_path: Path) -> None:
    steps = 300
    suite = _write_suite(tmp_path / "suite.yaml", {
        "name": "preempt", "preset": "tiny",
        "pretrain": {"trainer": {"max_steps": steps, "enable_progress_bar": False, "log_every_n_steps": 1,
                                 "limit_val_batches": 0},
                     "run": {"checkpoint_every_n_steps": 10},
                     "data": {"init_args": {"num_train": 16, "batch_size": 16, "augment": False}}},
        "methods": {"clip": {"method": "clip"}},
        "datasets": {"phantom_xray": PHANTOM},
        "protocols": {"zero_shot": {}, "linear_probe": {"fractions": [1.0], "seeds": [0]}},
        "launcher": {"name": "slurm", "time": "00:30:00", "signal_seconds": 60},
    })
    out, ref = tmp_path / "slurm", tmp_path / "local"
    sub = _medvlp("benchmark", f"suite={suite}", f"output={out}", cwd=tmp_path)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    jobs = {r["stage"]: r["job_id"] for r in _jobs(out)}
    script = (out / "slurm" / "medvlp-preempt-clip-pretrain.sbatch").read_text()
    assert "#SBATCH --signal=USR1@60" in script and "#SBATCH --requeue" in script
    last = out / "runs" / "clip" / "checkpoints" / "last.ckpt"
    for _ in range(1200):  # mid-run: the first periodic checkpoint exists
        if last.is_file():
            break
        time.sleep(0.25)
    assert last.is_file(), _scontrol(jobs["pretrain"])
    subprocess.run(["scancel", "--signal=USR1", jobs["pretrain"]], check=True)
    requeued = ""
    for _ in range(600):
        show = _scontrol(jobs["pretrain"])
        if _field(show, "Restarts") == "1":
            requeued = show
            break
        time.sleep(0.2)
    assert requeued, _scontrol(jobs["pretrain"])
    _evidence("preempt_scontrol_requeued.txt", requeued)
    reference = _medvlp("benchmark", f"suite={suite}", f"output={ref}", "launcher=local", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    from medvlp.benchmarks.suite.launch.slurm import wait_for

    states = wait_for(list(jobs.values()), timeout=1200)
    final = _scontrol(jobs["pretrain"])
    _evidence("preempt_scontrol_final.txt", final + "\n" + _scontrol(jobs["evaluate"]))
    log = next((out / "slurm" / "logs").glob(f"*pretrain-{jobs['pretrain']}.out")).read_text()
    _evidence("preempt_pretrain_log.txt", log)
    assert states == {jobs["pretrain"]: "COMPLETED", jobs["evaluate"]: "COMPLETED"}, (states, log[-3000:])
    assert _field(final, "Restarts") == "1" and _field(final, "Requeue") == "1"
    m = re.search(r"preempted: checkpoint at step (\d+)", log)
    assert m and 0 < int(m.group(1)) < steps, log[-3000:]
    assert "restart 1" in log and "Restored all states from the checkpoint" in log
    ours, theirs = _losses(out / "runs" / "clip"), _losses(ref / "runs" / "clip")
    assert not ours.index.duplicated().any()  # no step ran twice ...
    assert list(ours.index) == list(theirs.index) == list(range(steps))  # ... and none was lost
    k = int(m.group(1))
    assert np.array_equal(ours.to_numpy()[:k], theirs.to_numpy()[:k])  # the same run up to the checkpoint
    # after it, the batch order differs: on resume Lightning builds and iterates the training loader before
    # any callback can restore its shuffling generator (README "Scale"); the training continues from the
    # checkpoint's weights, so the loss stays on the uninterrupted run's level
    assert abs(ours.to_numpy()[-20:].mean() - theirs.to_numpy()[-20:].mean()) < 0.5 * theirs.to_numpy()[:k].mean()
    assert json.loads((out / "runs" / "clip" / "summary.json").read_text())["steps"] == steps
    a, b = pd.read_csv(out / "results.csv"), pd.read_csv(ref / "results.csv")
    assert sorted(map(tuple, a[KEY].astype(str).to_numpy())) == sorted(map(tuple, b[KEY].astype(str).to_numpy()))
