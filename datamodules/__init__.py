"""Datamodules producing the common batch schema (importing this registers the built-ins)."""
from medvlp.datamodules.base import RecordDataset, VLPDataModule
from medvlp.datamodules.volume.bimcv_r import BIMCVRDataModule
from medvlp.datamodules.volume.cc_ccii import CCCCIIDataModule
from medvlp.datamodules.io.csv_manifest import CSVDataModule
from medvlp.datamodules.volume.ct import BTCVDataModule, CTRATEDataModule, MSDDataModule
from medvlp.datamodules.em.datasets import CREMIDataModule, LucchiDataModule, SNEMIDataModule
from medvlp.datamodules.image_text_label import ImageTextLabelDataModule
from medvlp.datamodules.mixed import MixedDataModule
from medvlp.registry import build_datamodule
from medvlp.datamodules.xray.mimic_5x200 import MIMIC5x200DataModule
from medvlp.datamodules.volume.mri import BraTSDataModule
from medvlp.datamodules.xray.nih import NIHChestXray14DataModule
from medvlp.datamodules.phantom.datamodule import PhantomDataModule
from medvlp.datamodules.io.shards import ShardDataModule, write_shards
from medvlp.datamodules.xray.chest import (
    CheXpertDataModule, COVIDxDataModule, MIMICCXRDataModule, RSNAPneumoniaDataModule, SIIMDataModule,
)

__all__ = [
    "BIMCVRDataModule", "BTCVDataModule", "BraTSDataModule", "CCCCIIDataModule", "CSVDataModule", "CREMIDataModule",
    "CTRATEDataModule",
    "CheXpertDataModule",
    "COVIDxDataModule", "ImageTextLabelDataModule", "LucchiDataModule", "MIMICCXRDataModule", "MIMIC5x200DataModule",
    "MSDDataModule", "MixedDataModule", "NIHChestXray14DataModule", "PhantomDataModule", "RSNAPneumoniaDataModule",
    "SIIMDataModule", "SNEMIDataModule", "RecordDataset",
    "ShardDataModule", "write_shards",
    "VLPDataModule", "build_datamodule",
]
