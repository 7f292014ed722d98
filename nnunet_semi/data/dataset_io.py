"""Locating a dataset's raw and preprocessed folders, its plans and its labeled case ids.

Thin checked wrappers over nnU-Net's own path handling, so that every plugin command fails with a message that names
the missing piece and the nnU-Net command that creates it.
"""

from __future__ import annotations

import json
import os
from os.path import isdir, isfile, join

from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

from nnunet_semi.errors import SemiInputError

UNLABELED_IMAGES_FOLDER = "imagesUnlabeled"
UNLABELED_SUFFIX = "_unlabeled"


def require_env_folder(name: str) -> str:
    """The folder named by nnU-Net's environment variable ``name``, which must be set and exist."""
    value = os.environ.get(name)
    if not value:
        raise SemiInputError(f"{name} is not set. Export it as for nnU-Net itself (export {name}=/path/to/folder).")
    if not isdir(value):
        raise SemiInputError(f"{name}={value} does not exist. Create it or point {name} at your nnU-Net folder.")
    return value


NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def use_nnunet_folders(root: str) -> dict[str, str]:
    """Create ``root/nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` and export them for nnU-Net (and
    for the commands this process starts); returns variable -> absolute folder."""
    paths = {name: os.path.abspath(join(root, name)) for name in NNUNET_FOLDERS}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
    os.environ.update(paths)
    return paths


def resolve_dataset_name(dataset_name_or_id: int | str) -> str:
    """``DatasetXXX_Name`` for an id or name, with a clear error when nnU-Net cannot find it."""
    try:
        return maybe_convert_to_dataset_name(dataset_name_or_id)
    except (RuntimeError, ValueError) as e:
        raise SemiInputError(
            f"dataset {dataset_name_or_id!r} was found neither in nnUNet_raw nor in nnUNet_preprocessed. "
            f"Check the id and your nnU-Net path variables. ({e})"
        ) from None


def load_json(path: str) -> dict | list:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SemiInputError(f"{path} is not valid JSON ({e}). Restore or regenerate it.") from None


def save_json_atomic(obj, path: str) -> None:
    """Write JSON through a temporary file so that readers never see a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=4, sort_keys=False)
    os.replace(tmp, path)


def load_plans(dataset_name: str, plans_identifier: str) -> dict:
    """The plans nnUNetv2_plan_and_preprocess wrote for this dataset."""
    plans_file = join(require_env_folder("nnUNet_preprocessed"), dataset_name, plans_identifier + ".json")
    if not isfile(plans_file):
        dataset_id = dataset_name[len("Dataset"):len("Dataset") + 3]
        raise SemiInputError(
            f"plans file {plans_file} not found. Run nnUNetv2_plan_and_preprocess -d {int(dataset_id)} first "
            f"(or pass the plans identifier you used with -plans_name)."
        )
    return load_json(plans_file)


def check_configuration(plans: dict, configuration: str, plans_file_hint: str) -> None:
    available = list(plans["configurations"].keys())
    if configuration not in available:
        raise SemiInputError(
            f"configuration {configuration!r} is not in the plans {plans_file_hint}. Available: {', '.join(available)}."
        )


def data_identifier(plans: dict, configuration: str) -> str:
    return PlansManager(plans).get_configuration(configuration).data_identifier


def unlabeled_preprocessed_folder(dataset_name: str, plans: dict, configuration: str) -> str:
    """Where the unlabeled cases of ``configuration`` live: a sibling of nnU-Net's labeled preprocessed folder."""
    base = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    return join(base, data_identifier(plans, configuration) + UNLABELED_SUFFIX)


def labeled_case_ids(raw_dataset_folder: str, dataset_json: dict) -> list[str]:
    """Ids of the dataset's labeled training cases, found exactly as nnU-Net finds them (labels are not opened)."""
    if "dataset" in dataset_json:
        return sorted(dataset_json["dataset"].keys())
    return sorted(str(i) for i in get_identifiers_from_splitted_dataset_folder(
        join(raw_dataset_folder, "imagesTr"), dataset_json["file_ending"]))
