"""The coarse real-data mode of the quality benchmark: any dataset planned on a grid small enough for a CPU.

``nnUNetv2_semi_benchmark quality -d DATASET --coarse`` asks nnU-Net's own planner for a copy of the dataset's
``3d_fullres`` configuration at a coarser target spacing, chosen so that the median case fits one patch of at most
``max_patch_voxels`` voxels (50 000 by default: a 1.25 mm cardiac MRI dataset goes to 2.5 mm, patch 24 x 40 x 48,
batch 3), shrinks its U-Net to 16-128 features per stage and preprocesses it as plans ``nnUNetPlans_coarse`` beside
the dataset's own plans (which stay untouched). Every trainer then trains on that copy, the same split and schedule.

The target spacing is the planner's own ``3d_fullres`` spacing times a factor ``f``, so anisotropy is kept: ``f`` is
the smallest multiple of ``SPACING_FACTOR_STEP`` at which the median shape holds at most ``max_patch_voxels`` voxels,
raised further while the patch nnU-Net plans at that spacing is larger (nnU-Net rounds patches up to what its
pooling needs). A multiple of 0.25 keeps the spacings round (e.g. exactly 2 x 1.25 mm).
"""

from __future__ import annotations

import json
import math
from os.path import isdir, isfile, join

import numpy as np

from nnunet_semi.data.dataset_io import (
    UNLABELED_IMAGES_FOLDER,
    labeled_case_ids,
    require_env_folder,
    resolve_dataset_name,
    save_json_atomic,
)
from nnunet_semi.errors import SemiInputError

COARSE_PLANS = "nnUNetPlans_coarse"
COARSE_CONFIGURATION = "3d_fullres"
DEFAULT_MAX_PATCH_VOXELS = 50_000
SPACING_FACTOR_STEP = 0.25
MIN_AXIS_VOXELS = 8  # below this, nnU-Net's planner cannot pool even twice along that axis
COARSE_FEATURES_MIN, COARSE_FEATURES_MAX = 16, 128
# the coarse mode's defaults: 1 500 iterations (about 15 to 60 minutes for stock nnU-Net on 2 CPU cores), the
# unsupervised ramp over 40 % of them for every method (SGRS's 6 000 of 15 000), 16 validation cases for power
COARSE_EPOCHS, COARSE_ITERATIONS, COARSE_RAMPUP_FRACTION, COARSE_NUM_VAL = 15, 100, 0.4, 16
_SETTINGS_KEY = "semi_coarse"  # what the coarse plans were made from, stored in the plans file itself


def coarse_features(num_stages: int) -> tuple[int, ...]:
    """16, 32, 64, 128, 128, ...: the reduced U-Net's features per stage."""
    return tuple(min(COARSE_FEATURES_MIN * 2 ** i, COARSE_FEATURES_MAX) for i in range(num_stages))


def median_shape_at(spacing: np.ndarray, fingerprint: dict) -> np.ndarray:
    """The median case shape (axes as in the fingerprint) after resampling to ``spacing``, as nnU-Net computes it."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    shapes = [compute_new_shape(shape, case_spacing, spacing)
              for case_spacing, shape in zip(fingerprint["spacings"], fingerprint["shapes_after_crop"])]
    return np.median(shapes, 0)


def coarse_spacing_factor(fullres_spacing: np.ndarray, fingerprint: dict, max_patch_voxels: int) -> float:
    """The smallest multiple of ``SPACING_FACTOR_STEP`` (at least 1) at which the median case has at most
    ``max_patch_voxels`` voxels."""
    voxels = float(np.prod(median_shape_at(fullres_spacing, fingerprint)))
    factor = max(1.0, (voxels / max_patch_voxels) ** (1 / 3))
    factor = math.ceil(factor / SPACING_FACTOR_STEP - 1e-9) * SPACING_FACTOR_STEP
    while np.prod(median_shape_at(fullres_spacing * factor, fingerprint)) > max_patch_voxels:
        factor += SPACING_FACTOR_STEP  # the cube root is exact only for isotropic resampling
    return factor


def check_spacing_leaves_a_patch(spacing: np.ndarray, fingerprint: dict, what: str) -> np.ndarray:
    """The median shape at ``spacing``; a one-line error naming ``what`` when an axis is below MIN_AXIS_VOXELS."""
    shape = median_shape_at(spacing, fingerprint)
    if shape.min() < MIN_AXIS_VOXELS:
        raise SemiInputError(
            f"{what} leaves no patch: the median case would be {'x'.join(str(int(round(s))) for s in shape)} voxels "
            f"at spacing {', '.join(f'{s:g}' for s in spacing)} mm, below {MIN_AXIS_VOXELS} along an axis. Allow more "
            f"voxels (--coarse_voxels) or a finer spacing (--coarse_spacing).")
    return shape


def _ensure_fingerprint(dataset_id: int, preprocessed: str, num_processes: int) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints

    fingerprint_file = join(preprocessed, "dataset_fingerprint.json")
    if not isfile(fingerprint_file):
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True, verbose=False)
    with open(fingerprint_file) as f:
        return json.load(f)


def _plan(dataset_id: int, spacing: np.ndarray) -> dict:
    """nnU-Net's ExperimentPlanner at ``spacing`` for 3d_fullres, saved as COARSE_PLANS; returns the plans."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    plans, _ = plan_experiment_dataset(dataset_id, overwrite_target_spacing=tuple(float(s) for s in spacing),
                                       overwrite_plans_name=COARSE_PLANS)
    return plans


def _preprocessed_is_complete(preprocessed: str, plans: dict, raw: str, dataset_json: dict) -> bool:
    folder = join(preprocessed, plans["configurations"][COARSE_CONFIGURATION]["data_identifier"])
    if not isdir(folder):
        return False
    return all(isfile(join(folder, f"{case}.pkl")) for case in labeled_case_ids(raw, dataset_json))


def plan_coarse(dataset_name_or_id: int | str, max_patch_voxels: int = DEFAULT_MAX_PATCH_VOXELS,
                target_spacing: tuple[float, ...] | None = None, num_processes: int = 2) -> dict:
    """Plan and preprocess the coarse copy (plans ``COARSE_PLANS``, configuration 3d_fullres) of a dataset.

    Args:
        dataset_name_or_id: a dataset in ``nnUNet_raw`` (fingerprinted here if it is not yet).
        max_patch_voxels: the median case must fit one patch of at most this many voxels.
        target_spacing: the spacing to use instead of the derived one (one value: isotropic), in the axis order of
            the fingerprint, as nnU-Net's ``-overwrite_target_spacing``.
        num_processes: preprocessing workers.

    Returns:
        ``{"plans": COARSE_PLANS, "spacing", "median_shape", "patch_size", "batch_size", "features"}``. Nothing is
        planned or preprocessed again when the coarse plans exist with the same settings and every case is done.
    """
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    from nnunet_semi.data.unlabeled import preprocess_unlabeled
    from nnunet_semi.tools.demo import reduce_network

    if max_patch_voxels < MIN_AXIS_VOXELS ** 3:
        raise SemiInputError(f"--coarse_voxels {max_patch_voxels} leaves no patch: give at least "
                             f"{MIN_AXIS_VOXELS ** 3} ({MIN_AXIS_VOXELS} voxels along each axis).")
    dataset_name = resolve_dataset_name(dataset_name_or_id)
    dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    raw = join(require_env_folder("nnUNet_raw"), dataset_name)
    preprocessed = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    with open(join(raw, "dataset.json")) as f:
        dataset_json = json.load(f)
    fingerprint = _ensure_fingerprint(dataset_id, preprocessed, num_processes)
    if np.array(fingerprint["spacings"]).shape[1] != 3 or np.median(fingerprint["shapes_after_crop"], 0).min() <= 1:
        raise SemiInputError(f"{dataset_name} is not a 3D dataset: the coarse mode plans {COARSE_CONFIGURATION} only.")
    settings = {"max_patch_voxels": int(max_patch_voxels),
                "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing]}

    plans_file = join(preprocessed, COARSE_PLANS + ".json")
    plans = None
    if isfile(plans_file):
        with open(plans_file) as f:
            plans = json.load(f)
        if plans.get(_SETTINGS_KEY) != settings:
            plans = None
    if plans is None:
        if target_spacing is not None:
            what = f"--coarse_spacing {' '.join(f'{s:g}' for s in target_spacing)}"
            spacing = np.array(list(target_spacing) * 3 if len(target_spacing) == 1 else target_spacing, float)
            if len(target_spacing) not in (1, 3) or (spacing <= 0).any():
                raise SemiInputError(f"{what}: give one or three positive spacings in mm.")
            check_spacing_leaves_a_patch(spacing, fingerprint, what)
            plans = _plan(dataset_id, spacing)
        else:
            fullres = ExperimentPlanner(dataset_id).determine_fullres_target_spacing()
            factor = coarse_spacing_factor(fullres, fingerprint, max_patch_voxels)
            while True:
                spacing = fullres * factor
                check_spacing_leaves_a_patch(spacing, fingerprint, f"--coarse_voxels {max_patch_voxels}")
                plans = _plan(dataset_id, spacing)
                if np.prod(plans["configurations"][COARSE_CONFIGURATION]["patch_size"]) <= max_patch_voxels:
                    break
                factor += SPACING_FACTOR_STEP
        # the planner also wrote 2d (at the native spacing) and maybe lowres/cascade: keep the coarse 3d_fullres only
        plans["configurations"] = {COARSE_CONFIGURATION: plans["configurations"][COARSE_CONFIGURATION]}
        kwargs = plans["configurations"][COARSE_CONFIGURATION]["architecture"]["arch_kwargs"]
        reduce_network(plans, coarse_features(kwargs["n_stages"]))
        plans[_SETTINGS_KEY] = settings
        save_json_atomic(plans, plans_file)
    if not _preprocessed_is_complete(preprocessed, plans, raw, dataset_json):
        preprocess([dataset_id], plans_identifier=COARSE_PLANS, configurations=[COARSE_CONFIGURATION],
                   num_processes=[num_processes], verbose=False)
    if isdir(join(raw, UNLABELED_IMAGES_FOLDER)):
        preprocess_unlabeled(dataset_id, [COARSE_CONFIGURATION], num_processes=num_processes,
                             plans_identifier=COARSE_PLANS)
    configuration = plans["configurations"][COARSE_CONFIGURATION]
    kwargs = configuration["architecture"]["arch_kwargs"]
    return {"plans": COARSE_PLANS, "spacing": [float(s) for s in configuration["spacing"]],
            "median_shape": [float(s) for s in configuration["median_image_size_in_voxels"]],
            "patch_size": list(configuration["patch_size"]), "batch_size": int(configuration["batch_size"]),
            "features": list(kwargs["features_per_stage"])}
