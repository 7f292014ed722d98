"""Export a trained model folder for vanilla nnU-Net (``nnUNetv2_semi_export``).

A copy of the model folder whose checkpoints name ``nnUNetTrainer`` and hold only what nnU-Net's predictor reads
runs on an nnU-Net installation without this plugin (``nnUNetv2_predict_from_modelfolder -m EXPORTED``).

Single-network trainers keep the stock network in ``network_weights`` (teacher or student, decided at the end of
training). Dual-network trainers (``nnUNetTrainerDualCCE``) may deploy the ensemble of their two networks, which
vanilla nnU-Net cannot run: the export then takes one network, by default the one that validated better alone, and
when that is the peer it writes the peer's architecture into the exported ``plans.json``. What was exported is
recorded in ``semi_export.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from os.path import isdir, isfile, join

import torch

from nnunet_semi.errors import SemiInputError
from nnunet_semi.trainer.checkpoints import atomic_torch_save

# what nnUNetPredictor.initialize_from_trained_model_folder reads from a checkpoint
_PREDICTOR_KEYS = ("network_weights", "init_args", "inference_allowed_mirroring_axes")
_MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
SINGLE_NETWORK_CHOICES = ("best", "student", "peer")


def export_vanilla(model_folder: str, output_folder: str,
                   checkpoint_names: tuple[str, ...] = ("checkpoint_final.pth", "checkpoint_best.pth"),
                   single_network: str = "best") -> list[str]:
    """Copy ``model_folder`` (``Trainer__Plans__Config``) to ``output_folder`` as an ``nnUNetTrainer`` model.

    Args:
        model_folder: trained model folder holding ``plans.json``, ``dataset.json`` and ``fold_*`` folders.
        output_folder: new folder (must not exist or be empty).
        checkpoint_names: checkpoint files to export from each fold, where present.
        single_network: for dual-network models: ``"best"`` (per fold, the network that validated better alone,
            recorded in ``checkpoint_final.pth``; all folds must agree), ``"student"`` (network 1, the plans'
            architecture) or ``"peer"`` (network 2). Ignored for single-network models.

    Returns:
        The exported checkpoint files.
    """
    if single_network not in SINGLE_NETWORK_CHOICES:
        raise SemiInputError(f"single_network must be one of {SINGLE_NETWORK_CHOICES}, got {single_network!r}")
    if not isfile(join(model_folder, "plans.json")):
        raise SemiInputError(f"{model_folder} is not a trained nnU-Net model folder (no plans.json).")
    folds = sorted(f for f in os.listdir(model_folder) if f.startswith("fold_") and isdir(join(model_folder, f)))
    sources = [(f, c) for f in folds for c in checkpoint_names if isfile(join(model_folder, f, c))]
    if not sources:
        raise SemiInputError(f"no {' or '.join(checkpoint_names)} in the fold folders of {model_folder}. Train first.")
    if isdir(output_folder) and os.listdir(output_folder):
        raise SemiInputError(f"{output_folder} exists and is not empty. Choose a new output folder.")
    # memory-mapped: every fold's checkpoints are open at once (the choice of network spans folds), none is read
    # into RAM before it is written out
    checkpoints = {source: torch.load(join(model_folder, *source), map_location="cpu", weights_only=False,
                                      mmap=True) for source in sources}
    # what each checkpoint holds, as its trainer says (exportable_networks): one network, or several to choose from
    holdings = {source: _exportable(checkpoint) for source, checkpoint in checkpoints.items()}
    networks = _exported_networks(checkpoints, holdings, single_network)
    # one plans.json for every fold: the exported network's own architecture where it is not the plans' (the folds
    # export the same network, _exported_networks makes sure)
    architecture = next((holdings[s][networks[s[0]]][1] for s in checkpoints
                         if holdings[s][networks[s[0]]][1] is not None), None)

    exported, provenance = [], {}
    os.makedirs(output_folder, exist_ok=True)
    for name in _MODEL_FILES:
        if isfile(join(model_folder, name)):
            shutil.copy(join(model_folder, name), join(output_folder, name))
    if architecture is not None:
        _write_architecture(join(output_folder, "plans.json"), next(iter(checkpoints.values())), architecture)
    for (fold, checkpoint_name), checkpoint in checkpoints.items():
        vanilla = {k: checkpoint[k] for k in _PREDICTOR_KEYS} | {"trainer_name": "nnUNetTrainer"}
        held = holdings[(fold, checkpoint_name)]
        vanilla["network_weights"] = held[networks[fold]][0]
        os.makedirs(join(output_folder, fold), exist_ok=True)
        atomic_torch_save(vanilla, join(output_folder, fold, checkpoint_name))
        exported.append(join(output_folder, fold, checkpoint_name))
        semi_state = checkpoint.get("semi_state", {})
        provenance[f"{fold}/{checkpoint_name}"] = {
            "trained_with": checkpoint["trainer_name"],
            "deployed_weights": semi_state.get("deployed_weights", "student"),
        } | ({"exported_network": networks[fold]} if len(held) > 1 else {})
    with open(join(output_folder, "semi_export.json"), "w") as f:
        json.dump(provenance, f, indent=4)
    return exported


def _trainer_class(name: str) -> type | None:
    """The trainer class a checkpoint names: nnU-Net's lookup (``nnUNet_extTrainer`` included), else the plugin's
    class whose name the checkpoint's extends (a benchmark's scheduled ``<Trainer>__<tag>``, a subclass named
    ``<Trainer>Variant``); None when none is found."""
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnunet_semi.methods

    if hasattr(nnunet_semi.methods, name):
        return getattr(nnunet_semi.methods, name)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            found = recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        found = None
    if found is not None:
        return found
    extended = [n for n in nnunet_semi.methods.__all__ if name.startswith(n)]
    return getattr(nnunet_semi.methods, max(extended, key=len)) if extended else None


def _exportable(checkpoint: dict) -> dict[str, tuple[dict, dict | None]]:
    """Name -> (weights, architecture or None) of the single networks in a checkpoint (its trainer's
    ``exportable_networks``; a stock trainer's: its network)."""
    cls = _trainer_class(checkpoint["trainer_name"])
    if cls is None and "semi_state" in checkpoint:
        raise SemiInputError(f"the checkpoint's trainer {checkpoint['trainer_name']} cannot be found: set "
                             f'nnUNet_extTrainer="$(nnUNetv2_semi_trainer_dir)" (and the folder of your own '
                             f"trainers) so that nnU-Net finds it.")
    if cls is None or not hasattr(cls, "exportable_networks"):
        return {"network": (checkpoint["network_weights"], None)}
    return cls.exportable_networks(checkpoint)


def _exported_networks(checkpoints: dict, holdings: dict, single_network: str) -> dict[str, str]:
    """Fold -> the name of the network exported from it: the only one, ``single_network``, or under "best" the one
    its trainer records in checkpoint_final.pth (``default_export``); every fold must agree on one."""
    networks = {}
    for (fold, checkpoint_name), checkpoint in checkpoints.items():
        held = holdings[(fold, checkpoint_name)]
        if len(held) == 1:
            networks.setdefault(fold, next(iter(held)))
        elif single_network != "best":
            if single_network not in held:
                raise SemiInputError(f"--network {single_network}: {fold}/{checkpoint_name} holds "
                                     f"{', '.join(held)}.")
            networks[fold] = single_network
        elif checkpoint_name == "checkpoint_final.pth" or fold not in networks:
            # the choice is made at the end of training; a fold without checkpoint_final.pth exports its first
            networks[fold] = _trainer_class(checkpoint["trainer_name"]).default_export(checkpoint)
    chosen = {n for f, n in networks.items() if len(holdings[next(s for s in checkpoints if s[0] == f)]) > 1}
    if len(chosen) > 1:
        listing = ", ".join(f"{fold}: {network}" for fold, network in sorted(networks.items()))
        raise SemiInputError(f"the folds' better single networks differ ({listing}), and one exported plans.json can "
                             f"hold one architecture. Choose one for all folds: --network student or --network peer.")
    return networks


def _write_architecture(plans_file: str, checkpoint: dict, architecture: dict) -> None:
    """Make the exported plans build the peer's architecture for the trained configuration."""
    with open(plans_file) as f:
        plans = json.load(f)
    configuration = checkpoint["init_args"]["configuration"]
    plans["configurations"][configuration]["architecture"] = architecture
    with open(plans_file, "w") as f:
        json.dump(plans, f, indent=4)
