"""nnU-Net trainers of nnunet-semi (re-exported by ``trainers/`` for nnU-Net's ``nnUNet_extTrainer`` lookup)."""

from nnunet_semi.training.cps import (
    nnUNetTrainerCPS,
    nnUNetTrainerCPS_50epochs,
    nnUNetTrainerCPS_100epochs,
    nnUNetTrainerCPS_250epochs,
    nnUNetTrainerCPS_500epochs,
)
from nnunet_semi.training.dual_cce import (
    nnUNetTrainerDualCCE,
    nnUNetTrainerDualCCE_50epochs,
    nnUNetTrainerDualCCE_100epochs,
    nnUNetTrainerDualCCE_250epochs,
    nnUNetTrainerDualCCE_500epochs,
    nnUNetTrainerDualCCE_noPrototype,
    nnUNetTrainerDualCCE_oneWayKL,
    nnUNetTrainerDualCCE_samePair,
)
from nnunet_semi.training.demo import nnUNetTrainer_demo, nnUNetTrainerMeanTeacher_demo
from nnunet_semi.training.mean_teacher import (
    nnUNetTrainerMeanTeacher,
    nnUNetTrainerMeanTeacher_50epochs,
    nnUNetTrainerMeanTeacher_100epochs,
    nnUNetTrainerMeanTeacher_250epochs,
    nnUNetTrainerMeanTeacher_500epochs,
)
from nnunet_semi.training.sgrs import (
    nnUNetTrainerSGRS,
    nnUNetTrainerSGRS_50epochs,
    nnUNetTrainerSGRS_100epochs,
    nnUNetTrainerSGRS_250epochs,
    nnUNetTrainerSGRS_500epochs,
    nnUNetTrainerSGRS_ceOnAmbiguousAgree,
    nnUNetTrainerSGRS_doubleEMA,
    nnUNetTrainerSGRS_maxProbAmbiguity,
    nnUNetTrainerSGRS_plainViewAmbiguity,
    nnUNetTrainerSGRS_strongView,
)

__all__ = [
    "nnUNetTrainerSGRS",
    "nnUNetTrainerSGRS_50epochs",
    "nnUNetTrainerSGRS_100epochs",
    "nnUNetTrainerSGRS_250epochs",
    "nnUNetTrainerSGRS_500epochs",
    "nnUNetTrainerSGRS_ceOnAmbiguousAgree",
    "nnUNetTrainerSGRS_doubleEMA",
    "nnUNetTrainerSGRS_maxProbAmbiguity",
    "nnUNetTrainerSGRS_plainViewAmbiguity",
    "nnUNetTrainerSGRS_strongView",
    "nnUNetTrainerDualCCE",
    "nnUNetTrainerDualCCE_50epochs",
    "nnUNetTrainerDualCCE_100epochs",
    "nnUNetTrainerDualCCE_250epochs",
    "nnUNetTrainerDualCCE_500epochs",
    "nnUNetTrainerDualCCE_noPrototype",
    "nnUNetTrainerDualCCE_oneWayKL",
    "nnUNetTrainerDualCCE_samePair",
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
