"""Checkpoint formats as data: name → converter, layout source, paper, default tokenizer.

Third-party packages can add formats through the ``medvlp.checkpoint_formats`` entry-point group (an
entry point naming a :class:`CheckpointFormat` subclass).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from medvlp.registry import Registry
from medvlp.method import load_method
from medvlp.pretrained.export import from_pretrained
from medvlp.config import to_container
from medvlp.pretrained.surgery import load_state_file
from medvlp.checks import did_you_mean


class CheckpointFormat:
    """One released-checkpoint layout; subclasses are registered in :data:`FORMATS`.

    Attributes:
        name: the ``format`` value in ``ckpt: {format, path}``.
        layout_source: repository and files the key layout was read from.
        paper: the method's paper.
        file: the released file this format reads.
    """

    name: ClassVar[str] = ""
    layout_source: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    file: ClassVar[str] = ""

    @classmethod
    def convert(cls, sd: dict[str, Any], source: str, **options: Any) -> Any:
        """Turn the file's state dict into a :class:`~medvlp.pretrained.model.PretrainedVLP`."""
        raise NotImplementedError

    @classmethod
    def build(cls, path: str | Path, **options: Any) -> Any:
        """Read ``path`` as a tensor archive (no code executed) and convert it."""

        return cls.convert(load_state_file(path), str(path), **options)


FORMATS: Registry[type[CheckpointFormat]] = Registry("checkpoint format", "medvlp.checkpoint_formats",
                                                     "medvlp.pretrained.builtin_formats",
                                                     base="medvlp.pretrained.formats.CheckpointFormat")
register_format = FORMATS.register


def load_checkpoint(format: str, path: str | Path, **options: Any) -> Any:
    """Load a released checkpoint of ``format`` as a model with the encoder API.

    Args:
        format: a registered format (``FORMATS.names()``) or ``medvlp`` (a medvlp training checkpoint)
            or ``export`` (a folder written by ``medvlp export``).
        path: checkpoint file (folder for ``export``).
        **options: ``tokenizer`` (folder or hub id; default the source's tokenizer, offline), ``allow_download``;
            ``allow_class_path`` for ``medvlp`` checkpoints (see :func:`medvlp.method.load_method`).

    Raises:
        KeyError: naming every accepted format (the adapters, ``medvlp`` and ``export``) with a suggestion.
    """
    if format not in ("medvlp", "export") and format not in FORMATS:

        names = [*FORMATS.names(), "medvlp", "export"]
        raise KeyError(f"unknown checkpoint format {format!r}{did_you_mean(format, names)}; available: "
                       f"{', '.join(FORMATS.names())} (released checkpoints), medvlp (a medvlp training "
                       "checkpoint), export (a `medvlp export` folder)")
    if format == "medvlp":

        return load_method(str(path), allow_class_path=bool(options.get("allow_class_path", False)))
    if format == "export":

        return from_pretrained(str(path))[0]
    return FORMATS.get(format).build(path, **options)


def load_ckpt_spec(spec: Any, allow_class_path: bool = False) -> tuple[Any, str]:
    """Resolve a suite/evaluate ``ckpt`` value: a path (medvlp checkpoint) or ``{format, path, ...options}``.

    Returns:
        ``(model, description)`` where the description names format and path (for ``results.csv``).

    Raises:
        ValueError: when a mapping lacks ``format`` or ``path``.
    """

    spec = to_container(spec)
    if isinstance(spec, (str, Path)):
        return load_checkpoint("medvlp", spec, allow_class_path=allow_class_path), str(spec)
    if not isinstance(spec, dict) or "path" not in spec or "format" not in spec:
        raise ValueError(f"ckpt must be a path or {{format, path}}, got {spec!r}")
    options = {k: v for k, v in spec.items() if k not in ("format", "path")}
    return load_checkpoint(str(spec["format"]), spec["path"], **options), f"{spec['format']}:{spec['path']}"
