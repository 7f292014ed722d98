"""A generated example dataset taken through the whole set-up (``nnUNetv2_semi_example``).

Writes a synthetic dataset with labeled, unlabeled and test cases, runs nnU-Net's own planning and preprocessing,
preprocesses the unlabeled images and declares a labeled subset, then prints the training commands.
"""

from __future__ import annotations

import os
import subprocess

from nnunet_semi.data.dataset_io import use_nnunet_folders
from nnunet_semi.data.splits import make_labeled_split
from nnunet_semi.data.unlabeled import preprocess_unlabeled
from nnunet_semi.tools.synthetic import make_synthetic_dataset

EXAMPLE_DATASET_ID = 991


def run_example(out_dir: str, num_processes: int = 2, num_labeled: int = 4) -> dict[str, str]:
    """Set up the example under ``out_dir``; returns the nnU-Net path variables to export."""
    paths = use_nnunet_folders(out_dir)
    make_synthetic_dataset(paths["nnUNet_raw"], EXAMPLE_DATASET_ID, name="SemiExample", num_labeled=12,
                           num_unlabeled=12, num_test=6, shape=(48, 48, 48), seed=0)
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(EXAMPLE_DATASET_ID), "-c", "3d_fullres", "-np",
                    str(num_processes), "--verify_dataset_integrity"], check=True, env=os.environ)
    preprocess_unlabeled(EXAMPLE_DATASET_ID, ["3d_fullres"], num_processes=num_processes)
    fold0 = make_labeled_split(EXAMPLE_DATASET_ID, num_labeled)[0]
    print(f"fold 0: {len(fold0['train'])} labeled, {len(fold0['unlabeled'])} training cases used as unlabeled, "
          f"{len(fold0['val'])} validation; plus 12 imagesUnlabeled cases")
    return paths
