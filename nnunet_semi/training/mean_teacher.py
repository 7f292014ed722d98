"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) on nnU-Net: consistency of the student's prediction on the
strong view with the EMA teacher's prediction on the weak view of the same crop."""

from __future__ import annotations

import torch

from nnunet_semi.losses import probability_mse
from nnunet_semi.training.base import SemiSupervisedTrainerBase


class nnUNetTrainerMeanTeacher(SemiSupervisedTrainerBase):
    """Supervised nnU-Net loss + ramped MSE between student (strong view) and teacher (weak view) probabilities.

    The consistency term uses the full-resolution output only (``unsup_uses_deep_supervision = False``); the
    supervised term uses nnU-Net's deep supervision. One student forward covers labeled and unlabeled samples.
    """

    loss_terms = ("sup", "consistency")
    statistics = ("confident_fraction", "teacher_student_agreement")

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        num_labeled = labeled["data"].shape[0]
        output = self.network(torch.cat([labeled["data"], unlabeled["data_strong"]]))
        scales = output if isinstance(output, (list, tuple)) else [output]
        labeled_output = [o[:num_labeled] for o in scales] if isinstance(output, (list, tuple)) else \
            output[:num_labeled]
        student = self.probabilities(scales[0][num_labeled:])
        teacher = self.teacher_probabilities(unlabeled["data_weak"])
        self._log_pseudo_label_statistics(student, teacher)
        return {"sup": self.supervised_loss(labeled_output, labeled["target"]),
                "consistency": probability_mse(student, teacher)}

    @torch.no_grad()
    def _log_pseudo_label_statistics(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        if self.label_manager.has_regions:  # independent sigmoids: confidence and agreement per region channel
            confident = torch.maximum(teacher, 1 - teacher) > self.confidence_threshold
            agreement = (student > 0.5) == (teacher > 0.5)
        else:
            confident = teacher.max(1).values > self.confidence_threshold
            agreement = student.argmax(1) == teacher.argmax(1)
        self.log_step_statistic("confident_fraction", confident.float().mean())
        self.log_step_statistic("teacher_student_agreement", agreement.float().mean())


class nnUNetTrainerMeanTeacher_50epochs(nnUNetTrainerMeanTeacher):
    epochs = 50


class nnUNetTrainerMeanTeacher_100epochs(nnUNetTrainerMeanTeacher):
    epochs = 100


class nnUNetTrainerMeanTeacher_250epochs(nnUNetTrainerMeanTeacher):
    epochs = 250


class nnUNetTrainerMeanTeacher_500epochs(nnUNetTrainerMeanTeacher):
    epochs = 500
