"""Semi-supervised training for nnU-Net v2, shipped as a plugin."""

__version__ = "0.1.0"
