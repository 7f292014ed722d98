"""Cross-image feature perturbation with uncertainty-weighted pseudo-label fusion (Xu et al., WACV 2025) on nnU-Net.

No public code exists; this is the reconstruction of documentation/methods/cifp.md, with each choice a class attribute. Per
step: the EMA teacher predicts the weak view; the student predicts the strong view with CutMix between unlabeled
samples (image perturbation), its own weak-view features with channel dropout (feature perturbation), and its
weak-view features with the ambiguous bottleneck positions refined by attention to the labeled images' features
(cross-image feature perturbation); the predictions are fused per voxel by their certainty into one pseudo label
with a voxel weight, which supervises the three student streams with weighted CE + Dice.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from nnunet_semi.components.cross_image import CrossImageRefinement, ambiguous_positions
from nnunet_semi.components.feature_capture import ModuleOutputs
from nnunet_semi.components.feature_perturbation import dropout_skips, encoder_and_decoder
from nnunet_semi.components.losses import weighted_ce_dice_loss
from nnunet_semi.components.mixing import cutmix_boxes, paste_from_partners
from nnunet_semi.components.networks import features_per_stage
from nnunet_semi.components.pseudo_labels import uncertainty_weighted_fusion
from nnunet_semi.components.uncertainty import UNCERTAINTY_MEASURES, prediction_uncertainty
from nnunet_semi.methods.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_semi.trainer.deployment import BEST_VALIDATED
from nnunet_semi.trainer.outputs import full_resolution, take_samples

FUSION_SOURCES = ("weak", "strong", "feature", "cross_image")
STREAMS = ("strong", "feature", "cross_image")


class nnUNetTrainerCIFP(nnUNetTrainerMeanTeacher):
    """CIFP on the mean-teacher base.

    Attributes (beyond the base's):
        feature_dropout: channel-dropout probability on every encoder output of the feature-perturbation stream.
        refinement_attention: "spatial" (unlabeled bottleneck positions attend to labeled ones) or "channel".
        refinement_keys: "features" (labeled bottleneck features) or "prototypes" (their per-class averages).
        refinement_heads, refinement_gamma: attention heads and initial residual scale of the refinement module;
            with ``refinement_update_scale = "feature_norm"`` gamma is the perturbation's size relative to the
            feature it changes (1: as large as the feature, as channel dropout 0.5 is).
        refine_fraction: fraction of bottleneck positions per sample refined: those with the highest mean
            uncertainty of the teacher's weak-view prediction (above ``refine_min_entropy``).
        uncertainty_measure: "margin" (1 - top-2 margin, the same for any class count) or "entropy" (H / ln C),
            for the refined positions, the fusion weights and the voxel weights.
        fusion_sources: predictions fused into the pseudo label, from ``FUSION_SOURCES``.
        fusion_temperature: T of the fusion weights softmax_k(-u_k / T).
        strong_weight, feature_weight, cross_image_weight: weights of the three streams' losses (``term_weights``
            names them; the base applies them and logs each term raw and weighted).
        cutmix_probability, cutmix_fraction: per unlabeled sample, the chance of a CutMix box in its strong view and
            the box side over the patch side; the box comes from another unlabeled sample's strong view, and so
            does the strong stream's pseudo label and weight inside it (0: no CutMix).
        stream_loss_normalization: "voxels" (weighted CE summed over N voxels, Dice times the mean weight: a batch
            the fusion finds uncertain trains weakly, as UniMatch's masked mean over all voxels) or "weights" (by the
            sum of the weights: every batch at full strength).

    Deep supervision: the supervised term uses nnU-Net's; the three stream losses use the full-resolution output,
    and the perturbed decodes compute only that head. The refinement module lives in ``auxiliary["cross_image"]``
    (own optimizer parameter group, saved in ``semi_state``) and is not used at inference: ``self.network`` stays
    the plain nnU-Net network.
    """

    feature_dropout: float = 0.5
    refinement_attention: str = "spatial"
    refinement_keys: str = "features"
    refinement_heads: int = 1
    refinement_gamma: float = 1.0
    refinement_update_scale: str = "feature_norm"
    refine_fraction: float = 0.5
    refine_min_entropy: float = 0.0
    uncertainty_measure: str = "margin"
    fusion_sources: tuple[str, ...] = ("weak", "feature", "cross_image")
    fusion_temperature: float = 0.5
    strong_weight: float = 0.5
    feature_weight: float = 0.5
    cross_image_weight: float = 0.5
    cutmix_probability: float = 0.5
    cutmix_fraction: float = 0.5
    stream_loss_normalization: str = "voxels"
    unsup_weight = 1.0
    ramped_terms = ()  # UniMatch, which this reconstruction follows, weights its streams from the first step
    supports_regions = False  # the fusion and pseudo labels are defined on mutually exclusive classes

    loss_terms = ("sup",) + STREAMS
    term_weights = {"strong": "strong_weight", "feature": "feature_weight", "cross_image": "cross_image_weight"}
    statistics = ("confident_fraction", "teacher_student_agreement", "refined_fraction", "pseudo_label_weight",
                  "cross_image_gamma", "cross_image_update_ratio", "cutmix_fraction") + \
        tuple(f"fusion_weight_{s}" for s in FUSION_SOURCES)

    def build_auxiliary_modules(self) -> nn.ModuleDict:
        unknown = set(self.fusion_sources) - set(FUSION_SOURCES)
        if unknown or not self.fusion_sources:
            raise ValueError(f"{self.__class__.__name__}.fusion_sources must be a non-empty subset of "
                             f"{FUSION_SOURCES}, got {self.fusion_sources}")
        if "strong" in self.fusion_sources and self.cutmix_probability > 0:
            raise ValueError(f"{self.__class__.__name__} fuses the strong stream, whose CutMix boxes show other "
                             f"samples: set cutmix_probability = 0 or leave 'strong' out of fusion_sources")
        if self.uncertainty_measure not in UNCERTAINTY_MEASURES:
            raise ValueError(f"{self.__class__.__name__}.uncertainty_measure must be one of {UNCERTAINTY_MEASURES},"
                             f" got {self.uncertainty_measure!r}")
        modules = super().build_auxiliary_modules()
        modules["cross_image"] = CrossImageRefinement(
            features_per_stage(self.configuration_manager)[-1], self.refinement_attention,
            self.refinement_keys, self.refinement_heads, self.refinement_gamma, self.refinement_update_scale)
        return modules

    def initialize(self):
        super().initialize()
        # the labeled bottleneck is read from the student's main forward (before it is first run, possibly compiled)
        self.encoder_outputs = ModuleOutputs(self.unwrapped_network().encoder)

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        x_l, x_weak, x_strong = labeled["data"], unlabeled["data_weak"], unlabeled["data_strong"]
        num_labeled, num_unlabeled = x_l.shape[0], x_weak.shape[0]
        # image perturbation: CutMix between unlabeled strong views, in one forward with the labeled batch
        boxes = cutmix_boxes(num_unlabeled, x_strong.shape[2:], self.cutmix_probability, self.cutmix_fraction,
                             x_strong.device, self.random_generator("cpu"))
        partners = torch.roll(torch.arange(num_unlabeled), 1)
        with self.encoder_outputs as encoder_outputs:
            output = self.network(torch.cat([x_l, paste_from_partners(x_strong, boxes, partners)]))
        labeled_bottleneck = encoder_outputs.take()[-1][:num_labeled]
        logits = {"strong": full_resolution(output)[num_labeled:]}
        weak = self.teacher_probabilities(x_weak)

        # feature perturbations of the student's weak-view features (one encoder pass, full-resolution heads only)
        encoder, decoder = encoder_and_decoder(self.unwrapped_network())
        skips = encoder(x_weak)
        refinement = self.auxiliary["cross_image"]
        ambiguous = ambiguous_positions(prediction_uncertainty(weak, self.uncertainty_measure), skips[-1].shape[2:],
                                        self.refine_fraction, self.refine_min_entropy)
        refined = refinement(skips[-1], labeled_bottleneck, ambiguous, full_resolution(labeled["target"]),
                             self.label_manager.num_segmentation_heads)
        with _full_resolution_head_only(decoder):
            dropped = dropout_skips(skips, self.feature_dropout, self.random_generator(x_weak.device))
            logits["feature"] = decoder(dropped)
            logits["cross_image"] = decoder(skips[:-1] + [refined])

        # uncertainty-weighted fusion instead of a confidence threshold
        candidates = {"weak": weak} | {k: self.probabilities(v).detach() for k, v in logits.items()}
        fused = uncertainty_weighted_fusion([candidates[s] for s in self.fusion_sources], self.fusion_temperature,
                                            self.uncertainty_measure)
        targets = {stream: (fused.labels, fused.voxel_weight) for stream in STREAMS}
        targets["strong"] = tuple(paste_from_partners(t, boxes, partners) for t in targets["strong"])

        self.log_confidence_and_agreement(weak, candidates["strong"], "teacher_student_agreement")
        self.log_step_statistic("refined_fraction", ambiguous.float().mean())
        self.log_step_statistic("pseudo_label_weight", fused.voxel_weight.mean())
        self.log_step_statistic("cross_image_gamma", refinement.gamma.detach())
        self.log_step_statistic("cross_image_update_ratio", refinement.last_update_ratio)
        self.log_step_statistic("cutmix_fraction", boxes.float().mean())
        for source in FUSION_SOURCES:
            used = source in self.fusion_sources
            weight = fused.source_weights[self.fusion_sources.index(source)].mean() if used else 0.0
            self.log_step_statistic(f"fusion_weight_{source}", weight)

        terms = {"sup": self.supervised_loss(take_samples(output, num_labeled), labeled["target"])}
        for stream, stream_logits in logits.items():
            labels, weight = targets[stream]
            terms[stream] = weighted_ce_dice_loss(stream_logits, labels, weight, self.stream_loss_normalization)
        return terms


@contextmanager
def _full_resolution_head_only(decoder: nn.Module):
    """Decode without the deep-supervision heads (nnU-Net's decoder then runs only the last segmentation layer)."""
    previous = decoder.deep_supervision
    decoder.deep_supervision = False
    try:
        yield
    finally:
        decoder.deep_supervision = previous


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
