"""The ``medvlp`` command line."""
from medvlp.cli.main import main

__all__ = ["main"]
