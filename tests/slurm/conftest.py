"""The ``slurm_cluster`` fixture: a real single-node SLURM on localhost for the session (``tests/slurm/up.sh``),
stopped afterwards when this session started it (``tests/slurm/down.sh``).

If SLURM cannot start (not root, no apt, no Debian packages), the tests skip with up.sh's reason, unless
``MEDVLP_REQUIRE_SLURM=1`` (``make test-slurm`` sets it), where a start failure fails the tests.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

HERE = Path(__file__).resolve().parent


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """The state folder of the running cluster; ``SLURM_CONF`` is exported for client commands."""
    folder = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/medvlp-slurm"))
    was_up = _alive(folder / "run" / "slurmctld.pid")
    proc = subprocess.run(["bash", str(HERE / "up.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"up.sh exited {proc.returncode}"])[-1]
        if os.environ.get("MEDVLP_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM did not start: {reason}")
        pytest.skip(f"SLURM did not start: {reason}")
    print(proc.stdout.strip().splitlines()[0])
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    yield folder
    if not was_up:
        down = subprocess.run(["bash", str(HERE / "down.sh")], capture_output=True, text=True, timeout=300)
        print(down.stdout.strip(), down.stderr.strip())
