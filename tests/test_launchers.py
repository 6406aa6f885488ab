"""Launchers without a cluster: the SLURM jobs a suite plans (dry run), the launcher keys, and the generated
``examples/slurm_2x8.sbatch`` (it must equal what the code prints today)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from medvlp.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
#: the command that generates examples/slurm_2x8.sbatch (job 0 of its dry run)
EXAMPLE_ARGS = ["benchmark", "suite=smoke", "output=results/smoke", "launcher=slurm", "launcher.nodes=2",
                "launcher.gpus_per_node=8", "launcher.cpus_per_task=8", "launcher.time=24:00:00",
                "launcher.python=python", "only=clip", "dry_run=true"]


def dry_run_jobs(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``"<arm> <stage>" → script`` from a dry run's output."""
    assert main(args) == 0
    out = capsys.readouterr().out
    parts = re.split(r"^# --- job \d+: (\S+ \w+).*$\n", out, flags=re.M)
    return {parts[i]: parts[i + 1].rstrip("\n") + "\n" for i in range(1, len(parts), 2)}


def test_example_sbatch_is_the_generated_pretraining_job(capsys: pytest.CaptureFixture[str]) -> None:
    jobs = dry_run_jobs(EXAMPLE_ARGS, capsys)
    assert list(jobs) == ["clip pretrain", "clip evaluate"]
    assert (ROOT / "examples" / "slurm_2x8.sbatch").read_text() == jobs["clip pretrain"], \
        "examples/slurm_2x8.sbatch drifted: regenerate it with tests/test_launchers.py EXAMPLE_ARGS"
    script = jobs["clip pretrain"]
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gres=gpu:8", "--time=24:00:00", "--signal=USR1@90",
                 "--requeue", "--open-mode=append"):
        assert f"#SBATCH {line}\n" in script
    assert "srun python -m medvlp.cli benchmark suite=results/smoke/slurm/suite.yaml only=clip stage=pretrain " \
           "requeue=true" in script
    ev = jobs["clip evaluate"]
    assert "#SBATCH --gres=gpu:1" in ev and "--signal" not in ev and "only=clip stage=all" in ev


def test_dry_run_plans_every_arm_and_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = dry_run_jobs(["benchmark", "suite=smoke", f"output={tmp_path}", "launcher=slurm", "pretrain_seeds=[0,1]",
                         "launcher.partition=gpu", "launcher.account=lab", "launcher.qos=high",
                         "launcher.sbatch=[--constraint=a100]", "dry_run=true"], capsys)
    assert list(jobs) == ["random_init@0 evaluate", "random_init@1 evaluate", "clip@0 pretrain", "clip@0 evaluate",
                          "clip@1 pretrain", "clip@1 evaluate"]
    for script in jobs.values():
        for line in ("--partition=gpu", "--account=lab", "--qos=high", "--constraint=a100", "--cpus-per-task=1"):
            assert f"#SBATCH {line}\n" in script
    assert not (tmp_path / "slurm").exists()


def test_launcher_keys_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["benchmark", "suite=smoke", f"output={tmp_path}", "launcher=slurm", "launcher.gpu_per_node=2",
                 "dry_run=true"]) == 2
    assert "launcher.gpu_per_node: unknown key (did you mean gpus_per_node?)" in capsys.readouterr().err
    assert main(["benchmark", "suite=smoke", f"output={tmp_path}", "launcher=pbs"]) == 2
    assert "launcher='pbs': unknown" in capsys.readouterr().err
    assert main(["benchmark", "suite=smoke", f"output={tmp_path}", "only=nope", "launcher=slurm", "dry_run=true"]) == 2
    assert "only=['nope']: not arms of suite 'smoke' (arms: random_init, clip)" in capsys.readouterr().err
