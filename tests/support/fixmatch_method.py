"""A FixMatch-style method (Sohn et al., NeurIPS 2020), test-only: it proves that adding a method to nnunet-semi is
one file of declarations and one ``compute_losses`` (documentation/extending.md, "Adding a method"). Everything else (the unlabeled
loader and its two views, the weighting, the optimizer step, logging, checkpoints, deployment) is the base's."""

from __future__ import annotations

import torch

from nnunet_semi.components.losses import voxel_cross_entropy
from nnunet_semi.trainer.base import SemiSupervisedTrainerBase
from nnunet_semi.trainer.outputs import full_resolution, take_samples


class nnUNetTrainerFixMatchExample(SemiSupervisedTrainerBase):
    """The student's confident weak-view decisions supervise its strong view of the same crop.

    ``fixmatch``: CE of the strong-view logits against the weak view's hard decision, on the voxels whose weak-view
    probability reaches ``pseudo_label_threshold``, averaged over all voxels (FixMatch's mean over the unlabeled
    batch). Region-based labels: per channel, binary CE against the weak view's sigmoid > 0.5.
    """

    teacher_momentum = None  # the pseudo label is the student's own prediction, without gradient
    unlabeled_views = ("weak", "strong")
    unsup_weight = 1.0  # FixMatch's lambda_u
    ramped_terms = ()  # from the first step, as FixMatch
    pseudo_label_threshold: float = 0.95
    loss_terms = ("sup", "fixmatch")
    statistics = ("confident_fraction", "weak_strong_agreement")

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        n_l, n_u = labeled["data"].shape[0], unlabeled["data_weak"].shape[0]
        output = self.network(torch.cat([labeled["data"], unlabeled["data_weak"], unlabeled["data_strong"]]))
        logits = full_resolution(output)
        weak = self.probabilities(logits[n_l:n_l + n_u]).detach()
        strong_logits = logits[n_l + n_u:]
        if self.label_manager.has_regions:
            confident = torch.maximum(weak, 1 - weak) >= self.pseudo_label_threshold
            voxel_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                strong_logits.float(), (weak > 0.5).float(), reduction="none")
        else:
            confident = weak.max(1, keepdim=True).values >= self.pseudo_label_threshold
            voxel_loss = voxel_cross_entropy(strong_logits, weak.argmax(1, keepdim=True))
        self.log_confidence_and_agreement(weak, self.probabilities(strong_logits).detach(), "weak_strong_agreement")
        return {"sup": self.supervised_loss(take_samples(output, n_l), labeled["target"]),
                "fixmatch": (voxel_loss * confident).mean()}
