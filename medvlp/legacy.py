"""Old module paths of class paths, so checkpoints and configs written before a module moved still load.

Release 0.1.0 kept every datamodule and benchmark module flat in its folder; they now live in subpackages
by modality and by role. A ``class_path`` is a string in checkpoints, export folders, suites and configs, so
the old module names stay valid through this table (used only by
:func:`medvlp.registry.import_class_path`, which still checks the class's kind after the import).
"""
from __future__ import annotations

#: module path in release 0.1.0 → module path now
MOVED_MODULES: dict[str, str] = {
    "medvlp.datamodules.xray": "medvlp.datamodules.xray.chest",
    "medvlp.datamodules.nih": "medvlp.datamodules.xray.nih",
    "medvlp.datamodules.mimic_5x200": "medvlp.datamodules.xray.mimic_5x200",
    "medvlp.datamodules.chest_imagenome": "medvlp.datamodules.xray.chest_imagenome",
    "medvlp.datamodules.volume": "medvlp.datamodules.volume.base",
    "medvlp.datamodules.ct": "medvlp.datamodules.volume.ct",
    "medvlp.datamodules.mri": "medvlp.datamodules.volume.mri",
    "medvlp.datamodules.bimcv_r": "medvlp.datamodules.volume.bimcv_r",
    "medvlp.datamodules.cc_ccii": "medvlp.datamodules.volume.cc_ccii",
    "medvlp.datamodules.captions": "medvlp.datamodules.volume.captions",
    "medvlp.datamodules.em": "medvlp.datamodules.em.datasets",
    "medvlp.datamodules.phantom": "medvlp.datamodules.phantom.datamodule",
    "medvlp.datamodules.phantom_render": "medvlp.datamodules.phantom.render",
    "medvlp.datamodules.phantom_reports": "medvlp.datamodules.phantom.reports",
    "medvlp.datamodules.readers": "medvlp.datamodules.io.readers",
    "medvlp.datamodules.shards": "medvlp.datamodules.io.shards",
    "medvlp.datamodules.prepare": "medvlp.datamodules.io.prepare",
    "medvlp.datamodules.csv_manifest": "medvlp.datamodules.io.csv_manifest",
    "medvlp.benchmarks.protocol": "medvlp.benchmarks.kit.protocol",
    "medvlp.benchmarks.features": "medvlp.benchmarks.kit.features",
    "medvlp.benchmarks.head_loop": "medvlp.benchmarks.kit.head_loop",
    "medvlp.benchmarks.splits": "medvlp.benchmarks.kit.splits",
    "medvlp.benchmarks.views": "medvlp.benchmarks.kit.views",
    "medvlp.benchmarks.zero_shot": "medvlp.benchmarks.protocols.zero_shot",
    "medvlp.benchmarks.linear_probe": "medvlp.benchmarks.protocols.linear_probe",
    "medvlp.benchmarks.finetune": "medvlp.benchmarks.protocols.finetune",
    "medvlp.benchmarks.segmentation": "medvlp.benchmarks.protocols.segmentation",
    "medvlp.benchmarks.retrieval": "medvlp.benchmarks.protocols.retrieval",
    "medvlp.benchmarks.grounding": "medvlp.benchmarks.protocols.grounding",
    "medvlp.benchmarks.slice_selection": "medvlp.benchmarks.protocols.slice_selection",
    "medvlp.benchmarks.benchx": "medvlp.benchmarks.reference.benchx",
    "medvlp.benchmarks.mgca_linear": "medvlp.benchmarks.reference.mgca_linear",
    "medvlp.benchmarks.mgca_segmenter": "medvlp.benchmarks.reference.mgca_segmentation",
    "medvlp.benchmarks.gtgm_finetune": "medvlp.benchmarks.reference.gtgm_finetune",
    "medvlp.benchmarks.em_cremi": "medvlp.benchmarks.reference.em_cremi",
    "medvlp.benchmarks.dice": "medvlp.benchmarks.metrics.dice",
    "medvlp.benchmarks.stats": "medvlp.benchmarks.metrics.stats",
    "medvlp.benchmarks.runner": "medvlp.benchmarks.suite.runner",
    "medvlp.benchmarks.results": "medvlp.benchmarks.suite.results",
    "medvlp.benchmarks.experiments": "medvlp.benchmarks.suite.experiments",
    "medvlp.benchmarks.paper_view": "medvlp.benchmarks.suite.paper_view",
    "medvlp.benchmarks.tables": "medvlp.benchmarks.report.tables",
}


def current_module(module_name: str) -> str:
    """The module that holds today what ``module_name`` held when a class path was written."""
    return MOVED_MODULES.get(module_name, module_name)
