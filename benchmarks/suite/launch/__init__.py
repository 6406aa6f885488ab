"""Where a suite's units run: in this process (``launcher=local``, the default) or as SLURM jobs
(``launcher=slurm``). One small table, no registry: :data:`LAUNCHERS` maps a name to its class."""
from __future__ import annotations

from medvlp.benchmarks.suite.launch.local import LocalLauncher
from medvlp.benchmarks.suite.launch.slurm import SlurmLauncher

#: ``launcher=<name>`` → its class (``Launcher(options).launch(suite, device, ...)``)
LAUNCHERS = {"local": LocalLauncher, "slurm": SlurmLauncher}

__all__ = ["LAUNCHERS", "LocalLauncher", "SlurmLauncher"]
