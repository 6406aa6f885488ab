"""Benchmark protocols (importing this registers the built-ins)."""
from medvlp.benchmarks import benchx, em_cremi, finetune, grounding, gtgm_finetune, linear_probe, mgca_linear, mgca_segmenter, retrieval, segmentation, slice_selection, zero_shot  # noqa: F401  (registration)
