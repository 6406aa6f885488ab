"""``launcher=slurm``: a suite's arms as SLURM jobs (``sbatch``), and the state of those jobs (``medvlp status``).

Each arm that pretrains is one job (``stage=pretrain``: nodes × tasks per node, GPUs, ``--signal=USR1@<s>``,
``--requeue``); its evaluation is one job that depends on it (``afterok``) and runs every evaluation unit of
the arm that has no results. Arms whose evaluation finished for the current plan are not submitted, nor is a
finished pretraining, nor a job of this folder that is still pending or running (a later job depends on it
instead): running again after a failure submits only what is missing. Every job runs
``<python> -m medvlp.cli benchmark suite=<output>/slurm/suite.yaml only=<arm> stage=...`` under ``srun``, on
the suite as it was loaded (overrides applied), written beside the results. ``dry_run=true`` prints the
scripts instead (``examples/slurm_2x8.sbatch`` is such a print).

Job states come from ``squeue``/``scontrol`` (no accounting database is needed) and, once SLURM has forgotten
a job, from the results store: a finished arm is ``done``; otherwise it is ``failed``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from medvlp.benchmarks.suite.results import ResultStore
from medvlp.benchmarks.suite.runner import (
    Arm, UNSAFE_RESUME_KEY, arm_done, plan_arms, pretraining_finished)
from medvlp.benchmarks.suite.schema import check_suite
from medvlp.paths import sanitize
from medvlp.io import atomic_write_text
from medvlp.validate import did_you_mean
from medvlp.benchmarks.suite.schema import load_suite
import yaml

log = logging.getLogger(__name__)

#: the ``launcher:`` keys of ``launcher=slurm`` → (default, help); ``eval`` overrides them for evaluation jobs
KEYS: dict[str, tuple[Any, str]] = {
    "name": ("slurm", "the launcher (slurm)"),
    "nodes": (1, "nodes per pretraining job (trainer.num_nodes)"),
    "gpus_per_node": (0, "GPUs per node (--gres=gpu:N; trainer.devices, one task per GPU)"),
    "tasks_per_node": (None, "tasks per node without GPUs (CPU DDP: trainer.devices); default gpus_per_node or 1"),
    "cpus_per_task": (1, "--cpus-per-task (also OMP_NUM_THREADS)"),
    "mem": (None, "--mem (e.g. 64G)"),
    "time": (None, "--time: D-HH:MM:SS or HH:MM:SS (YAML reads an unquoted 24:00:00 as seconds: also accepted)"),
    "partition": (None, "--partition"),
    "account": (None, "--account"),
    "qos": (None, "--qos"),
    "signal_seconds": (90, "pretraining jobs get SIGUSR1 this many seconds before --time: checkpoint and requeue"),
    "sbatch": ([], "extra #SBATCH lines (e.g. ['--constraint=a100'])"),
    "setup": ([], "shell lines run before srun (e.g. ['module load cuda'])"),
    "python": (None, "the interpreter jobs run (default: this one)"),
    "eval": ({}, "keys for evaluation jobs (default: nodes 1, gpus_per_node min(1, gpus), tasks 1)"),
}
JOBS_FILE = "jobs.json"
#: squeue/scontrol states of a job SLURM still runs or will run
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "SIGNALING",
          "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT")


def options(block: Mapping[str, Any] | None) -> dict[str, Any]:
    """The launcher block with defaults filled in.

    Raises:
        ValueError: an unknown key (with the nearest key), also inside ``eval``.
    """
    block = dict(block or {})
    for where, keys in (("launcher", block), ("launcher.eval", block.get("eval") or {})):
        for k in keys:
            if k not in KEYS or (where == "launcher.eval" and k in ("eval", "name")):
                raise ValueError(f"{where}.{k}: unknown key{did_you_mean(k, KEYS)} (keys: {', '.join(KEYS)})")
    out = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, (v, _) in KEYS.items()}
    out.update(block)
    for k in ("sbatch", "setup"):
        if isinstance(out[k], str):
            out[k] = [out[k]]
    out["time"] = slurm_time(out["time"])
    return out


def slurm_time(value: Any) -> str | None:
    """``--time`` text: strings as given; a number is seconds (what YAML 1.1 makes of an unquoted ``24:00:00``),
    written ``H:MM:SS``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"launcher.time={value!r}: expected D-HH:MM:SS or HH:MM:SS")
    seconds = int(value)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def tasks_per_node(opts: Mapping[str, Any]) -> int:
    """One task per GPU, or ``tasks_per_node`` (CPU), or 1."""
    return int(opts.get("tasks_per_node") or opts.get("gpus_per_node") or 1)


def eval_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation jobs' options: one task on one node (one GPU where the pretraining has GPUs), then the
    ``eval`` block."""
    out = {**opts, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": min(1, int(opts.get("gpus_per_node") or 0))}
    out.update(opts.get("eval") or {})
    return out


def with_devices(suite: Mapping[str, Any], opts: Mapping[str, Any]) -> dict[str, Any]:
    """The suite with each method entry's ``trainer.devices/num_nodes/accelerator/strategy`` set from the
    launcher's nodes and tasks, when they ask for more than one process or for GPUs (else unchanged, so the
    config hashes equal ``launcher=local``'s)."""
    suite = json.loads(json.dumps(suite))
    gpus, nodes, tasks = int(opts.get("gpus_per_node") or 0), int(opts.get("nodes") or 1), tasks_per_node(opts)
    if not gpus and nodes == 1 and tasks == 1:
        return suite
    for label, entry in suite["methods"].items():
        entry = suite["methods"][label] = dict(entry or {})
        if entry.get("ckpt") or entry.get("pretrain", True) is False:
            continue
        trainer = dict(entry.get("trainer") or {})
        trainer.update(devices=tasks, num_nodes=nodes, accelerator="gpu" if gpus else "cpu")
        if tasks * nodes > 1:
            trainer.setdefault("strategy", "ddp")
        entry["trainer"] = trainer
    return suite


@dataclass
class Job:
    """One job to submit: an arm's pretraining or evaluation."""

    arm: str
    stage: str  # "pretrain" | "evaluate"
    name: str
    script: str
    log: str
    depends_on: list[str] = field(default_factory=list)  # job ids, or "@<n>" = the n-th job of this submission
    job_id: str = ""


def _slug(text: str) -> str:
    return sanitize(text, "x")


def render_script(job_name: str, opts: Mapping[str, Any], command: Sequence[str], log_path: str,
                  requeue_signal: bool) -> str:
    """The sbatch script of one job: ``#SBATCH`` lines from ``opts``, the setup lines, then ``srun command``."""
    tasks, gpus = tasks_per_node(opts), int(opts.get("gpus_per_node") or 0)
    lines = ["#!/bin/bash", f"# {job_name}: generated by `medvlp benchmark ... launcher=slurm` (dry_run=true prints it; "
             "README \"Scale\")",
             f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={int(opts.get('nodes') or 1)}",
             f"#SBATCH --ntasks-per-node={tasks}", f"#SBATCH --cpus-per-task={int(opts.get('cpus_per_task') or 1)}"]
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    for key in ("mem", "time", "partition", "account", "qos"):
        if opts.get(key) not in (None, ""):
            lines.append(f"#SBATCH --{key}={opts[key]}")
    if requeue_signal:
        lines.append(f"#SBATCH --signal=USR1@{int(opts.get('signal_seconds') or 90)}")
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --output={log_path}"]
    lines += [f"#SBATCH {x}" for x in opts.get("sbatch") or []]
    lines += ["", "set -euo pipefail", f"export OMP_NUM_THREADS={int(opts.get('cpus_per_task') or 1)}"]
    lines += list(opts.get("setup") or [])
    lines.append('echo "medvlp job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}"')
    lines.append("srun " + " ".join(shlex.quote(c) for c in command))
    return "\n".join(lines) + "\n"


class SlurmLauncher:
    """Submit a suite's arms as SLURM jobs (see module docstring).

    Args:
        options: the ``launcher:`` block (:data:`KEYS`), from the suite and the command line.
    """

    def __init__(self, options_block: Mapping[str, Any] | None = None) -> None:
        self.opts = options(options_block)

    def plan(self, suite: Mapping[str, Any], device: str | None = None,
             only: Sequence[str] | None = None) -> tuple[dict[str, Any], list[Job], list[str]]:
        """``(frozen suite, jobs to submit, notes on what is not submitted)`` (nothing is written)."""
        suite = with_devices({k: v for k, v in suite.items() if k != "launcher"}, self.opts)
        check_suite({k: v for k, v in suite.items() if k != UNSAFE_RESUME_KEY})
        arms = plan_arms(suite, only)
        out = Path(suite["output"])
        folder = out / "slurm"
        frozen = folder / "suite.yaml"
        store = ResultStore(out / "results.csv")
        active = self._active_jobs(folder)
        python = self.opts.get("python") or sys.executable
        base = [python, "-m", "medvlp.cli", "benchmark", f"suite={frozen}"]
        if device:
            base.append(f"device={device}")
        if suite.get(UNSAFE_RESUME_KEY) is False:
            base.append("run.weights_only_resume=false")
        jobs: list[Job] = []
        notes: list[str] = []
        for arm in arms:
            if arm_done(suite, arm, store):
                notes.append(f"{arm.key}: done (results exist), not submitted")
                continue
            pre_dep: list[str] = []
            if arm.pretrains and not pretraining_finished(arm.cfg):
                running = active.get((arm.key, "pretrain"))
                if running:
                    notes.append(f"{arm.key}: pretraining job {running} is {active[('state', running)]}; not resubmitted")
                    pre_dep = [running]
                else:
                    jobs.append(self._job(suite, arm, "pretrain", base, self.opts, requeue=True))
                    pre_dep = [f"@{len(jobs) - 1}"]
            running = active.get((arm.key, "evaluate"))
            if running:
                notes.append(f"{arm.key}: evaluation job {running} is {active[('state', running)]}; not resubmitted")
                continue
            job = self._job(suite, arm, "evaluate", base, eval_options(self.opts), requeue=False)
            job.depends_on = pre_dep
            jobs.append(job)
        return suite, jobs, notes

    def _job(self, suite: Mapping[str, Any], arm: Arm, stage: str, base: list[str], opts: Mapping[str, Any],
             requeue: bool) -> Job:
        name = f"medvlp-{_slug(str(suite['name']))}-{_slug(arm.key)}-{stage}"
        log_path = str(Path(suite["output"]) / "slurm" / "logs" / f"{name}-%j.out")
        command = [*base, f"only={arm.key}", "stage=" + ("pretrain" if stage == "pretrain" else "all")]
        if requeue:
            command.append("requeue=true")
        return Job(arm.key, stage, name, render_script(name, opts, command, log_path, requeue), log_path)

    def launch(self, suite: Mapping[str, Any], device: str | None = None, only: Sequence[str] | None = None,
               wait: bool = False, dry_run: bool = False) -> Path:
        """Submit the missing jobs (print their ids); with ``wait`` return when they left the queue.

        Raises:
            RuntimeError: ``sbatch`` failed, or (with ``wait``) a job did not finish.
        """
        frozen_suite, jobs, notes = self.plan(suite, device, only)
        out = Path(frozen_suite["output"])
        for note in notes:
            print(note)
        if dry_run:
            for i, job in enumerate(jobs):
                dep = ", ".join(f"job {d[1:]}" if d.startswith("@") else d for d in job.depends_on)
                print(f"# --- job {i}: {job.arm} {job.stage}" + (f" (afterok: {dep})" if dep else ""))
                print(job.script)
            return out / "results.csv"
        folder = out / "slurm"
        atomic_write_text(folder / "suite.yaml", _yaml({k: v for k, v in frozen_suite.items() if k != UNSAFE_RESUME_KEY}))
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        for i, job in enumerate(jobs):
            deps = [jobs[int(d[1:])].job_id if d.startswith("@") else d for d in job.depends_on]
            script = folder / f"{job.name}.sbatch"
            atomic_write_text(script, job.script)
            cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{':'.join(deps)}"] if deps else []) + [str(script)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout.strip()}")
            job.job_id = proc.stdout.strip().split(";")[0]
            print(f"submitted {job.job_id}: {job.arm} {job.stage}" + (f" (afterok:{':'.join(deps)})" if deps else ""))
            self._record(folder, job)
        if wait and jobs:
            states = wait_for([j.job_id for j in jobs])
            bad = {j: s for j, s in states.items() if s != "COMPLETED"}
            ResultStore(out / "results.csv").write_table()
            if bad:
                raise RuntimeError(f"jobs did not complete: {bad} (logs in {folder / 'logs'}; medvlp status out={out})")
        return out / "results.csv"

    # ------------------------------------------------------------------ bookkeeping
    @staticmethod
    def _record(folder: Path, job: Job) -> None:
        path = folder / JOBS_FILE
        records = json.loads(path.read_text()) if path.is_file() else []
        records.append({"arm": job.arm, "stage": job.stage, "job_id": job.job_id, "name": job.name, "log": job.log,
                        "depends_on": job.depends_on, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
        atomic_write_text(path, json.dumps(records, indent=1))

    @staticmethod
    def _active_jobs(folder: Path) -> dict[Any, str]:
        """``(arm, stage) → job id`` (and ``('state', id) → state``) of this folder's jobs SLURM still runs."""
        records = latest_jobs(folder)
        states = job_states([r["job_id"] for r in records])
        out: dict[Any, str] = {}
        for r in records:
            state = states.get(r["job_id"], "")
            if state in ACTIVE:
                out[(r["arm"], r["stage"])] = r["job_id"]
                out[("state", r["job_id"])] = state
        return out


def latest_jobs(folder: Path) -> list[dict[str, Any]]:
    """The last submitted job of each (arm, stage) in ``<output>/slurm/jobs.json``."""
    path = folder / JOBS_FILE
    if not path.is_file():
        return []
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in json.loads(path.read_text()):
        latest[(r["arm"], r["stage"])] = r
    return list(latest.values())


def job_states(ids: Sequence[str]) -> dict[str, str]:
    """``job id → JobState`` from ``scontrol show job`` for the jobs SLURM still knows (no accounting needed)."""
    out: dict[str, str] = {}
    for jid in ids:
        try:
            proc = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"\bJobState=(\S+)", proc.stdout)
        if proc.returncode == 0 and m:
            out[str(jid)] = m.group(1)
    return out


def wait_for(ids: Sequence[str], poll: float = 2.0, timeout: float | None = None) -> dict[str, str]:
    """Poll ``scontrol`` until no job of ``ids`` is active; returns their final states."""
    t0 = time.time()
    while True:
        states = job_states(ids)
        if not any(states.get(j, "") in ACTIVE for j in ids):
            return {j: states.get(j, "UNKNOWN") for j in ids}
        if timeout is not None and time.time() - t0 > timeout:
            return states
        time.sleep(poll)


def last_line(path: str | Path) -> str:
    """The last non-empty line of a log file (``""`` when there is none)."""
    p = Path(path)
    if not p.is_file():
        return ""
    with open(p, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 8192))
        lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def status(out: str | Path) -> list[dict[str, str]]:
    """Every job of an output folder: arm, stage, job id, state (pending / running / done / failed, with
    SLURM's own state in brackets), the evaluation units with results, and the last log line."""
    out = Path(out)
    folder = out / "slurm"
    records = latest_jobs(folder)
    if not records:
        raise FileNotFoundError(f"{folder / JOBS_FILE}: no SLURM jobs were submitted for {out}")
    states = job_states([r["job_id"] for r in records])
    suite_file = folder / "suite.yaml"
    arms: dict[str, Arm] = {}
    suite: dict[str, Any] = {}
    if suite_file.is_file():

        suite = load_suite(str(suite_file))
        arms = {a.key: a for a in plan_arms(suite)}
    store = ResultStore(out / "results.csv")
    rows = []
    for r in records:
        state = states.get(r["job_id"], "")
        arm = arms.get(r["arm"])
        finished = arm is not None and (arm_done(suite, arm, store) if r["stage"] == "evaluate"
                                        else pretraining_finished(arm.cfg) if arm.cfg is not None else True)
        if state == "PENDING":
            simple = "pending"
        elif state in ACTIVE:
            simple = "running"
        elif finished or state == "COMPLETED":
            simple = "done"
        else:
            simple = "failed"
        n_units = ""
        if arm is not None and r["stage"] == "evaluate":
            df = store.df
            mine = (df["label"] == arm.label) & (df["pretrain_seed"].astype(str) == ("" if arm.pseed is None else str(arm.pseed)))
            n_units = str(int(mine.sum())) if len(df) else "0"
        log_file = r["log"].replace("%j", r["job_id"])
        rows.append({"arm": r["arm"], "stage": r["stage"], "job": r["job_id"],
                     "state": simple + (f" ({state})" if state else ""), "rows": n_units,
                     "last log line": last_line(log_file)})
    return rows


def _yaml(suite: Mapping[str, Any]) -> str:

    return yaml.safe_dump(json.loads(json.dumps(suite)), sort_keys=False)
