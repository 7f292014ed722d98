"""Export a trained model folder for vanilla nnU-Net (``nnUNetv2_semi_export``).

Every nnunet-semi trainer keeps the stock network in ``network_weights``, so a copy of the model folder whose
checkpoints name ``nnUNetTrainer`` and hold only what nnU-Net's predictor reads runs on an nnU-Net installation
without this plugin (``nnUNetv2_predict_from_modelfolder -m EXPORTED``). Which weights are deployed (teacher or
student) was decided at the end of training and is recorded in the exported ``semi_export.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from os.path import isdir, isfile, join

import torch

from nnunet_semi.errors import SemiInputError

# what nnUNetPredictor.initialize_from_trained_model_folder reads from a checkpoint
_PREDICTOR_KEYS = ("network_weights", "init_args", "inference_allowed_mirroring_axes")
_MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")


def export_vanilla(model_folder: str, output_folder: str,
                   checkpoint_names: tuple[str, ...] = ("checkpoint_final.pth", "checkpoint_best.pth")) -> list[str]:
    """Copy ``model_folder`` (``Trainer__Plans__Config``) to ``output_folder`` as an ``nnUNetTrainer`` model.

    Args:
        model_folder: trained model folder holding ``plans.json``, ``dataset.json`` and ``fold_*`` folders.
        output_folder: new folder (must not exist or be empty).
        checkpoint_names: checkpoint files to export from each fold, where present.

    Returns:
        The exported checkpoint files.
    """
    if not isfile(join(model_folder, "plans.json")):
        raise SemiInputError(f"{model_folder} is not a trained nnU-Net model folder (no plans.json).")
    folds = sorted(f for f in os.listdir(model_folder) if f.startswith("fold_") and isdir(join(model_folder, f)))
    sources = [(f, c) for f in folds for c in checkpoint_names if isfile(join(model_folder, f, c))]
    if not sources:
        raise SemiInputError(f"no {' or '.join(checkpoint_names)} in the fold folders of {model_folder}. Train first.")
    if isdir(output_folder) and os.listdir(output_folder):
        raise SemiInputError(f"{output_folder} exists and is not empty. Choose a new output folder.")
    exported, provenance = [], {}
    os.makedirs(output_folder, exist_ok=True)
    for name in _MODEL_FILES:
        if isfile(join(model_folder, name)):
            shutil.copy(join(model_folder, name), join(output_folder, name))
    for fold, checkpoint_name in sources:
        checkpoint = torch.load(join(model_folder, fold, checkpoint_name), map_location="cpu", weights_only=False)
        vanilla = {k: checkpoint[k] for k in _PREDICTOR_KEYS} | {"trainer_name": "nnUNetTrainer"}
        os.makedirs(join(output_folder, fold), exist_ok=True)
        torch.save(vanilla, join(output_folder, fold, checkpoint_name))
        exported.append(join(output_folder, fold, checkpoint_name))
        provenance[f"{fold}/{checkpoint_name}"] = {
            "trained_with": checkpoint["trainer_name"],
            "deployed_weights": checkpoint.get("semi_state", {}).get("deployed_weights", "student"),
        }
    with open(join(output_folder, "semi_export.json"), "w") as f:
        json.dump(provenance, f, indent=4)
    return exported
