"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) on nnU-Net: consistency of the student's prediction on the
strong view with the EMA teacher's prediction on the weak view of the same crop."""

from __future__ import annotations

import torch

from nnunet_semi.components.losses import probability_mse
from nnunet_semi.trainer.base import SemiSupervisedTrainerBase
from nnunet_semi.trainer.deployment import BEST_VALIDATED
from nnunet_semi.trainer.outputs import full_resolution, take_samples


class nnUNetTrainerMeanTeacher(SemiSupervisedTrainerBase):
    """Supervised nnU-Net loss + ramped MSE between student (strong view) and teacher (weak view) probabilities.

    The consistency term uses the full-resolution output only (``unsup_uses_deep_supervision = False``); the
    supervised term uses nnU-Net's deep supervision. One student forward covers labeled and unlabeled samples.
    """

    unsup_weight = 0.1  # UA-MT's Mean Teacher, the LA literature's baseline: 0.1 ramped over 6 000 iterations
    unsup_rampup_iterations = 6000
    deployed_model = "student"  # UA-MT's test code loads the student
    loss_terms = ("sup", "consistency")
    statistics = ("confident_fraction", "teacher_student_agreement")

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        num_labeled = labeled["data"].shape[0]
        output = self.network(torch.cat([labeled["data"], unlabeled["data_strong"]]))
        student = self.probabilities(full_resolution(output)[num_labeled:])
        teacher = self.teacher_probabilities(unlabeled["data_weak"])
        self.log_confidence_and_agreement(teacher, student, "teacher_student_agreement")
        return {"sup": self.supervised_loss(take_samples(output, num_labeled), labeled["target"]),
                "consistency": probability_mse(student, teacher)}


class nnUNetTrainerMeanTeacher_unsupWeight1(nnUNetTrainerMeanTeacher):
    unsup_weight = 1.0  # Tarvainen & Valpola's weight range; this project's default before issue #19


class nnUNetTrainerMeanTeacher_deployBestValidated(nnUNetTrainerMeanTeacher):
    deployed_model = BEST_VALIDATED


class nnUNetTrainerMeanTeacher_50epochs(nnUNetTrainerMeanTeacher):
    epochs = 50


class nnUNetTrainerMeanTeacher_100epochs(nnUNetTrainerMeanTeacher):
    epochs = 100


class nnUNetTrainerMeanTeacher_250epochs(nnUNetTrainerMeanTeacher):
    epochs = 250


class nnUNetTrainerMeanTeacher_500epochs(nnUNetTrainerMeanTeacher):
    epochs = 500
