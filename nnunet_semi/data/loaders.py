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
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import (
    RemoveRandomConnectedComponentFromOneHotEncodingTransform,
)
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from threadpoolctl import threadpool_limits

_SPATIAL = (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform)
# image-only transforms of nnU-Net's pipeline; everything else there edits segmentations and has no meaning here
_PHOTOMETRIC = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform, ContrastTransform,
                SimulateLowResolutionTransform, GammaTransform)
# steps of nnU-Net's pipeline that edit or convert segmentations only (or the cascade's one-hot input)
_SEGMENTATION_ONLY = (RemoveLabelTansform, DownsampleSegForDSTransform, ConvertSegmentationToRegionsTransform,
                      MoveSegAsOneHotToDataTransform, ApplyRandomBinaryOperatorTransform,
                      RemoveRandomConnectedComponentFromOneHotEncodingTransform)


def _wrapped(transform: BasicTransform) -> BasicTransform:
    """The transform a ``RandomTransform`` applies with its probability (the transform itself otherwise)."""
    return transform.transform if isinstance(transform, RandomTransform) else transform


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


def split_spatial_and_photometric(pipeline: ComposeTransforms
                                  ) -> tuple[ComposeTransforms, ComposeTransforms, MaskImageTransform | None]:
    """Split nnU-Net's training pipeline into (spatial part, photometric part, mask-for-norm step or None), dropping
    segmentation-only steps.

    Keeps the order within each part and whatever settings a trainer variant gave nnU-Net's transforms. The
    mask-for-norm step (present when the plans normalise inside the nonzero mask) zeroes the image outside that mask
    after the photometric changes, as nnU-Net does for labeled crops.

    Raises:
        ValueError: for a transform of none of these kinds (a trainer variant's own augmentation), naming it:
            silently dropping it would train the unlabeled views without it.
    """
    spatial, photometric, masking = [], [], None
    for t in pipeline.transforms:
        if isinstance(t, _SPATIAL):
            spatial.append(t)
        elif isinstance(_wrapped(t), _PHOTOMETRIC):
            photometric.append(t)
        elif isinstance(t, MaskImageTransform):
            masking = t
        elif not isinstance(_wrapped(t), _SEGMENTATION_ONLY):
            raise ValueError(
                f"nnU-Net's training pipeline holds {type(_wrapped(t)).__name__}, which nnunet-semi does not know "
                f"as spatial, photometric or segmentation-only, so it cannot tell which unlabeled view it belongs "
                f"to. Override the trainer's split_unlabeled_pipeline to place it (or drop it).")
    return ComposeTransforms(spatial), ComposeTransforms(photometric), masking


class PerturbedUntilChanged(BasicTransform):
    """A random photometric pipeline, drawn again (on the original image) until the image has changed.

    nnU-Net's intensity transforms each fire with their own probability, so with one channel about a third of all
    crops pass through unchanged; a student view equal to the teacher's teaches a consistency loss nothing. This is
    nnU-Net's own augmentation conditioned on changing the image. An empty pipeline returns the image as it is, and
    an image no transform can change (a constant crop) is returned after ``max_attempts`` draws.
    """

    def __init__(self, pipeline: BasicTransform, max_attempts: int = 20):
        super().__init__()
        self.pipeline = pipeline
        self.max_attempts = max_attempts

    def __call__(self, **data_dict) -> dict:
        if isinstance(self.pipeline, ComposeTransforms) and not self.pipeline.transforms:
            return data_dict
        image = data_dict["image"]
        for _ in range(self.max_attempts):
            # clone: batchgeneratorsv2 transforms may work in place
            out = self.pipeline(**(data_dict | {"image": image.clone()}))
            if not torch.equal(out["image"], image):
                break
        return out

    def __repr__(self):
        return f"{type(self).__name__}({self.pipeline})"


UNLABELED_VIEWS = ("weak", "strong")


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
        mask_for_norm: nnU-Net's mask-for-norm step (None: the plans normalise without a mask). The outside of the
            nonzero mask is read from the image itself (every masked channel exactly 0, as nnU-Net's preprocessing
            leaves it), carried through the spatial transform like a segmentation, and zeroed again in both views
            after their photometric changes. No segmentation file is opened for it.
        views: the views to build, a subset of ("weak", "strong"): a method that reads one view does not pay for
            the other's photometric draws and transfer.

    Batches: ``{"data_weak": (B, C, *final_patch_size), "data_strong": same shape, "keys": case ids}``, with only
    the ``views`` asked for.
    """

    def __init__(self, data: ImageOnlyDataset, batch_size: int, patch_size, final_patch_size,
                 label_manager: LabelManager, spatial_transforms: BasicTransform, weak_transforms: BasicTransform,
                 strong_transforms: BasicTransform, mask_for_norm: MaskImageTransform | None = None,
                 views: tuple[str, ...] = UNLABELED_VIEWS):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=None)
        if not views or set(views) - set(UNLABELED_VIEWS):
            raise ValueError(f"views must be a non-empty subset of {UNLABELED_VIEWS}, got {views}")
        self.views = tuple(v for v in UNLABELED_VIEWS if v in views)
        # unlabeled crops are uniform: never the foreground or annotated-voxel sampling paths (they need labels)
        self.has_ignore = False
        self.spatial_transforms = spatial_transforms
        self.weak_transforms = weak_transforms
        self.strong_transforms = strong_transforms
        self.mask_for_norm = mask_for_norm

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        pipelines = {"weak": self.weak_transforms, "strong": self.strong_transforms}
        views = {name: [] for name in self.views}
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for key in keys:
                image = self._data.load_image(key)
                bbox_lbs, bbox_ubs = self.get_bbox(image.shape[1:], force_fg=False, class_locations=None)
                crop = torch.from_numpy(crop_and_pad_nd(image, [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)], 0))
                crop = crop.float()
                if self.patch_size_was_2d:
                    crop = crop[:, 0]
                shared = self.spatial_transforms(**self._with_outside_mask(crop))
                for name, images in views.items():
                    # clone before branching: some batchgeneratorsv2 transforms work in place
                    view = pipelines[name](**{k: v.clone() for k, v in shared.items()})
                    if self.mask_for_norm is not None:
                        view = self.mask_for_norm(**view)
                    images.append(view["image"])
        return {f"data_{name}": torch.stack(images) for name, images in views.items()} | {"keys": np.array(keys)}

    def _with_outside_mask(self, crop: torch.Tensor) -> dict:
        """``{"image": crop}``, plus under mask-for-norm a one-channel ``segmentation`` that is -1 outside the nonzero
        mask (every masked channel exactly 0) and 0 inside, nnU-Net's encoding of that mask."""
        if self.mask_for_norm is None or not self.mask_for_norm.apply_to_channels:
            return {"image": crop}
        outside = (crop[self.mask_for_norm.apply_to_channels] == 0).all(0, keepdim=True)
        return {"image": crop, "segmentation": torch.where(outside, -1, 0).to(torch.int16)}
