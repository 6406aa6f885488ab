"""Generic protocols: zero-shot, linear probe, fine-tune, segmentation (2D/3D, instance VOI), retrieval,
grounding and slice selection."""
