"""Synthetic nnU-Net raw datasets for the demo and the tests.

Each case is a textured background with one ellipsoidal object (label 1) and, for multi-class datasets, a smaller
blob touching it (label 2). Shapes, sizes and positions vary, and every image carries a smooth multiplicative bias
field and Gaussian noise, so a model trained on a handful of labeled cases has something left to learn from unlabeled
ones.
"""

from __future__ import annotations

import json
import os
from os.path import join

import numpy as np
import SimpleITK as sitk


def _ellipsoid(grid: list[np.ndarray], center: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    coords = np.stack([g - c for g, c in zip(grid, center)], axis=-1) @ rotation.T
    return (coords / radii).__pow__(2).sum(-1) <= 1.0


def _random_rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    return q * np.sign(np.diag(r))


def synthetic_case(shape: tuple[int, ...], num_foreground_classes: int, rng: np.random.Generator,
                   noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """One (image float32, label uint8) pair of the given spatial shape (2D or 3D)."""
    shape_arr = np.array(shape, dtype=float)
    grid = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    center = shape_arr * rng.uniform(0.35, 0.65, size=len(shape))
    radii = shape_arr * rng.uniform(0.12, 0.3, size=len(shape))
    rotation = _random_rotation(len(shape), rng)
    label = _ellipsoid(grid, center, radii, rotation).astype(np.uint8)
    if num_foreground_classes >= 2:
        direction = rng.normal(size=len(shape))
        direction /= np.linalg.norm(direction)
        blob_center = center + direction * radii.max() * 0.9
        blob = _ellipsoid(grid, blob_center, radii * rng.uniform(0.35, 0.5), rotation)
        label[blob] = 2
    image = rng.normal(0.0, 0.15, size=shape)  # background texture
    for cls in range(1, num_foreground_classes + 1):
        image[label == cls] += 1.0 + 0.6 * (cls - 1) + rng.normal(0, 0.1)
    normalized = [g / s - 0.5 for g, s in zip(grid, shape)]
    bias = np.exp(sum(rng.normal(0, 0.35) * g for g in normalized) + rng.normal(0, 0.15) * normalized[0] ** 2)
    image = image * bias + rng.normal(0, noise, size=shape)
    return (100.0 + 50.0 * image).astype(np.float32), label


def _write(array: np.ndarray, path: str, spacing: tuple[float, ...]) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(image, path, True)


def make_synthetic_dataset(raw_root: str, dataset_id: int = 990, name: str = "SemiSynthetic", num_labeled: int = 8,
                           num_unlabeled: int = 8, num_test: int = 4, shape: tuple[int, ...] = (32, 32, 32),
                           num_foreground_classes: int = 1, seed: int = 0) -> str:
    """Write an nnU-Net raw dataset with ``imagesTr/labelsTr``, ``imagesUnlabeled`` and ``imagesTs/labelsTs``.

    Args:
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id: three-digit dataset id.
        name: dataset name suffix.
        num_labeled, num_unlabeled, num_test: case counts (``labelsTs`` holds the test labels for evaluation).
        shape: spatial shape; 2 entries give a 2D dataset.
        num_foreground_classes: 1 (binary) or 2.
        seed: seed of every random choice.

    Returns:
        The dataset folder.
    """
    rng = np.random.default_rng(seed)
    folder = join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        os.makedirs(join(folder, sub), exist_ok=True)
    spacing = (1.0,) * len(shape)
    groups = [("imagesTr", "labelsTr", "case", num_labeled), ("imagesUnlabeled", None, "unl", num_unlabeled),
              ("imagesTs", "labelsTs", "test", num_test)]
    for images, labels, prefix, count in groups:
        for i in range(count):
            image, label = synthetic_case(tuple(shape), num_foreground_classes, rng)
            _write(image, join(folder, images, f"{prefix}_{i:03d}_0000.nii.gz"), spacing)
            if labels is not None:
                _write(label, join(folder, labels, f"{prefix}_{i:03d}.nii.gz"), spacing)
    labels = {"background": 0, "object": 1} | ({"attachment": 2} if num_foreground_classes >= 2 else {})
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": num_labeled,
                    "file_ending": ".nii.gz", "name": name}
    with open(join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=4)
    return folder


def plan_and_preprocess(dataset_id: int, configurations: tuple[str, ...] = ("3d_fullres",),
                        check_dataset_integrity: bool = True) -> None:
    """nnU-Net's own fingerprinting, planning and preprocessing through its Python API, in this process."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=check_dataset_integrity,
                         verbose=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=list(configurations), num_processes=[1] * len(configurations),
               verbose=False)
