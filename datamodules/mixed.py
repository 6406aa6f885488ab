"""``MixedDataModule``: several datamodules (e.g. X-ray + CT) trained jointly.

Training batches are a dict ``{modality: batch}`` from Lightning's ``CombinedLoader``
(``max_size_cycle``: every step sees every modality; shorter loaders cycle), which methods receive in
:meth:`~medvlp.method.VLPMethod.compute_multimodal_losses`.
"""
from __future__ import annotations

from typing import Any, Mapping

from lightning.pytorch.utilities import CombinedLoader

from medvlp.datamodules.base import VLPDataModule
from medvlp.registry import build_datamodule, register_datamodule


@register_datamodule("mixed")
class MixedDataModule(VLPDataModule):
    """Joint training over several datamodules keyed by a name (normally the modality).

    Example: ``data=mixed data.init_args.datamodules.xray.name=phantom ...``; UniMedI and GTGM declare
    their mixtures as ``example_data``.

    Args:
        datamodules: ``{key: {name, init_args}}``.
        **shared: init args given to every child (``batch_size``, sizes …); a child's own
            ``init_args`` win.
    """

    name = "mixed"

    def __init__(self, datamodules: Mapping[str, Mapping[str, Any]] | None = None, **shared: Any) -> None:
        super().__init__(**{k: v for k, v in shared.items() if k in ("batch_size", "num_workers", "pin_memory",
                                                                     "persistent_workers")})
        if not datamodules:
            raise ValueError("mixed datamodule needs children: data.init_args.datamodules.<key>.name=... "
                             "(e.g. xray: {name: phantom, init_args: {modality: xray}})")
        self.children = {k: build_datamodule(v) for k, v in self.child_specs({"datamodules": datamodules, **shared}).items()}

    @staticmethod
    def child_specs(init_args: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """``{key: {name, init_args}}`` of the children as built (shared args merged in), for validation."""
        shared = {k: v for k, v in init_args.items() if k != "datamodules"}
        return {k: {**v, "init_args": {**shared, **dict(v.get("init_args") or {})}}
                for k, v in dict(init_args.get("datamodules") or {}).items()}

    @property
    def spatial_dims(self) -> int:
        return max(dm.spatial_dims for dm in self.children.values())

    def prepare_data(self) -> None:
        for dm in self.children.values():
            dm.prepare_data()

    def encoder_hints(self) -> dict[str, Any]:
        hints: dict[str, Any] = {"spatial_dims": []}
        for dm in self.children.values():
            h = dm.encoder_hints()
            hints["spatial_dims"] = sorted(set(hints["spatial_dims"]) | set(h.pop("spatial_dims", [])))
            hints.update(h)
        return hints

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader({k: dm.train_dataloader() for k, dm in self.children.items()}, "max_size_cycle")

    def val_dataloader(self) -> CombinedLoader:
        return CombinedLoader({k: dm.val_dataloader() for k, dm in self.children.items()}, "min_size")

    def test_dataloader(self) -> CombinedLoader:
        return CombinedLoader({k: dm.test_dataloader() for k, dm in self.children.items()}, "min_size")
