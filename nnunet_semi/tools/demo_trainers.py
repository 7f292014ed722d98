"""The short schedule of ``nnUNetv2_semi_demo``: stock nnU-Net and Mean Teacher with identical epochs/iterations."""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_semi.methods.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_semi.tools.progress import EpochProgressFile

__all__ = ["nnUNetTrainer_demo", "nnUNetTrainerMeanTeacher_demo"]  # what trainers/ re-exports

DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS = 20, 25, 5


class nnUNetTrainer_demo(EpochProgressFile, nnUNetTrainer):
    """Stock nnUNetTrainer (labeled cases only) on the demo schedule; its epochs on the demo's progress display."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = DEMO_EPOCHS
        self.num_iterations_per_epoch = DEMO_ITERATIONS
        self.num_val_iterations_per_epoch = DEMO_VAL_ITERATIONS


class nnUNetTrainerMeanTeacher_demo(EpochProgressFile, nnUNetTrainerMeanTeacher):
    """Mean Teacher on the demo schedule: 500 iterations, so the ramp and weight are scaled to show an effect (a
    quarter of the run, weight 1) instead of UA-MT's 0.1 over 6 000 iterations."""

    unsup_weight = 1.0
    unsup_rampup_iterations = DEMO_EPOCHS * DEMO_ITERATIONS // 4
    epochs = DEMO_EPOCHS
    iterations_per_epoch = DEMO_ITERATIONS
    val_iterations_per_epoch = DEMO_VAL_ITERATIONS
    deploy_selection_epochs = 5
