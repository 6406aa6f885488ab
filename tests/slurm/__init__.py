"""Tests on a real single-node SLURM (``make test-slurm``; ``tests/slurm/up.sh`` starts it)."""
