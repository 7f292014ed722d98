"""The unlabeled views take nnU-Net's own pipeline apart by kind; a transform of no known kind is refused, not
silently dropped."""

from __future__ import annotations

import pytest
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_semi.data.loaders import split_spatial_and_photometric


def _pipeline(patch=(24, 24, 24), **kwargs):
    settings = {"rotation_for_DA": (-0.5, 0.5), "deep_supervision_scales": None, "mirror_axes": (0, 1, 2),
                "do_dummy_2d_data_aug": False, "use_mask_for_norm": [False]} | kwargs
    return nnUNetTrainer.get_training_transforms(patch, **settings)


@pytest.mark.parametrize("settings", [
    {},
    {"deep_supervision_scales": [[1, 1, 1], [0.5, 0.5, 0.5]]},
    {"regions": [[1, 2], [2]], "foreground_labels": [1, 2]},
    {"is_cascaded": True, "foreground_labels": [1, 2]},
    {"do_dummy_2d_data_aug": True, "use_mask_for_norm": [True], "ignore_label": 3},
], ids=["plain", "deep_supervision", "regions", "cascade", "dummy_2d_mask_ignore"])
def test_every_step_of_nnunets_pipelines_has_a_kind(settings):
    pipeline = _pipeline(**settings)
    spatial, photometric, masking = split_spatial_and_photometric(pipeline)
    assert len(photometric.transforms) == 7  # noise, blur, brightness, contrast, low resolution, two gammas
    assert {type(t).__name__ for t in spatial.transforms} >= {"SpatialTransform", "MirrorTransform"}
    assert (masking is not None) == settings.get("use_mask_for_norm", [False])[0]
    kept = len(spatial.transforms) + len(photometric.transforms) + (masking is not None)
    assert kept < len(pipeline.transforms)  # segmentation-only steps are dropped


class _Solarize(BasicTransform):
    def apply(self, data_dict, **params):
        return data_dict


@pytest.mark.parametrize("wrap", [False, True])
def test_an_unknown_transform_is_refused_by_name(wrap):
    pipeline = _pipeline()
    extra = RandomTransform(_Solarize(), 0.5) if wrap else _Solarize()
    with pytest.raises(ValueError, match="holds _Solarize, which nnunet-semi does not know.*split_unlabeled_pipeline"):
        split_spatial_and_photometric(ComposeTransforms(pipeline.transforms + [extra]))
