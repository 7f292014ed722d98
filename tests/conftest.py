"""Shared fixtures: nnU-Net folders under tmp_path and a tiny planned synthetic dataset.

Planning a dataset costs tens of seconds on 2 cores, so one dataset is planned per test session and each test gets
its own copy of the three nnU-Net folders.

Helpers that test modules import live in ``helpers.py``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DATASET_ID, DATASET_NAME, NNUNetFolders, plan_and_preprocess, point_nnunet_at, shrink_network


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch) -> NNUNetFolders:
    """Empty nnUNet_raw/preprocessed/results folders, exported for this test."""
    return point_nnunet_at(monkeypatch, tmp_path)


@pytest.fixture(scope="session")
def _planned_dataset_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planned")
    mp = pytest.MonkeyPatch()
    try:
        folders = point_nnunet_at(mp, root)
        from nnunet_semi.tools.synthetic import make_synthetic_dataset

        make_synthetic_dataset(str(folders.raw), DATASET_ID, num_labeled=6, num_unlabeled=3, num_test=2,
                               shape=(24, 24, 24), seed=1)
        plan_and_preprocess(DATASET_ID)
        shrink_network(folders.preprocessed / DATASET_NAME / "nnUNetPlans.json")
    finally:
        mp.undo()
    return root


@pytest.fixture
def planned_dataset(_planned_dataset_template, tmp_path, monkeypatch) -> NNUNetFolders:
    """A planned and preprocessed 3D binary dataset (6 labeled, 3 in imagesUnlabeled, 2 test), private copy."""
    root = tmp_path / "nnunet"
    shutil.copytree(_planned_dataset_template, root)
    return point_nnunet_at(monkeypatch, root)


@pytest.fixture
def semi_dataset(planned_dataset, monkeypatch) -> NNUNetFolders:
    """The planned dataset with a 2-labeled split and preprocessed imagesUnlabeled; single-threaded loading."""
    from nnunet_semi.data.splits import make_labeled_split
    from nnunet_semi.data.unlabeled import preprocess_unlabeled

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    make_labeled_split(DATASET_ID, 2)
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1)
    return planned_dataset
