"""The benchmark harness: protocols on a shared kit, reference reproductions, metrics, suites and reports.

Importing this package registers the built-in protocols (generic and reference).
"""
from medvlp.benchmarks.protocols import (  # noqa: F401  (registration)
    finetune, grounding, linear_probe, retrieval, segmentation, slice_selection, zero_shot,
)
from medvlp.benchmarks.reference import benchx, em_cremi, gtgm_finetune, mgca_linear, mgca_segmentation  # noqa: F401
