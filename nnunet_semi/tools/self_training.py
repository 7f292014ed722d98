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
import sys
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


def _initialize_with_class(predictor, trainer_class: type, model_folder: str, folds: tuple, checkpoint: str) -> None:
    """``nnUNetPredictor.initialize_from_trained_model_folder`` with the network built by ``trainer_class``."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(join(model_folder, "plans.json"))
    dataset_json = load_json(join(model_folder, "dataset.json"))
    checkpoints = [torch.load(join(model_folder, f"fold_{f}", checkpoint), map_location="cpu", weights_only=False)
                   for f in folds]
    configuration = plans_manager.get_configuration(checkpoints[0]["init_args"]["configuration"])
    network = trainer_class.build_network_architecture(
        plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    predictor.manual_initialization(network, plans_manager, configuration, [c["network_weights"] for c in checkpoints],
                                    dataset_json, trainer_class.__name__,
                                    checkpoints[0]["inference_allowed_mirroring_axes"])


def pseudolabel_dataset(source: int | str, trainer: str, configuration: str, new_id: int, new_name: str, *,
                        plans: str = "nnUNetPlans", fold: int = 0, folds: tuple[int | str, ...] | None = None,
                        sources: tuple[str, ...] = SOURCES, voxel_threshold: float = 0.9,
                        case_threshold: float = 0.0, mask_uncertain: bool = True, copy_images: bool = False,
                        checkpoint: str = "checkpoint_final.pth", device: str = "cpu", use_mirroring: bool = True,
                        num_processes: int = 1, model_folder: str | None = None,
                        trainer_class: type | None = None, splits_file: str | None = None) -> dict:
    """Write ``Dataset<new_id>_<new_name>`` in nnUNet_raw: the source's fold ``fold`` with its unlabeled cases
    pseudo-labeled by the trained model ``trainer__plans__configuration`` of the source dataset (its ``folds``, all
    by default), or by the model in ``model_folder`` (a student trained on an earlier derived dataset).
    ``trainer_class`` builds the network where nnU-Net cannot find the checkpoint's trainer by name (the
    benchmark's scheduled classes). ``splits_file``: the split whose fold ``fold`` is read (default the source's
    ``splits_final.json``; the benchmark passes its own copy).

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
    model_folder = model_folder or join(require_env_folder("nnUNet_results"), name,
                                        f"{trainer}__{plans}__{configuration}")
    use_folds = _model_folds(model_folder, folds, checkpoint)
    splits_file = splits_file or join(require_env_folder("nnUNet_preprocessed"), name, "splits_final.json")
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
        if trainer_class is None:  # nnU-Net finds the trainer by the name in the checkpoint
            predictor.initialize_from_trained_model_folder(model_folder, use_folds, checkpoint)
        else:
            _initialize_with_class(predictor, trainer_class, model_folder, use_folds, checkpoint)
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
        # the student's split, fold 0: the same validation cases, trained on the labeled and the kept pseudo-labeled
        # ones; fold 1: the labeled cases alone, for fine-tuning the student (nnUNetv2_semi_selftrain --finetune)
        save_json_atomic([{"train": sorted(split["train"] + kept), "val": sorted(split["val"])},
                          {"train": sorted(split["train"]), "val": sorted(split["val"])}],
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


def run_logged(command: list[str], log_file: str) -> None:
    """Run one nnU-Net command, printing it and appending it and its output to ``log_file``."""
    import subprocess

    line = " ".join(command)
    print(f"$ {line}", flush=True)
    with open(log_file, "a") as log:
        log.write(f"$ {line}\n")
        log.flush()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SemiInputError(f"'{line}' failed (exit code {result.returncode}); its output is in {log_file}. Run the "
                             f"same command again to resume from this step.")


def _check_nnunet_finds(trainer: str, option: str) -> None:
    """``nnUNetv2_train -tr trainer`` would find the class (nnU-Net's lookup, ``nnUNet_extTrainer`` included), else
    a one-line ``SemiInputError`` before anything runs."""
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            found = recursive_find_trainer_class_by_name(trainer)
    except RuntimeError:
        found = None
    if found is None:
        raise SemiInputError(f"{option} {trainer}: nnUNetv2_train finds no such trainer (a plugin trainer needs "
                             f'export nnUNet_extTrainer="$(nnUNetv2_semi_trainer_dir)").')


def _train_command(dataset: int | str, configuration: str, fold: int, trainer: str, plans: str, device: str,
                   output_folder: str, pretrained_weights: str | None = None) -> list[str] | None:
    """nnUNetv2_train for a run, ``--c`` when a checkpoint is there to resume (nnU-Net refuses ``--c`` with
    ``-pretrained_weights``: the weights are only loaded at the start); None when it has finished."""
    if isfile(join(output_folder, "checkpoint_final.pth")):
        return None
    resume = any(isfile(join(output_folder, n)) for n in ("checkpoint_latest.pth", "checkpoint_best.pth"))
    start = ["--c"] if resume else [] if pretrained_weights is None else ["-pretrained_weights", pretrained_weights]
    # a warm start loads every layer, output layers included (warm_train: nnUNetv2_train so, for any trainer)
    command = ["nnUNetv2_train"] if pretrained_weights is None else \
        [sys.executable, "-m", "nnunet_semi.tools.warm_train"]
    return command + [str(dataset), configuration, str(fold), "-tr", trainer, "-p", plans, "-device", device] + start


def prepare_student_dataset(source_name: str, dataset_id: int, plans: str, configuration: str,
                            num_processes: int, run) -> None:
    """Plan and preprocess a derived raw dataset (``pseudolabel_dataset``) with the source's plans, and give it the
    student's split; skipped when its ``splits_final.json`` is there, each finished step skipped on a rerun.

    ``run(command)`` runs one nnU-Net command (a list) and raises when it fails. The plans are moved with
    ``nnUNetv2_move_plans_between_datasets``, so the student keeps the teacher's architecture and normalization.
    """
    dataset_name = resolve_dataset_name(dataset_id)
    target = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    if isfile(join(target, "splits_final.json")):
        return
    raw = join(require_env_folder("nnUNet_raw"), dataset_name)
    if not isfile(join(target, "dataset_fingerprint.json")):
        run(["nnUNetv2_extract_fingerprint", "-d", str(dataset_id), "-np", str(num_processes)])
    run(["nnUNetv2_move_plans_between_datasets", "-s", source_name, "-t", str(dataset_id), "-sp", plans,
         "-tp", plans])
    # nnU-Net's planner copies dataset.json beside the plans, and nnUNetv2_preprocess reads it from there; moved
    # plans skip the planner
    shutil.copy(join(raw, "dataset.json"), join(target, "dataset.json"))
    run(["nnUNetv2_preprocess", "-d", str(dataset_id), "-plans_name", plans, "-c", configuration, "-np",
         str(num_processes)])
    # last, so that a split file says the dataset is ready to train on
    shutil.copy(join(raw, DERIVED_SPLIT), join(target, "splits_final.json"))


def self_train(source: int | str, teacher: str, first_id: int, name: str, *, rounds: int = 1,
               configuration: str = "3d_fullres", plans: str = "nnUNetPlans", fold: int = 0,
               student: str = "nnUNetTrainer", finetune: str | None = None, voxel_threshold: float = 0.9,
               case_threshold: float = 0.0, device: str = "cpu", use_mirroring: bool = True,
               num_processes: int = 1) -> list[str]:
    """Offline self-training with plain nnU-Net commands, resumable at every step (``nnUNetv2_semi_selftrain``).

    Round r (1 to ``rounds``): the teacher (round 1: ``teacher`` trained on the source's fold ``fold``, trained
    here if it has not finished; later: the previous round's model) pseudo-labels the fold's unlabeled cases into
    ``Dataset<first_id + r - 1>_<name>_round<r>``; that dataset is planned with the source's plans (nnU-Net's
    ``nnUNetv2_move_plans_between_datasets``: the student keeps the teacher's architecture and normalization),
    preprocessed, given the student's split, and ``student`` trains on it (fold 0). With ``finetune`` (a trainer,
    e.g. ``nnUNetTrainer_50epochs``), the student is then fine-tuned on the labeled cases alone (the derived
    dataset's fold 1) with nnU-Net's ``-pretrained_weights``, and the fine-tuned model is the round's model. A step
    whose output exists is skipped; an interrupted training resumes with ``--c``. Every command is printed and
    logged to ``nnUNet_results/<source>/selftrain_<name>.log``.

    Returns:
        the model folders of the rounds (the fine-tuned ones with ``finetune``), one per round.
    """
    if rounds < 1:
        raise SemiInputError(f"--rounds {rounds}: give at least 1.")
    if first_id + rounds - 1 > 999:
        raise SemiInputError(f"-o_id {first_id} with --rounds {rounds}: round {rounds} would need dataset id "
                             f"{first_id + rounds - 1}; nnU-Net dataset ids end at 999.")
    if finetune is not None and finetune == student:
        raise SemiInputError(f"--finetune {finetune}: the student's trainer; give another one (e.g. "
                             f"nnUNetTrainer_50epochs), so that the fine-tuned model has a folder of its own.")
    source_name = resolve_dataset_name(source)
    results = require_env_folder("nnUNet_results")
    raw_root = require_env_folder("nnUNet_raw")
    for option, trainer in (("-tr", teacher), ("--student", student), ("--finetune", finetune)):
        if trainer is not None:
            _check_nnunet_finds(trainer, option)
    log_file = join(results, source_name, f"selftrain_{name}.log")
    os.makedirs(join(results, source_name), exist_ok=True)

    def run(command: list[str]) -> None:
        run_logged(command, log_file)

    teacher_folder = join(results, source_name, f"{teacher}__{plans}__{configuration}")
    command = _train_command(source_name, configuration, fold, teacher, plans, device,
                             join(teacher_folder, f"fold_{fold}"))
    if command:
        run(command)
    teacher_folds: tuple = (fold,)
    models = []
    for round_index in range(1, rounds + 1):
        dataset_id = first_id + round_index - 1
        dataset_name = f"Dataset{dataset_id:03d}_{name}_round{round_index}"
        if not isfile(join(raw_root, dataset_name, "dataset.json")):
            print(f"round {round_index}: pseudo labels of {teacher_folder} -> {dataset_name}", flush=True)
            pseudolabel_dataset(source_name, teacher, configuration, dataset_id, f"{name}_round{round_index}",
                                plans=plans, fold=fold, folds=teacher_folds, voxel_threshold=voxel_threshold,
                                case_threshold=case_threshold, device=device, use_mirroring=use_mirroring,
                                num_processes=num_processes, model_folder=teacher_folder)
        prepare_student_dataset(source_name, dataset_id, plans, configuration, num_processes, run)
        student_folder = join(results, dataset_name, f"{student}__{plans}__{configuration}")
        command = _train_command(dataset_id, configuration, 0, student, plans, device, join(student_folder, "fold_0"))
        if command:
            run(command)
        teacher, teacher_folder, teacher_folds = student, student_folder, (0,)
        if finetune is not None:
            finetune_folder = join(results, dataset_name, f"{finetune}__{plans}__{configuration}")
            command = _train_command(dataset_id, configuration, 1, finetune, plans, device,
                                     join(finetune_folder, "fold_1"),
                                     pretrained_weights=join(student_folder, "fold_0", "checkpoint_final.pth"))
            if command:
                run(command)
            teacher, teacher_folder, teacher_folds = finetune, finetune_folder, (1,)
        models.append(teacher_folder)
    return models
