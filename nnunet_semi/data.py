"""Unlabeled data: an image-only case pool and a loader that yields a weak and a strong view of one crop.

The loader reuses nnU-Net's patch sampling (``nnUNetDataLoader.get_bbox``, random crops only) and nnU-Net's own
augmentation pipeline, split in two: the spatial transforms run once per crop, then the crop is cloned and each copy
gets its own photometric pipeline. The two views are therefore pixel-aligned, and a batch holds ``data_weak``,
``data_strong`` and ``keys`` but never a ``target``: segmentation files of unlabeled cases are not even opened.
"""

from __future__ import annotations

import os
from os.path import join

import blosc2
import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from threadpoolctl import threadpool_limits

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.label_handling.label_handling import LabelManager

_SPATIAL = (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform)
# image-only transforms of nnU-Net's pipeline; everything else there edits segmentations and has no meaning here
_PHOTOMETRIC = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform, ContrastTransform,
                SimulateLowResolutionTransform, GammaTransform)


class ImageOnlyDataset:
    """Preprocessed cases from one or more folders, of which only the image array (``CASE.b2nd``) is ever opened.

    Args:
        folders_by_case: case id -> preprocessed folder holding ``CASE.b2nd``.
    """

    def __init__(self, folders_by_case: dict[str, str]):
        self.folders_by_case = dict(folders_by_case)
        self.identifiers = sorted(self.folders_by_case)
        self.mmap_kwargs = {} if os.name == "nt" else {"mmap_mode": "r"}

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_image(self, identifier: str):
        """The case's preprocessed image, (C, X, Y, Z), as a lazily read blosc2 array."""
        return blosc2.open(urlpath=join(self.folders_by_case[identifier], identifier + ".b2nd"), mode="r",
                           dparams={"nthreads": 1}, **self.mmap_kwargs)


def split_spatial_and_photometric(pipeline: ComposeTransforms) -> tuple[ComposeTransforms, ComposeTransforms]:
    """Split nnU-Net's training pipeline into (spatial part, photometric part), dropping segmentation-only steps.

    Keeps the order within each part and whatever settings a trainer variant gave nnU-Net's transforms.
    """
    spatial, photometric = [], []
    for t in pipeline.transforms:
        if isinstance(t, _SPATIAL):
            spatial.append(t)
        elif isinstance(t, RandomTransform) and isinstance(t.transform, _PHOTOMETRIC) or isinstance(t, _PHOTOMETRIC):
            photometric.append(t)
    return ComposeTransforms(spatial), ComposeTransforms(photometric)


class TwoViewUnlabeledLoader(nnUNetDataLoader):
    """Random crops of unlabeled cases, each returned as a weak and a strong view of the same geometry.

    Args:
        data: the image-only case pool.
        batch_size: samples per batch.
        patch_size: crop size before the spatial transform (nnU-Net's "initial patch size"), 2 or 3 entries.
        final_patch_size: network input size after the spatial transform.
        label_manager: the dataset's label manager (only needed by nnU-Net's parent class).
        spatial_transforms: applied once per crop (rotation, scaling, mirroring).
        weak_transforms, strong_transforms: photometric pipelines applied to separate clones of the crop.

    Batches: ``{"data_weak": (B, C, *final_patch_size), "data_strong": same shape, "keys": case ids}``.
    """

    def __init__(self, data: ImageOnlyDataset, batch_size: int, patch_size, final_patch_size,
                 label_manager: LabelManager, spatial_transforms: BasicTransform, weak_transforms: BasicTransform,
                 strong_transforms: BasicTransform):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=None)
        # unlabeled crops are uniform: never the foreground or annotated-voxel sampling paths (they need labels)
        self.has_ignore = False
        self.spatial_transforms = spatial_transforms
        self.weak_transforms = weak_transforms
        self.strong_transforms = strong_transforms

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        weak, strong = [], []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for key in keys:
                image = self._data.load_image(key)
                bbox_lbs, bbox_ubs = self.get_bbox(image.shape[1:], force_fg=False, class_locations=None)
                crop = torch.from_numpy(crop_and_pad_nd(image, [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)], 0))
                crop = crop.float()
                if self.patch_size_was_2d:
                    crop = crop[:, 0]
                shared = self.spatial_transforms(image=crop)["image"]
                # clone before branching: some batchgeneratorsv2 transforms work in place
                weak.append(self.weak_transforms(image=shared.clone())["image"])
                strong.append(self.strong_transforms(image=shared.clone())["image"])
        return {"data_weak": torch.stack(weak), "data_strong": torch.stack(strong), "keys": np.array(keys)}
