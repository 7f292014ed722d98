"""nnU-Net trainers of nnunet-semi (re-exported by ``trainers/`` for nnU-Net's ``nnUNet_extTrainer`` lookup)."""

from nnunet_semi.training.cps import (
    nnUNetTrainerCPS,
    nnUNetTrainerCPS_50epochs,
    nnUNetTrainerCPS_100epochs,
    nnUNetTrainerCPS_250epochs,
    nnUNetTrainerCPS_500epochs,
)
from nnunet_semi.training.demo import nnUNetTrainer_demo, nnUNetTrainerMeanTeacher_demo
from nnunet_semi.training.mean_teacher import (
    nnUNetTrainerMeanTeacher,
    nnUNetTrainerMeanTeacher_50epochs,
    nnUNetTrainerMeanTeacher_100epochs,
    nnUNetTrainerMeanTeacher_250epochs,
    nnUNetTrainerMeanTeacher_500epochs,
)

__all__ = [
    "nnUNetTrainerCPS",
    "nnUNetTrainerCPS_50epochs",
    "nnUNetTrainerCPS_100epochs",
    "nnUNetTrainerCPS_250epochs",
    "nnUNetTrainerCPS_500epochs",
    "nnUNetTrainerMeanTeacher",
    "nnUNetTrainerMeanTeacher_50epochs",
    "nnUNetTrainerMeanTeacher_100epochs",
    "nnUNetTrainerMeanTeacher_250epochs",
    "nnUNetTrainerMeanTeacher_500epochs",
    "nnUNetTrainer_demo",
    "nnUNetTrainerMeanTeacher_demo",
]
