"""Datamodules producing the common batch schema (importing this registers the built-ins)."""
from medvlp.datamodules.base import RecordDataset, VLPDataModule
from medvlp.datamodules.bimcv_r import BIMCVRDataModule
from medvlp.datamodules.cc_ccii import CCCCIIDataModule
from medvlp.datamodules.csv_manifest import CSVDataModule
from medvlp.datamodules.ct import BTCVDataModule, CTRATEDataModule, MSDDataModule
from medvlp.datamodules.em import CREMIDataModule, LucchiDataModule, SNEMIDataModule
from medvlp.datamodules.image_text_label import ImageTextLabelDataModule
from medvlp.datamodules.mixed import MixedDataModule, build_datamodule
from medvlp.datamodules.mimic_5x200 import MIMIC5x200DataModule
from medvlp.datamodules.mri import BraTSDataModule
from medvlp.datamodules.nih import NIHChestXray14DataModule
from medvlp.datamodules.phantom import PhantomDataModule
from medvlp.datamodules.shards import ShardDataModule, write_shards
from medvlp.datamodules.xray import (
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
