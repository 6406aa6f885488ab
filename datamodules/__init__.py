"""Datamodules producing the common batch schema (importing this registers the built-ins)."""
from medvlp.datamodules.base import SampleListDataset, VLPDataModule
from medvlp.datamodules.mixed import MixedDataModule, build_datamodule
from medvlp.datamodules.phantom import PhantomDataModule

__all__ = ["MixedDataModule", "PhantomDataModule", "SampleListDataset", "VLPDataModule", "build_datamodule"]
