"""Predicting and scoring a run: held-out cases, nnU-Net's predictor on a run's checkpoint, medpy's metrics per
case and class, the packed test predictions."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tarfile
from os.path import isdir, isfile, join

import numpy as np
import torch

from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.progress import CommandProgress

METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")


def require_medpy() -> None:
    """The quality benchmark scores with medpy, an optional dependency (the ``benchmark`` extra)."""
    import importlib.util

    if importlib.util.find_spec("medpy") is None:
        raise SemiInputError("the quality benchmark scores with medpy, which is not installed: "
                             "pip install 'nnunet-semi[benchmark]' (or pip install medpy).")


def case_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...], label: int) -> dict:
    """medpy's binary metrics of one class; distances NaN when either mask is empty (undefined)."""
    from medpy.metric import binary

    pred, ref = prediction == label, reference == label
    both_empty = not pred.any() and not ref.any()
    result = {"dice": 1.0 if both_empty else float(binary.dc(pred, ref)),
              "jaccard": 1.0 if both_empty else float(binary.jc(pred, ref))}
    for unit, voxelspacing in (("mm", spacing), ("vox", None)):
        defined = pred.any() and ref.any()
        result[f"hd95_{unit}"] = float(binary.hd95(pred, ref, voxelspacing)) if defined else math.nan
        result[f"asd_{unit}"] = float(binary.asd(pred, ref, voxelspacing)) if defined else math.nan
    return result


def scored_cases(raw: str, dataset_json: dict, split: dict, test_labels: str | None) -> dict[str, tuple]:
    """The cases a run is scored on, case id -> (image files, reference label file): the test cases (imagesTs with
    ``test_labels``) or, without them, the fold's validation cases (the development cases)."""
    ending = dataset_json["file_ending"]
    channels = len(dataset_json["channel_names"])
    if test_labels is not None:
        ids = sorted(f[:-len(ending)] for f in os.listdir(test_labels) if f.endswith(ending))
        folder, label_folder = join(raw, "imagesTs"), test_labels
    else:
        ids, folder, label_folder = sorted(split["val"]), join(raw, "imagesTr"), join(raw, "labelsTr")
    cases = {}
    for case in ids:
        images = [join(folder, f"{case}_{c:04d}{ending}") for c in range(channels)]
        missing = [f for f in images + [join(label_folder, case + ending)] if not isfile(f)]
        if missing:
            raise SemiInputError(f"scored case {case}: missing {missing}. Check --test_labels and imagesTs.")
        cases[case] = (images, join(label_folder, case + ending))
    return cases


def predict(trainer_cls: type, output_folder: str, plans: dict, configuration: str, dataset_json: dict,
             cases: dict, prediction_folder: str, device: torch.device, weights: dict | None = None,
             announce=None) -> None:
    """Predict ``cases`` (id -> (image files, ...)) into ``prediction_folder`` with nnU-Net's predictor, from the
    checkpoint's ``network_weights`` or from ``weights``; cases predicted earlier are kept. ``announce``: called
    with the number of cases left to predict, a context manager around their prediction (the progress line)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    checkpoint = final_checkpoint(output_folder)  # memory-mapped: a member given as weights reads none
    network = trainer_cls.build_network_architecture(
        plans_manager, cm, determine_num_input_channels(plans_manager, cm, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda",
                                allow_tqdm=False)
    weights = checkpoint["network_weights"] if weights is None else weights
    predictor.manual_initialization(network, plans_manager, cm, [weights], dataset_json,
                                    trainer_cls.__name__, checkpoint["inference_allowed_mirroring_axes"])
    os.makedirs(prediction_folder, exist_ok=True)
    todo = [c for c in cases if not isfile(join(prediction_folder, c + dataset_json["file_ending"]))]
    if todo:
        with announce(len(todo)) if announce is not None else contextlib.nullcontext():
            predictor.predict_from_files([cases[c][0] for c in todo], [join(prediction_folder, c) for c in todo],
                                         num_processes_preprocessing=1, num_processes_segmentation_export=1)


def final_checkpoint(output_folder: str) -> dict:
    """The run's ``checkpoint_final.pth``, memory-mapped: reading its logs or state touches no tensor data."""
    return torch.load(join(output_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False, mmap=True)


def deployed_model(output_folder: str) -> str:
    """What ``checkpoint_final.pth`` deploys: the semi-supervised trainers' choice, or ``network`` (stock)."""
    checkpoint = final_checkpoint(output_folder)
    return checkpoint.get("semi_state", {}).get("deployed_weights", "network")


def training_seconds(output_folder: str) -> float:
    """Seconds the run spent in its epochs (nnU-Net's logged epoch start and end times; a resumed run's epochs
    counted once each), from ``checkpoint_final.pth``."""
    logged = final_checkpoint(output_folder)["logging"]
    return float(sum(end - start for start, end in zip(logged["epoch_start_timestamps"],
                                                        logged["epoch_end_timestamps"])))


def score_run(cases: dict, prediction_folder: str, dataset_json: dict, labels: list[int], common: dict) -> list[dict]:
    """Rows of per-case, per-class metrics; images read with the dataset's own nnU-Net reader (e.g. NibabelIO where
    SimpleITK is missing), whose spacing follows its array axes."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    rows, reader = [], None
    for case, (_, label_file) in cases.items():
        reader = reader or determine_reader_writer_from_dataset_json(dataset_json, label_file, verbose=False)()
        reference, properties = reader.read_seg(label_file)
        prediction, _ = reader.read_seg(join(prediction_folder, case + dataset_json["file_ending"]))
        # (1, *spatial) -> spatial; a 2D image's added axis of size 1 is dropped, as medpy's surfaces need
        axes = [i for i, n in enumerate(reference.shape[1:]) if n > 1]
        reference, prediction = reference[0].squeeze(), prediction[0].squeeze()
        spacing = tuple(float(properties["spacing"][i]) for i in axes)
        for label in labels:
            rows.append({"trainer": common["trainer"], "num_labeled": common["num_labeled"], "case": case,
                         "class": label, **case_metrics(prediction, reference, spacing, label), **common})
    return rows


def announcer(progress: CommandProgress | None, position: int | None, what: str):
    """``predict``'s ``announce`` for run ``position`` of ``progress`` (None: nothing announced)."""
    return None if progress is None else functools.partial(progress.predicting, position, what=what)


def pack_test_predictions(trainer_cls: type, output_folder: str, plans: dict, configuration: str,
                           dataset_json: dict, raw: str, work_dir: str, archive: str, device: torch.device,
                           progress: CommandProgress | None = None, position: int | None = None) -> None:
    """Predict every ``imagesTs`` case (no labels needed) and pack the segmentations into ``archive`` (.tar.gz);
    the prediction announced on ``progress`` as run ``position``'s."""
    ending, channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    folder = join(raw, "imagesTs")
    if not isdir(folder):
        raise SemiInputError(f"--predict_test: {folder} does not exist; drop the option or add the test images.")
    ids = sorted({f[:-len(ending) - 5] for f in os.listdir(folder) if f.endswith(ending)})
    cases = {c: ([join(folder, f"{c}_{k:04d}{ending}") for k in range(channels)], None) for c in ids}
    predict(trainer_cls, output_folder, plans, configuration, dataset_json, cases, work_dir, device,
             announce=announcer(progress, position, "test images"))
    tmp = f"{archive}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w:gz") as tar:
        for c in ids:
            tar.add(join(work_dir, c + ending), arcname=c + ending)
    os.replace(tmp, archive)
