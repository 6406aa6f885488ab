"""``medvlp pretrain`` and ``medvlp config``: compose (and check) one run config, then train or print it."""
from __future__ import annotations

from medvlp.cli.args import Parsed, quick_check

NAME = "pretrain"
SUMMARY = "pretrain one method (method=M data=D preset=P; resumes from <run>/checkpoints/last.ckpt)"
HELP = """medvlp pretrain [method=NAME] [data=NAME] [preset=demo|tiny|paper] [-c FILE] [key=value ...]

Pretrain one method; the run folder is run.dir or <run.root>/<method>_<data>. Keys: method.init_args.*,
data.init_args.* (see `medvlp list method=NAME`), trainer.* (any lightning.Trainer argument;
trainer.logger/callbacks/plugins take {class_path, init_args} lists), run.* (dir, root, seed, resume,
checkpoint_every_n_steps, weights_only_resume, lr_monitor). logger=csv|tensorboard|wandb|[csv,tensorboard]
is short for trainer.logger. The config is composed and validated once, before any work."""
KEYS: dict = {}
PASSTHROUGH = True


def run(parsed: Parsed) -> int:
    """Compose the config and pretrain."""
    quick_check(parsed.rest)  # typos in top-level/run/trainer keys: answered before torch is imported
    from medvlp.compose import compose  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs
    from medvlp.train import pretrain  # lazy: command modules load for `medvlp --help`; the harness loads when the command runs

    print(f"checkpoint: {pretrain(compose(parsed.rest))}")
    return 0
