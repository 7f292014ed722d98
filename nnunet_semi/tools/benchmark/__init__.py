"""Benchmarks: segmentation quality against labeled-only nnU-Net, and speed and memory against stock nnU-Net."""
