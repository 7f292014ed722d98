"""Offline self-training (Noisy Student, as nnU-Net users run it): a trained model pseudo-labels the unlabeled cases
into a new nnU-Net raw dataset that a student trains on with nnU-Net's own commands.

``pseudolabel_dataset`` (``nnUNetv2_semi_pseudolabel``) predicts a fold's unlabeled cases (the split's ``unlabeled``
cases and/or ``imagesUnlabeled``) with nnU-Net's predictor (a fold ensemble by default, with mirroring), keeps per
voxel the argmax where the ensemble's maximum probability reaches a threshold and writes nnU-Net's ignore label
elsewhere (the student's loss skips those voxels), scores every case, leaves out the cases below a confidence
threshold, and writes the derived dataset: the fold's labeled and validation cases unchanged, the pseudo-labeled ones
added. The fold's validation cases are never predicted. Everything is staged in a hidden folder and moved into
place at the end: a failed run leaves no dataset behind.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from os.path import isdir, isfile, join

import numpy as np

from nnunet_semi.data.dataset_io import (
    UNLABELED_IMAGES_FOLDER,
    labeled_case_ids,
    load_json,
    require_env_folder,
    resolve_dataset_name,
    save_json_atomic,
)
from nnunet_semi.data.splits import UNLABELED_KEY
from nnunet_semi.data.unlabeled import find_unlabeled_cases
from nnunet_semi.errors import SemiInputError

SOURCES = ("split", "imagesUnlabeled")
CASES_TABLE = "pseudolabel_cases.csv"
DERIVED_SPLIT = "splits_pseudolabel.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


def _check_arguments(new_id: int, new_name: str, voxel_threshold: float, case_threshold: float,
                     sources: tuple[str, ...]) -> None:
    for flag, value in (("--voxel_threshold", voxel_threshold), ("--case_threshold", case_threshold)):
        if not 0.0 <= value <= 1.0:
            raise SemiInputError(f"{flag} {value}: give a probability in [0, 1].")
    if not 1 <= new_id <= 999:
        raise SemiInputError(f"-o_id {new_id}: nnU-Net dataset ids are 1 to 999.")
    if not _NAME.fullmatch(new_name):
        raise SemiInputError(f"-o_name {new_name!r}: use letters, digits, '_' and '-' only (it becomes "
                             f"Dataset{new_id:03d}_{new_name}).")
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise SemiInputError(f"--sources {' '.join(sources)}: choose from {' '.join(SOURCES)}.")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        root = require_env_folder(variable)
        taken = [n for n in os.listdir(root) if n.startswith(f"Dataset{new_id:03d}_")]
        if taken:
            raise SemiInputError(f"-o_id {new_id}: {join(root, taken[0])} exists. Choose a free dataset id.")


def _model_folds(model_folder: str, folds: tuple[int | str, ...] | None, checkpoint: str) -> tuple:
    if not isdir(model_folder):
        raise SemiInputError(f"no trained model in {model_folder}: train it first (nnUNetv2_train) or check -tr, "
                             f"-p and -c.")
    available = tuple(int(n.removeprefix("fold_")) if n != "fold_all" else "all"
                      for n in sorted(os.listdir(model_folder))
                      if n.startswith("fold_") and isfile(join(model_folder, n, checkpoint)))
    if folds is None:
        if not available:
            raise SemiInputError(f"{model_folder} has no fold with {checkpoint}: the training has not finished "
                                 f"(nnUNetv2_train ... --c resumes it).")
        return available
    missing = [f for f in folds if f not in available]
    if missing:
        raise SemiInputError(f"{model_folder}: fold(s) {missing} have no {checkpoint} (folds with one: "
                             f"{list(available) or 'none'}).")
    return tuple(folds)


def _unlabeled_cases(raw: str, dataset_json: dict, split: dict, sources: tuple[str, ...]) -> dict[str, list[str]]:
    """Case id -> image files (one per channel) of the fold's unlabeled cases, validation cases excluded."""
    ending, channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    cases = {}
    if "split" in sources:
        for case in split.get(UNLABELED_KEY, []):
            cases[case] = [join(raw, "imagesTr", f"{case}_{c:04d}{ending}") for c in range(channels)]
    if "imagesUnlabeled" in sources and isdir(join(raw, UNLABELED_IMAGES_FOLDER)):
        for case, files in find_unlabeled_cases(join(raw, UNLABELED_IMAGES_FOLDER), ending, channels).items():
            if case in cases or case in split["train"] or case in split["val"]:
                raise SemiInputError(f"{UNLABELED_IMAGES_FOLDER}/{case}: the id is also a case of imagesTr; rename "
                                     f"one of them.")
            cases[case] = files
    for case in split["val"]:  # the evaluated fold's validation cases never become pseudo-labeled training data
        cases.pop(case, None)
    if not cases:
        raise SemiInputError(f"no unlabeled cases to pseudo-label from {' and '.join(sources)} (a split made by "
                             f"nnUNetv2_semi_split, or images in {UNLABELED_IMAGES_FOLDER}).")
    return cases


def pseudo_label(probabilities: np.ndarray, voxel_threshold: float, ignore_label: int | None
                 ) -> tuple[np.ndarray, float, float]:
    """The pseudo label of one case and its scores.

    Args:
        probabilities: (C, *spatial) ensemble probabilities (softmax, mutually exclusive classes).
        voxel_threshold: the argmax is kept where the maximum probability reaches it, else ``ignore_label``.
        ignore_label: the dataset's ignore label (None: no masking).

    Returns:
        labels (*spatial) uint8/int16, the case confidence (mean maximum probability over the voxels predicted
        foreground; over all voxels when none is), and the fraction of voxels set to the ignore label.
    """
    labels = probabilities.argmax(0)
    confidence_map = probabilities.max(0)
    foreground = labels > 0
    confidence = float(confidence_map[foreground].mean() if foreground.any() else confidence_map.mean())
    ignored = np.zeros_like(foreground)
    if ignore_label is not None:
        ignored = confidence_map < voxel_threshold
        labels = np.where(ignored, ignore_label, labels)
    dtype = np.uint8 if labels.max() < 256 else np.int16
    return labels.astype(dtype), confidence, float(ignored.mean())


def _place(source: str, destination: str, copy: bool) -> None:
    if copy:
        shutil.copy2(source, destination)
    else:
        os.symlink(os.path.abspath(source), destination)


def pseudolabel_dataset(source: int | str, trainer: str, configuration: str, new_id: int, new_name: str, *,
                        plans: str = "nnUNetPlans", fold: int = 0, folds: tuple[int | str, ...] | None = None,
                        sources: tuple[str, ...] = SOURCES, voxel_threshold: float = 0.9,
                        case_threshold: float = 0.0, mask_uncertain: bool = True, copy_images: bool = False,
                        checkpoint: str = "checkpoint_final.pth", device: str = "cpu", use_mirroring: bool = True,
                        num_processes: int = 1) -> dict:
    """Write ``Dataset<new_id>_<new_name>`` in nnUNet_raw: the source's fold ``fold`` with its unlabeled cases
    pseudo-labeled by the trained model ``trainer__plans__configuration`` (its ``folds``, all by default).

    Returns:
        ``{"dataset": folder, "kept": [...], "left_out": [...], "table": csv path}``.

    Raises:
        SemiInputError: thresholds outside [0, 1], a dataset id already used, a model without checkpoints, a
            region-based dataset, no unlabeled case; nothing is written then.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    _check_arguments(new_id, new_name, voxel_threshold, case_threshold, sources)
    name = resolve_dataset_name(source)
    raw = join(require_env_folder("nnUNet_raw"), name)
    dataset_json = load_json(join(raw, "dataset.json"))
    if any(isinstance(v, (list, tuple)) for v in dataset_json["labels"].values()):
        raise SemiInputError(f"{name} is region-based: pseudo labels here are defined on mutually exclusive classes.")
    model_folder = join(require_env_folder("nnUNet_results"), name, f"{trainer}__{plans}__{configuration}")
    use_folds = _model_folds(model_folder, folds, checkpoint)
    splits_file = join(require_env_folder("nnUNet_preprocessed"), name, "splits_final.json")
    if not isfile(splits_file):
        raise SemiInputError(f"{splits_file} does not exist: the fold's labeled, validation and unlabeled cases come "
                             f"from it (nnUNetv2_semi_split writes one).")
    splits = load_json(splits_file)
    if not 0 <= fold < len(splits):
        raise SemiInputError(f"--fold {fold}: {splits_file} has folds 0 to {len(splits) - 1}.")
    split = splits[fold]
    cases = _unlabeled_cases(raw, dataset_json, split, sources)

    labels = dict(dataset_json["labels"])
    ignore_label = None
    if mask_uncertain:
        ignore_label = labels.get("ignore", max(int(v) for v in labels.values()) + 1)
        labels["ignore"] = ignore_label
    ending = dataset_json["file_ending"]
    final = join(require_env_folder("nnUNet_raw"), f"Dataset{new_id:03d}_{new_name}")
    staging = join(require_env_folder("nnUNet_raw"), f".Dataset{new_id:03d}_{new_name}.incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        predictions = join(staging, ".predictions")
        os.makedirs(predictions)
        predictor = nnUNetPredictor(use_mirroring=use_mirroring, device=torch.device(device), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model_folder, use_folds, checkpoint)
        ids = sorted(cases)
        predictor.predict_from_files([cases[c] for c in ids], [join(predictions, c) for c in ids],
                                     save_probabilities=True, overwrite=True,
                                     num_processes_preprocessing=num_processes,
                                     num_processes_segmentation_export=num_processes)
        reader_writer = PlansManager(join(model_folder, "plans.json")).image_reader_writer_class()
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(join(staging, sub))
        labeled = sorted(set(split["train"]) | set(split["val"]))
        known = set(labeled_case_ids(raw, dataset_json))
        channels = len(dataset_json["channel_names"])
        for case in labeled:
            if case not in known:
                raise SemiInputError(f"{splits_file}: case {case} is not in {join(raw, 'imagesTr')}.")
            for c in range(channels):
                _place(join(raw, "imagesTr", f"{case}_{c:04d}{ending}"),
                       join(staging, "imagesTr", f"{case}_{c:04d}{ending}"), copy_images)
            _place(join(raw, "labelsTr", case + ending), join(staging, "labelsTr", case + ending), copy_images)
        rows, kept = [], []
        for case in ids:
            probabilities = np.load(join(predictions, case + ".npz"))["probabilities"]
            label, confidence, ignored = pseudo_label(probabilities, voxel_threshold, ignore_label)
            keep = confidence >= case_threshold
            rows.append({"case": case, "source": "split" if case in split.get(UNLABELED_KEY, []) else
                         UNLABELED_IMAGES_FOLDER, "confidence": f"{confidence:.4f}", "ignored_fraction":
                         f"{ignored:.4f}", "kept": int(keep)})
            if not keep:
                continue
            kept.append(case)
            for c, image in enumerate(cases[case]):
                _place(image, join(staging, "imagesTr", f"{case}_{c:04d}{ending}"), copy_images)
            reader_writer.write_seg(label, join(staging, "labelsTr", case + ending),
                                    load_pickle(join(predictions, case + ".pkl")))
        shutil.rmtree(predictions)
        if not kept:
            raise SemiInputError(f"--case_threshold {case_threshold}: no case reaches it (highest confidence "
                                 f"{max(float(r['confidence']) for r in rows):.3f}); nothing was written.")
        derived = {k: v for k, v in dataset_json.items() if k != "dataset"} | {
            "labels": labels, "numTraining": len(labeled) + len(kept),
            "semi_pseudolabel": {"source": name, "fold": fold, "model": model_folder, "folds": list(use_folds),
                                 "checkpoint": checkpoint, "voxel_threshold": voxel_threshold if mask_uncertain
                                 else None, "case_threshold": case_threshold, "sources": list(sources)}}
        save_json_atomic(derived, join(staging, "dataset.json"))
        # the student's split: the same validation cases, trained on the labeled and the kept pseudo-labeled ones
        save_json_atomic([{"train": sorted(split["train"] + kept), "val": sorted(split["val"])}],
                         join(staging, DERIVED_SPLIT))
        with open(join(staging, CASES_TABLE), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    left_out = [r["case"] for r in rows if not r["kept"]]
    return {"dataset": final, "kept": kept, "left_out": left_out, "table": join(final, CASES_TABLE)}
