"""Unlabeled images: find them in ``nnUNet_raw/DatasetXXX/imagesUnlabeled`` and preprocess them with the dataset's
plans.

Layout (mirrors ``imagesTr``, no labels, ``dataset.json`` unchanged)::

    nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/CASE_0000<file_ending>   # channel 0
                                              CASE_0001<file_ending>   # channel 1, if the dataset has two
    nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/CASE.b2nd, CASE_seg.b2nd, CASE.pkl

Preprocessing runs the configuration's own nnU-Net preprocessor class (same transpose, cropping, normalization and
resampling as the labeled cases). The ``_seg`` array holds only the nonzero mask nnU-Net derives for cropping (-1
outside, 0 inside), never a label, and ``class_locations`` is empty, so nnU-Net's dataset classes and loader read the
cases like labeled ones without oversampling foreground.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
from collections import defaultdict
from os.path import isdir, isfile, join

import numpy as np
from nnunetv2.configuration import default_num_processes
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from nnunet_semi.data.dataset_io import (
    UNLABELED_IMAGES_FOLDER,
    UNLABELED_SUFFIX,
    check_configuration,
    labeled_case_ids,
    load_json,
    load_plans,
    require_env_folder,
    resolve_dataset_name,
    save_json_atomic,
    unlabeled_preprocessed_folder,
)
from nnunet_semi.data.splits import UNLABELED_KEY
from nnunet_semi.errors import SemiInputError

# A case id becomes a file name in the preprocessed folder: keep it to one plain path component.
_SAFE_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_IDENTITY_FILE = "semi_preprocessing.json"
_STAGING_FOLDER = ".incomplete"


def find_unlabeled_cases(images_folder: str, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """Group the files of ``imagesUnlabeled`` into cases.

    Args:
        images_folder: the ``imagesUnlabeled`` folder.
        file_ending: the dataset's ``file_ending`` (e.g. ``.nii.gz``).
        num_channels: number of entries in the dataset's ``channel_names``.

    Returns:
        case id -> list of image files ordered by channel, one per channel.

    Raises:
        SemiInputError: missing or empty folder, a file that is not ``CASE_XXXX<file_ending>``, a case id that is not
            a single safe path component, or a case whose channel files are not exactly ``_0000`` … ``_{C-1}``.
    """
    if not isdir(images_folder):
        raise SemiInputError(
            f"no unlabeled images: {images_folder} does not exist. Put image-only cases there as "
            f"CASE_0000{file_ending} (same channel suffixes and file ending as imagesTr)."
        )
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    channels: dict[str, dict[int, str]] = defaultdict(dict)
    for name in sorted(os.listdir(images_folder)):
        path = join(images_folder, name)
        if name.startswith(".") and not name.startswith(".."):
            continue  # hidden files (.DS_Store, editor swap files) are not cases
        match = pattern.fullmatch(name)
        if match is None:
            raise SemiInputError(
                f"{path}: unexpected file name. Unlabeled images must be named CASE_XXXX{file_ending} with a 4-digit "
                f"channel index, as in imagesTr; rename or remove it."
            )
        case_id, channel = match.group(1), int(match.group(2))
        if not _SAFE_CASE_ID.fullmatch(case_id) or case_id.endswith("_seg"):
            raise SemiInputError(
                f"{path}: case id {case_id!r} is not allowed (it must start with a letter or digit, contain only "
                f"letters, digits, '_', '-' and '.', so it cannot escape its folder, and not end in '_seg', which "
                f"nnU-Net reserves for segmentations). Rename the file."
            )
        if not isfile(path):
            raise SemiInputError(f"{path} is not a regular file. Replace it with the image file.")
        channels[case_id][channel] = path
    if not channels:
        raise SemiInputError(
            f"no unlabeled images: {images_folder} contains no CASE_XXXX{file_ending} files. Add image-only cases."
        )
    cases = {}
    expected = list(range(num_channels))
    for case_id, files in channels.items():
        if sorted(files) != expected:
            missing = [f"{case_id}_{c:04d}{file_ending}" for c in expected if c not in files]
            extra = [os.path.basename(files[c]) for c in files if c not in expected]
            raise SemiInputError(
                f"unlabeled case {case_id!r} in {images_folder} does not have exactly the dataset's {num_channels} "
                f"channel file(s) _0000.._{num_channels - 1:04d}: missing {missing or 'none'}, unexpected "
                f"{extra or 'none'}. Add the missing channel files or fix the suffixes."
            )
        cases[case_id] = [files[c] for c in expected]
    return cases


def check_raw_image(data: np.ndarray, image_files: list[str], num_channels: int, dataset_is_2d: bool | None) -> None:
    """Check a case as read by the dataset's reader: data (C, X, Y, Z), with X == 1 for 2D images."""
    names = ", ".join(image_files)
    if data.shape[0] != num_channels:
        raise SemiInputError(
            f"{names}: {data.shape[0]} channel(s) read, the dataset has {num_channels}. Store one channel per "
            f"file (_0000, _0001, ...) as in imagesTr."
        )
    if dataset_is_2d is not None and (data.shape[1] == 1) != dataset_is_2d:
        kind, other = ("2D", "3D") if data.shape[1] == 1 else ("3D", "2D")
        raise SemiInputError(
            f"{names}: the image is {kind} (shape {tuple(data.shape[1:])}) but the dataset's training images are "
            f"{other}. Unlabeled images must have the dimensionality of imagesTr; remove or convert it."
        )
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise SemiInputError(f"{names}: {bad} voxel(s) are NaN or infinite. Fix or remove the image.")


def check_image_files(image_files: list[str], dataset_json: dict) -> None:
    """Refuse, by name, an image that cannot be decoded whole or holds several values per voxel, before anything is
    written: a gzip file is decompressed to its end (a truncated ``.nii.gz`` otherwise reads as a mostly-zero
    array), and where the dataset reads with SimpleITK its header must open and hold one value per voxel (a vector
    image would be read with its first axis as the channels)."""
    import gzip
    import zlib

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    for path in image_files:
        if path.endswith(".gz"):
            try:
                with gzip.open(path, "rb") as f:
                    while f.read(1 << 24):
                        pass
            except (OSError, EOFError, zlib.error) as error:
                raise SemiInputError(f"{path}: the file is truncated or corrupt ({error}). Replace it with a complete "
                                     f"image or remove it.") from None
        reader = determine_reader_writer_from_dataset_json(dataset_json, path, verbose=False)
        if "SimpleITK" not in reader.__name__:
            continue
        import SimpleITK as sitk

        info = sitk.ImageFileReader()
        info.SetFileName(path)
        try:
            info.ReadImageInformation()
        except RuntimeError as error:
            raise SemiInputError(f"{path}: not a readable {dataset_json['file_ending']} image "
                                 f"({str(error).strip().splitlines()[-1]}). Replace or remove it.") from None
        if info.GetNumberOfComponents() > 1:
            raise SemiInputError(
                f"{path}: {info.GetNumberOfComponents()} values per voxel (a vector image); the dataset reads one "
                f"channel per file ({len(dataset_json['channel_names'])} channel(s): _0000, _0001, ...). Store each "
                f"channel in its own file as in imagesTr.")


def _preprocess_case(output_truncated: str, image_files: list[str], plans: dict, configuration: str,
                     dataset_json: dict, dataset_is_2d: bool | None) -> str:
    """Runs in a worker: read, check and preprocess one unlabeled case with the plans' preprocessor class."""
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    num_channels = len(dataset_json["channel_names"])

    class UnlabeledCasePreprocessor(configuration_manager.preprocessor_class):
        # Hooks around nnU-Net's own run_case_npy: check the raw array first, then mark the case as having no
        # foreground locations (nnU-Net's loader reads the key; empty means "never oversample foreground here").
        def run_case_npy(self, data, seg, properties, *args, **kwargs):
            check_raw_image(data, image_files, num_channels, dataset_is_2d)
            data, seg, properties = super().run_case_npy(data, seg, properties, *args, **kwargs)
            properties["class_locations"] = {}
            return data, seg, properties

    try:
        UnlabeledCasePreprocessor(verbose=False).run_case_save(
            output_truncated, image_files, None, plans_manager, configuration_manager, dataset_json)
    except SemiInputError:
        raise
    except Exception as e:  # reader errors on corrupt files carry no file name; add it, keep the cause
        raise SemiInputError(
            f"{', '.join(image_files)}: could not be read or preprocessed ({type(e).__name__}: {e}). "
            f"Check that the file is a valid {dataset_json['file_ending']} image, or remove it."
        ) from None
    return output_truncated


_CASE_FILE_SUFFIXES = ("_seg.b2nd", ".b2nd", ".pkl")  # "_seg.b2nd" before ".b2nd" so that suffix matching is exact


def _case_is_complete(folder: str, case_id: str) -> bool:
    return all(isfile(join(folder, case_id + s)) for s in _CASE_FILE_SUFFIXES)


def _remove_case(folder: str, case_id: str) -> None:
    for s in _CASE_FILE_SUFFIXES:
        if isfile(join(folder, case_id + s)):
            os.remove(join(folder, case_id + s))


_PREPROCESSING_SETTINGS = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes",
                           "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs",
                           "resampling_fn_seg", "resampling_fn_seg_kwargs")


def _preprocessing_identity(plans: dict, configuration: str, dataset_json: dict) -> dict:
    """Everything that changes a preprocessed array (not the network or batch): a mismatch means stale cases."""
    settings = PlansManager(plans).get_configuration(configuration).configuration
    return {
        "configuration_settings": {k: settings.get(k) for k in _PREPROCESSING_SETTINGS},
        "transpose_forward": plans["transpose_forward"],
        "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"],
        "image_reader_writer": plans.get("image_reader_writer"),
        "channel_names": dataset_json["channel_names"],
    }


def unlabeled_preprocessing_is_current(folder: str, plans: dict, configuration: str, dataset_json: dict) -> bool:
    """Whether ``folder`` was preprocessed with these plans (False if it records other plans or none)."""
    identity_file = join(folder, _IDENTITY_FILE)
    return isfile(identity_file) and load_json(identity_file) == \
        _preprocessing_identity(plans, configuration, dataset_json)


def unlabeled_case_folders(labeled_folder: str, splits_file: str, fold: int | str, raw_dataset_folder: str,
                           plans: dict, configuration: str, dataset_json: dict) -> dict[str, str]:
    """Case id -> preprocessed folder of every unlabeled case of a fold: the one answer to "which cases are
    unlabeled", read by the trainers.

    Those are the fold's ``unlabeled`` split entry (cases of the labeled folder whose labels are never read, written
    by ``nnUNetv2_semi_split``) plus every preprocessed ``imagesUnlabeled`` case; in fold ``all``, every labeled case
    plus ``imagesUnlabeled``.

    Args:
        labeled_folder: the configuration's preprocessed folder (``nnUNet_preprocessed/DatasetXXX/<identifier>``).
        splits_file: the dataset's ``splits_final.json`` (absent: no split entry).
        fold: the fold index, or "all".
        raw_dataset_folder: ``nnUNet_raw/DatasetXXX`` (its ``imagesUnlabeled`` without preprocessing is an error).
        plans, configuration, dataset_json: what the unlabeled preprocessing must have been done with.

    Raises:
        RuntimeError: unlabeled images not preprocessed, or preprocessed with other plans, or no unlabeled case at
            all; each names the command that fixes it.
    """
    dataset_name, plans_name = plans["dataset_name"], plans["plans_name"]
    # the labeled folder's storage format is that of the unlabeled one (which also holds our identity file, so
    # nnU-Net's inference from file endings cannot be run on it)
    dataset_class = infer_dataset_class(labeled_folder)
    pool = {}
    if fold == "all":
        pool.update({c: labeled_folder for c in dataset_class.get_identifiers(labeled_folder)})
    elif isfile(splits_file):
        splits = load_json(splits_file)
        if fold < len(splits):
            pool.update({c: labeled_folder for c in splits[fold].get(UNLABELED_KEY, [])})
    unlabeled_folder = labeled_folder + UNLABELED_SUFFIX
    raw_unlabeled = join(raw_dataset_folder, UNLABELED_IMAGES_FOLDER)
    if isdir(unlabeled_folder):
        if not unlabeled_preprocessing_is_current(unlabeled_folder, plans, configuration, dataset_json):
            raise RuntimeError(
                f"{unlabeled_folder} was preprocessed with other plans than {plans_name} now holds. Run "
                f"nnUNetv2_semi_preprocess -d {dataset_name} -c {configuration} -plans_name {plans_name} again.")
        pool.update({c: unlabeled_folder for c in dataset_class.get_identifiers(unlabeled_folder)})
        if isdir(raw_unlabeled):  # the pool is exactly the folder: a case added or removed since is not trained on
            raw_cases = set(find_unlabeled_cases(raw_unlabeled, dataset_json["file_ending"],
                                                 len(dataset_json["channel_names"])))
            preprocessed = set(dataset_class.get_identifiers(unlabeled_folder))
            if raw_cases != preprocessed:
                added, removed = sorted(raw_cases - preprocessed), sorted(preprocessed - raw_cases)
                raise RuntimeError(
                    f"{raw_unlabeled} and its preprocessed copy {unlabeled_folder} differ: {len(added)} case(s) not "
                    f"preprocessed ({', '.join(added[:5]) or 'none'}), {len(removed)} no longer in imagesUnlabeled "
                    f"({', '.join(removed[:5]) or 'none'}). Run nnUNetv2_semi_preprocess -d {dataset_name} -c "
                    f"{configuration} -plans_name {plans_name} again.")
    elif isdir(raw_unlabeled):
        raise RuntimeError(f"{raw_unlabeled} exists but {unlabeled_folder} does not. Run nnUNetv2_semi_preprocess "
                           f"-d {dataset_name} -c {configuration} first.")
    if not pool:
        raise RuntimeError(
            f"no unlabeled cases for fold {fold}: add image-only cases to imagesUnlabeled and run "
            f"nnUNetv2_semi_preprocess, or declare a labeled subset with nnUNetv2_semi_split.")
    return pool


def _dataset_is_2d(preprocessed_dataset_folder: str) -> bool | None:
    fingerprint_file = join(preprocessed_dataset_folder, "dataset_fingerprint.json")
    if not isfile(fingerprint_file):
        return None
    shapes = load_json(fingerprint_file).get("shapes_after_crop")
    return all(s[0] == 1 for s in shapes) if shapes else None


def _run_jobs(jobs: list[tuple], num_processes: int, description: str) -> None:
    if num_processes <= 1 or len(jobs) <= 1:
        for job in tqdm(jobs, desc=description):
            _preprocess_case(*job)
        return
    # spawn, as nnU-Net's own preprocessing: forking a process that holds torch state is unsafe
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        results = [pool.apply_async(_preprocess_case, job) for job in jobs]
        for r in tqdm(results, desc=description):
            r.get()


def preprocess_unlabeled(dataset_name_or_id: int | str, configurations: list[str] | tuple[str, ...],
                         num_processes: int = default_num_processes, plans_identifier: str = "nnUNetPlans",
                         ) -> dict[str, str]:
    """Preprocess ``imagesUnlabeled`` with the dataset's existing plans (``nnUNetv2_semi_preprocess``).

    Every input is checked before anything is written; cases are preprocessed into a staging folder and moved into
    place only when all of them succeeded, so a failure leaves the output folder as it was. Cases already
    preprocessed with identical plans are skipped; if the plans changed, all cases are preprocessed again.

    Args:
        dataset_name_or_id: dataset id (``101``) or name (``Dataset101_Name``).
        configurations: plans configurations, e.g. ``["3d_fullres"]``.
        num_processes: worker processes (1 or less: in this process).
        plans_identifier: plans name, as nnU-Net's ``-plans_name``.

    Returns:
        configuration -> output folder.
    """
    dataset_name = resolve_dataset_name(dataset_name_or_id)
    raw_folder = join(require_env_folder("nnUNet_raw"), dataset_name)
    preprocessed_folder = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    plans = load_plans(dataset_name, plans_identifier)
    for configuration in configurations:
        check_configuration(plans, configuration, join(preprocessed_folder, plans_identifier + ".json"))
    dataset_json_file = join(preprocessed_folder, "dataset.json")
    if not isfile(dataset_json_file):
        raise SemiInputError(f"{dataset_json_file} not found. Run nnUNetv2_plan_and_preprocess for {dataset_name}.")
    dataset_json = load_json(dataset_json_file)

    images_folder = join(raw_folder, UNLABELED_IMAGES_FOLDER)
    cases = find_unlabeled_cases(images_folder, dataset_json["file_ending"], len(dataset_json["channel_names"]))
    clashes = sorted(set(cases) & set(labeled_case_ids(raw_folder, dataset_json)))
    if clashes:
        raise SemiInputError(
            f"unlabeled case id(s) {clashes} in {images_folder} are also labeled training cases in imagesTr. "
            f"Give the unlabeled images distinct case ids."
        )
    dataset_is_2d = _dataset_is_2d(preprocessed_folder)

    outputs = {}
    for configuration in configurations:
        out = unlabeled_preprocessed_folder(dataset_name, plans, configuration)
        outputs[configuration] = out
        identity = _preprocessing_identity(plans, configuration, dataset_json)
        identity_file = join(out, _IDENTITY_FILE)
        stale = isdir(out) and (not isfile(identity_file) or load_json(identity_file) != identity)
        if stale:
            print(f"{configuration}: the plans changed since {out} was written; "
                  "preprocessing all unlabeled cases again.")
        todo = sorted(c for c in cases if stale or not _case_is_complete(out, c))
        removed = sorted(set(_preprocessed_case_ids(out)) - set(cases)) if isdir(out) else []
        print(f"{configuration}: {len(cases)} unlabeled case(s), {len(cases) - len(todo)} already preprocessed, "
              f"{len(todo)} to do" + (f", {len(removed)} removed from imagesUnlabeled" if removed else "")
              + f" -> {out}")
        for case_id in todo:  # every file decodes whole, before anything is written
            check_image_files(cases[case_id], dataset_json)
        if not todo and not stale:
            for case_id in removed:  # the pool is exactly the folder
                _remove_case(out, case_id)
            continue
        staging = join(out, _STAGING_FOLDER)
        created_out = not isdir(out)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        jobs = [(join(staging, c), cases[c], plans, configuration, dataset_json, dataset_is_2d)
                for c in todo]
        try:
            _run_jobs(jobs, num_processes, f"Preprocessing unlabeled cases ({configuration})")
        except BaseException:
            shutil.rmtree(out if created_out else staging, ignore_errors=True)
            raise
        _commit_staging(out, staging, todo, cases, stale)
        save_json_atomic(identity, identity_file)
    return outputs


def _preprocessed_case_ids(folder: str) -> list[str]:
    """The case ids with any preprocessed file in ``folder``."""
    return sorted({name[:-len(s)] for name in os.listdir(folder) for s in _CASE_FILE_SUFFIXES if name.endswith(s)
                   and not name[:-len(s)].endswith("_seg")})


def _commit_staging(out: str, staging: str, done: list[str], cases: dict, stale: bool) -> None:
    """Move the finished cases into place and drop outputs of cases no longer in imagesUnlabeled."""
    for name in os.listdir(out):
        case_id = next((name[:-len(s)] for s in _CASE_FILE_SUFFIXES if name.endswith(s)), None)
        if case_id is not None and (stale or case_id not in cases):
            _remove_case(out, case_id)
    for case_id in done:
        for s in _CASE_FILE_SUFFIXES:
            os.replace(join(staging, case_id + s), join(out, case_id + s))
    shutil.rmtree(staging)
