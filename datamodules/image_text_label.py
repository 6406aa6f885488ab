"""``image_text_label``: one stream of image–report and image–label samples under one label list (UMCL).

UMCL unifies image–text and image–label data in one training stream. This datamodule concatenates the
splits of several X-ray datamodules (e.g. ``mimic_cxr`` with reports and ``chexpert`` with labels only)
into one shuffled dataset, so a batch mixes both kinds; every sample carries ``text`` (``""`` for a
label-only sample, which UMCL replaces by its learned-prompt embedding) and ``labels`` over one shared
``label_names`` list, so same-label-set targets link report and label-only samples.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset

from medvlp.datamodules.base import VLPDataModule
from medvlp.datamodules.io.readers import DataError
from medvlp.datamodules.tabular import collate_skipping
from medvlp.registry import build_datamodule, register_datamodule

log = logging.getLogger(__name__)


class _UnifiedLabels(Dataset):
    """A child dataset re-expressed in the unified schema (image, text, labels over ``names``, meta)."""

    def __init__(self, base: Dataset, source: str, child_names: Sequence[str], names: Sequence[str]) -> None:
        self.base, self.source, self.names = base, source, list(names)
        position = {n: i for i, n in enumerate(child_names)}
        self.index = torch.tensor([position.get(n, -1) for n in self.names])

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        s = self.base[i]
        if s is None:  # skipped under the child's on_error policy
            return None
        labels = torch.full((len(self.names),), float("nan"))
        if "labels" in s:
            known = self.index >= 0
            labels[known] = torch.as_tensor(s["labels"], dtype=torch.float32)[self.index[known]]
        meta = dict(s.get("meta") or {})
        return {"image": s["image"], "modality": s.get("modality", "xray"), "text": s.get("text", "") or "",
                "labels": labels, "label_names": self.names,
                "meta": {"id": str(meta.get("id", i)), "source": self.source}}


@register_datamodule("image_text_label")
class ImageTextLabelDataModule(VLPDataModule):
    """Image–report and image–label datamodules mixed in one shuffled stream (UMCL's unified data).

    Example: ``data=image_text_label data.init_args.sources.reports.name=mimic_cxr ...
    data.init_args.sources.labels.name=chexpert ...``.

    Args:
        sources: ``{key: {name, init_args}}`` of 2D datamodules (their own test-id exclusions apply,
            e.g. CheXpert keeps 5x200 out of train/val by default).
        label_names: the shared label list; default: the labels every source has, in the first source's
            order. A listed label that a source lacks is unknown (NaN) for its samples.
        **shared: init args given to every source (``image_size``, ``batch_size`` …); a source's own
            ``init_args`` win.
    """

    name = "image_text_label"

    def __init__(self, sources: Mapping[str, Mapping[str, Any]] | None = None,
                 label_names: Sequence[str] | None = None, **shared: Any) -> None:
        super().__init__(**{k: v for k, v in shared.items() if k in ("batch_size", "num_workers", "pin_memory")})
        if not sources or len(sources) < 1:
            raise ValueError("image_text_label needs sources: data.init_args.sources.<key>.name=... "
                             "(e.g. reports: {name: mimic_cxr, ...}, labels: {name: chexpert, ...})")
        self.children = {k: build_datamodule(v) for k, v in self.child_specs({"sources": sources, **shared}).items()}
        for key, dm in self.children.items():
            if dm.spatial_dims != 2:
                raise ValueError(f"image_text_label: source {key!r} ({type(dm).__name__}) is not a 2D datamodule")
        if label_names:
            self._names = list(label_names)
        else:
            first = list(self.children.values())[0].label_names
            self._names = [n for n in first if all(n in dm.label_names for dm in self.children.values())]
        if not self._names:
            raise ValueError("image_text_label: the sources share no label; set data.init_args.label_names")
        hints = {k: dm.encoder_hints().get("img_size_2d") for k, dm in self.children.items()}
        if len(set(hints.values())) > 1:
            raise ValueError(f"image_text_label: sources produce different image sizes {hints}; set image_size once")

    collate_fn = staticmethod(collate_skipping)
    #: init-arg key holding the children (config validation names it in errors)
    children_key = "sources"

    @staticmethod
    def child_specs(init_args: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """``{key: {name, init_args}}`` of the sources as built (shared args merged in), for validation."""
        shared = {k: v for k, v in init_args.items() if k not in ("sources", "label_names")}
        return {k: {**v, "init_args": {**shared, **dict(v.get("init_args") or {})}}
                for k, v in dict(init_args.get("sources") or {}).items()}

    @property
    def label_names(self) -> list[str]:
        return list(self._names)

    def encoder_hints(self) -> dict[str, Any]:
        return list(self.children.values())[0].encoder_hints()

    def prepare_data(self) -> None:
        for dm in self.children.values():
            dm.prepare_data()

    def build_dataset(self, split: str, augment: bool) -> Dataset:
        parts = []
        for key, dm in self.children.items():
            try:
                ds = dm.dataset(split, augment)
            except DataError as exc:  # e.g. an empty test split of one source
                if split == "train":
                    raise
                log.warning("image_text_label: source %r has no %s split (%s); using the others", key, split, exc)
                continue
            parts.append(_UnifiedLabels(ds, key, dm.label_names, self._names))
        return ConcatDataset(parts) if parts else ConcatDataset([_UnifiedLabels([], "none", [], self._names)])

    def skip_report(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, dm in self.children.items():
            out.update({f"{key}:{k}": v for k, v in dm.skip_report().items()})
        return out
