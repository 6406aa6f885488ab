"""Chest X-ray datamodules: MIMIC-CXR(-JPG), CheXpert, RSNA, SIIM, COVIDx, NIH ChestX-ray14, MIMIC 5x200, and
Chest ImaGenome regions."""
