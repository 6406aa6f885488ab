"""Electron microscopy datamodules: CREMI, SNEMI3D/AC3/AC4, Lucchi."""
