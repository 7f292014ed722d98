"""nnU-Net trainers of nnunet-semi (re-exported by ``trainers/`` for nnU-Net's ``nnUNet_extTrainer`` lookup)."""

from nnunet_semi.training.mean_teacher import (
    nnUNetTrainerMeanTeacher,
    nnUNetTrainerMeanTeacher_50epochs,
    nnUNetTrainerMeanTeacher_100epochs,
    nnUNetTrainerMeanTeacher_250epochs,
    nnUNetTrainerMeanTeacher_500epochs,
)

__all__ = [
    "nnUNetTrainerMeanTeacher",
    "nnUNetTrainerMeanTeacher_50epochs",
    "nnUNetTrainerMeanTeacher_100epochs",
    "nnUNetTrainerMeanTeacher_250epochs",
    "nnUNetTrainerMeanTeacher_500epochs",
]
