"""Cross-image feature perturbation with uncertainty-weighted pseudo-label fusion (Xu et al., WACV 2025) on nnU-Net.

No public code exists; this is the reconstruction of ``methods.md`` §4.2, with each choice a class attribute. Per
step: the EMA teacher predicts the weak view; the student predicts the strong view (image perturbation), its own
weak-view features with channel dropout (feature perturbation), and its weak-view features with the ambiguous
bottleneck positions refined by attention to the labeled images' features (cross-image feature perturbation); the
predictions are fused per voxel by their certainty into one pseudo label with a voxel weight, which supervises the
three student streams with weighted CE + Dice.
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_semi.feature_perturbation import (
    CrossImageRefinement,
    ambiguous_positions,
    dropout_skips,
    encoder_and_decoder,
    entropy_weighted_fusion,
)
from nnunet_semi.losses import weighted_ce_dice_loss
from nnunet_semi.masks import normalized_entropy
from nnunet_semi.networks import features_per_stage
from nnunet_semi.training.base import BEST_VALIDATED, full_resolution, take_samples
from nnunet_semi.training.mean_teacher import nnUNetTrainerMeanTeacher

FUSION_SOURCES = ("weak", "strong", "feature", "cross_image")


class nnUNetTrainerCIFP(nnUNetTrainerMeanTeacher):
    """CIFP on the mean-teacher base.

    Attributes (beyond the base's):
        feature_dropout: channel-dropout probability on every encoder output of the feature-perturbation stream.
        refinement_attention: "spatial" (unlabeled bottleneck positions attend to labeled ones) or "channel".
        refinement_keys: "features" (labeled bottleneck features) or "prototypes" (their per-class averages).
        refinement_heads, refinement_gamma: attention heads and initial residual scale of the refinement module.
        refine_fraction: fraction of bottleneck positions per sample refined: those with the highest mean
            normalised entropy of the teacher's weak-view prediction (above ``refine_min_entropy``).
        fusion_sources: predictions fused into the pseudo label, from ``FUSION_SOURCES``.
        fusion_temperature: T of the fusion weights softmax_k(-H_k / T).
        strong_weight, feature_weight, cross_image_weight: weights of the three streams' losses.

    Deep supervision: the supervised term uses nnU-Net's; the three stream losses use the full-resolution output.
    The refinement module lives in ``auxiliary["cross_image"]`` (own optimizer parameter group, saved in
    ``semi_state``) and is not used at inference: ``self.network`` stays the plain nnU-Net network.
    """

    feature_dropout: float = 0.5
    refinement_attention: str = "spatial"
    refinement_keys: str = "features"
    refinement_heads: int = 1
    refinement_gamma: float = 0.1
    refine_fraction: float = 0.5
    refine_min_entropy: float = 0.0
    fusion_sources: tuple[str, ...] = ("weak", "feature", "cross_image")
    fusion_temperature: float = 0.5
    strong_weight: float = 0.5
    feature_weight: float = 0.5
    cross_image_weight: float = 0.5
    unsup_weight = 1.0
    ramped_terms = ()  # UniMatch, which this reconstruction follows, weights its streams from the first step
    supports_regions = False  # the fusion and pseudo labels are defined on mutually exclusive classes

    loss_terms = ("sup", "strong", "feature", "cross_image")
    statistics = ("confident_fraction", "teacher_student_agreement", "refined_fraction", "pseudo_label_weight") + \
        tuple(f"fusion_weight_{s}" for s in FUSION_SOURCES)

    def build_auxiliary_modules(self) -> nn.ModuleDict:
        unknown = set(self.fusion_sources) - set(FUSION_SOURCES)
        if unknown or not self.fusion_sources:
            raise ValueError(f"{self.__class__.__name__}.fusion_sources must be a non-empty subset of "
                             f"{FUSION_SOURCES}, got {self.fusion_sources}")
        modules = super().build_auxiliary_modules()
        modules["cross_image"] = CrossImageRefinement(
            features_per_stage(self.configuration_manager)[-1], self.refinement_attention,
            self.refinement_keys, self.refinement_heads, self.refinement_gamma)
        return modules

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.auxiliary["cross_image"].train()

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        x_l, x_weak = labeled["data"], unlabeled["data_weak"]
        num_labeled = x_l.shape[0]
        # image perturbation: labeled + strong unlabeled in one forward
        output = self.network(torch.cat([x_l, unlabeled["data_strong"]]))
        logits = {"strong": full_resolution(output)[num_labeled:]}
        weak = self.teacher_probabilities(x_weak)

        # feature perturbations of the student's weak-view features
        encoder, decoder = encoder_and_decoder(self.unwrapped_network())
        skips = encoder(torch.cat([x_l, x_weak]))
        labeled_bottleneck = skips[-1][:num_labeled]
        skips = [s[num_labeled:] for s in skips]
        logits["feature"] = full_resolution(decoder(dropout_skips(skips, self.feature_dropout)))
        ambiguous = ambiguous_positions(normalized_entropy(weak), skips[-1].shape[2:], self.refine_fraction,
                                        self.refine_min_entropy)
        labels = full_resolution(labeled["target"])
        refined = self.auxiliary["cross_image"](skips[-1], labeled_bottleneck, ambiguous, labels,
                                                self.label_manager.num_segmentation_heads)
        logits["cross_image"] = full_resolution(decoder(skips[:-1] + [refined]))

        # uncertainty-weighted fusion instead of a confidence threshold
        candidates = {"weak": weak} | {k: self.probabilities(v).detach() for k, v in logits.items()}
        fused = entropy_weighted_fusion([candidates[s] for s in self.fusion_sources], self.fusion_temperature)

        self.log_confidence_and_agreement(weak, candidates["strong"], "teacher_student_agreement")
        self.log_step_statistic("refined_fraction", ambiguous.float().mean())
        self.log_step_statistic("pseudo_label_weight", fused.voxel_weight.mean())
        for source in FUSION_SOURCES:
            used = source in self.fusion_sources
            weight = fused.source_weights[self.fusion_sources.index(source)].mean() if used else 0.0
            self.log_step_statistic(f"fusion_weight_{source}", weight)

        weights = {"strong": self.strong_weight, "feature": self.feature_weight, "cross_image": self.cross_image_weight}
        terms = {"sup": self.supervised_loss(take_samples(output, num_labeled), labeled["target"])}
        for stream, stream_logits in logits.items():
            terms[stream] = weights[stream] * weighted_ce_dice_loss(stream_logits, fused.labels, fused.voxel_weight)
        return terms


class nnUNetTrainerCIFP_channelAttention(nnUNetTrainerCIFP):
    refinement_attention = "channel"


class nnUNetTrainerCIFP_prototypeKeys(nnUNetTrainerCIFP):
    refinement_keys = "prototypes"


class nnUNetTrainerCIFP_deployBestValidated(nnUNetTrainerCIFP):
    deployed_model = BEST_VALIDATED


class nnUNetTrainerCIFP_50epochs(nnUNetTrainerCIFP):
    epochs = 50


class nnUNetTrainerCIFP_100epochs(nnUNetTrainerCIFP):
    epochs = 100


class nnUNetTrainerCIFP_250epochs(nnUNetTrainerCIFP):
    epochs = 250


class nnUNetTrainerCIFP_500epochs(nnUNetTrainerCIFP):
    epochs = 500
