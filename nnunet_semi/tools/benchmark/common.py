"""Shared pieces of the benchmarks: trainers on a given schedule, provenance, device choice, the registered
methods and the generated tiny dataset."""

from __future__ import annotations

import json
import os
import random
import subprocess
from datetime import datetime, timezone
from os.path import dirname, join

import numpy as np
import torch

import nnunet_semi
from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.progress import EpochProgressFile

BASELINE_TRAINER = "nnUNetTrainer"
# stock nnU-Net warm-started exactly as the methods are: the baseline of the warm-start mode
CONTROL_TRAINER = "nnUNetTrainer_warmStart"
SELFTRAIN = "selftrain"  # offline self-training in the trainer list: stock teacher, pseudo labels, stock student
TINY_DATASET_ID = 994


def resolve_trainer(name: str) -> type:
    """A trainer class by name: the plugin's, then nnU-Net's own (and ``nnUNet_extTrainer``'s); an unknown name is a
    one-line ``SemiInputError``."""
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnunet_semi.methods

    if hasattr(nnunet_semi.methods, name):
        return getattr(nnunet_semi.methods, name)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every folder it searches
            found = recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        found = None
    if found is None:
        raise SemiInputError(f"-tr {name}: no such trainer (neither the plugin's, e.g. {', '.join(semi_trainers())}, "
                             f"nor nnU-Net's, nor one in nnUNet_extTrainer).")
    return found


def with_schedule(trainer_cls: type, epochs: int, iterations: int, val_iterations: int, tag: str,
                  rampup_iterations: int | None = None, seed: int | None = None,
                  checkpoint_every: int | None = None, warm_start: tuple[str, str | None] | None = None) -> type:
    """A subclass of ``trainer_cls`` that trains ``epochs`` x ``iterations`` and is named ``<Trainer>__<tag>``.

    The name keeps the results folders of different schedules and labeled counts apart. Works for stock trainers
    (which set their schedule in ``__init__``) and for the plugin's (class attributes) alike.

    Args:
        rampup_iterations: the unsupervised ramp length in steps for every semi-supervised trainer (None: each
            method's own); stock nnU-Net has no ramp and ignores it.
        seed: seeds Python, NumPy and torch before the trainer is built (network initialisation, sampling in this
            process; nnU-Net's augmentation workers draw their own seeds).
        checkpoint_every: write ``checkpoint_latest.pth`` every this many epochs (None: nnU-Net's 50), so that a short
            run that is killed resumes near where it stopped.
        warm_start: (checkpoint, peer checkpoint or None): the run starts from them (``WarmStart``: every layer, the
            same loading as ``-pretrained_weights``) unless it resumes; None: from scratch.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        trainer_cls.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch = epochs, iterations
        self.num_val_iterations_per_epoch = val_iterations
        if checkpoint_every is not None:
            self.save_every = checkpoint_every

    attributes = {"__init__": __init__, "__module__": __name__}
    if rampup_iterations is not None:
        attributes["unsup_rampup_iterations"] = rampup_iterations
    if warm_start is not None:
        attributes["warm_start_checkpoint"], attributes["peer_warm_start_checkpoint"] = warm_start
    # the progress display follows its epochs (progress.jsonl in the output folder)
    return type(f"{trainer_cls.__name__}__{tag}", (EpochProgressFile, trainer_cls), attributes)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    return f"cpu ({os.cpu_count()} cores)"


def code_commit() -> str:
    """The commit of the code that runs: git's short hash, ``<sha>-dirty`` when the package's tracked files
    (``nnunet_semi/``, ``trainers/``, ``pyproject.toml``) differ from it; else ``$NNUNET_SEMI_COMMIT`` (a checkout
    copied without its .git, e.g. to an offline GPU machine), else "unknown". Result folders inside the checkout do
    not count: the code is what a row's numbers depend on."""
    root = dirname(dirname(nnunet_semi.__file__))

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)

    try:
        commit = git("rev-parse", "--short", "HEAD").stdout.strip()
        if commit and git("diff", "--quiet", "HEAD", "--", "nnunet_semi", "trainers", "pyproject.toml").returncode:
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get("NNUNET_SEMI_COMMIT") or "unknown"


def provenance(device: torch.device) -> dict:
    """Commit (``code_commit``), versions, device and time of a benchmark run."""
    from importlib.metadata import version

    commit = code_commit()
    return {"commit": commit, "nnunet_semi": nnunet_semi.__version__, "nnunetv2": version("nnunetv2"),
            "torch": torch.__version__, "device": device_description(device),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def load_plans_and_dataset_json(preprocessed_dataset: str, plans_identifier: str) -> tuple[dict, dict]:
    with open(join(preprocessed_dataset, plans_identifier + ".json")) as f:
        plans = json.load(f)
    with open(join(preprocessed_dataset, "dataset.json")) as f:
        dataset_json = json.load(f)
    return plans, dataset_json


def semi_trainers() -> list[str]:
    """Every registered method (variants excluded): adding a trainer to nnunet_semi.methods adds it here."""
    import nnunet_semi.methods

    return [n for n in nnunet_semi.methods.__all__ if "_" not in n]


def make_tiny_dataset(root: str) -> str:
    """A generated, planned and preprocessed dataset with a tiny network; exports the nnU-Net path variables."""
    from nnunet_semi.data.dataset_io import use_nnunet_folders
    from nnunet_semi.data.unlabeled import preprocess_unlabeled
    from nnunet_semi.tools.demo import write_demo_plans
    from nnunet_semi.tools.synthetic import make_synthetic_dataset, plan_and_preprocess

    paths = use_nnunet_folders(root)
    raw = join(paths["nnUNet_raw"], f"Dataset{TINY_DATASET_ID}_SemiTiny")
    preprocessed = join(paths["nnUNet_preprocessed"], os.path.basename(raw))
    if os.path.isfile(join(preprocessed, "nnUNetDemoPlans.json")):
        return raw  # made by an earlier run in the same folder
    make_synthetic_dataset(paths["nnUNet_raw"], TINY_DATASET_ID, name="SemiTiny", num_labeled=8, num_unlabeled=4,
                           num_test=4, shape=(24, 24, 24), seed=7)
    plan_and_preprocess(TINY_DATASET_ID, check_dataset_integrity=False)
    write_demo_plans(preprocessed, features=(4, 8, 16))
    preprocess_unlabeled(TINY_DATASET_ID, ["3d_fullres"], num_processes=1, plans_identifier="nnUNetDemoPlans")
    return raw
