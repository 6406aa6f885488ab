"""The package version (one place; ``medvlp.__version__`` and export metadata read it)."""
__version__ = "0.1.0"
