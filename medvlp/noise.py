"""Third-party messages medvlp knows to be harmless, silenced at their source; every other warning stays.

* transformers' "LOAD REPORT" when the only missing weights are the BERT pooler (medvlp drops the pooler:
  pooled text features come from its own pooling, see :class:`medvlp.encoders.text.TextEncoder`);
* transformers' per-load progress bars ("Loading weights", "Writing model shards") around medvlp's own
  loads and saves of small text models (:func:`quiet_transformers`);
* Lightning's "💡 Tip" advertisement, its hint to prepend ``srun`` (medvlp runs without ``srun`` on purpose
  outside a SLURM job; its SLURM recipe uses it), its own internal ``LeafSpec`` deprecation, and its notice
  of modules in eval mode at the start of training (the text encoder's frozen layers, on purpose).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import re
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

#: warnings (message regexes) that come from the libraries' internals, not from the user's config
HARMLESS_WARNINGS: tuple[str, ...] = (
    r"The `srun` command is available on your system but is not used",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the text encoder's frozen layers are in eval mode on purpose (no dropout where nothing trains)
    r"Found \d+ module\(s\) in eval mode at the start of training",
)
_POOLER_ROW = re.compile(r"^\s*pooler\.\S+\s*\|\s*MISSING\b")
_ROW = re.compile(r"^\s*\S+\s*\|\s*(MISSING|UNEXPECTED|MISMATCH|CONVERSION)\b")


class PoolerOnlyReport(logging.Filter):
    """Drop transformers' load report when every row of it is a missing ``pooler.*`` weight."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "LOAD REPORT" not in msg:
            return True
        rows = [ln for ln in msg.splitlines() if _ROW.match(ln)]
        return not rows or not all(_POOLER_ROW.match(ln) for ln in rows)


class LightningTip(logging.Filter):
    """Drop Lightning's "💡 Tip" advertisement lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


_INSTALLED = False


def install() -> None:
    """Install the filters once per process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    for name in ("transformers.modeling_utils", "transformers.utils.loading_report"):  # the report's loggers
        logging.getLogger(name).addFilter(PoolerOnlyReport())
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(LightningTip())
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off for the block (restored after); its warnings stay on."""
    install()
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a top-level module has been executed (a post-import hook), so set-up
    that concerns a heavy library waits until something imports it."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if fullname not in self.callbacks:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, callbacks = spec.loader, self.callbacks

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                loader.exec_module(module)  # type: ignore[attr-defined]
                for cb in callbacks.pop(fullname, []):  # a find_spec without an import keeps them
                    cb(module)

        spec.loader = _Loader()
        return spec


_HOOK = _AfterImport()


def after_import(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once top-level module ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        callback(sys.modules[name])
        return
    _HOOK.callbacks.setdefault(name, []).append(callback)
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
