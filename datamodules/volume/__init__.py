"""3D datamodules: the volume pipeline (read, MONAI dict transforms, caching), CT (CT-RATE, MSD, BTCV,
BIMCV-R, CC-CCII), MRI (BraTS) and caption sources for generated text."""
