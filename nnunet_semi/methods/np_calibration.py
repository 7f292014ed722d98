"""Pseudo-label calibration with a neural process and dual-confidence pseudo supervision (Zhang et al., Neural
Networks 2025) on nnU-Net.

No public code exists; this is the reconstruction of documentation/methods/np_calibration.md on NP-SemiSeg's mechanism, with each
choice a class attribute. Per step: the EMA teacher segments the labeled and weak unlabeled crops; its NP head
(an EMA copy of the student's) turns the teacher's full-resolution decoder features into calibrated probabilities,
conditioned on per-class memory banks of labeled (context) and labeled + pseudo-labeled (target) feature vectors;
the pseudo label comes from the calibrated prediction, and each voxel is weighted by how far the segmentation head's
and the NP's confidences agree. The student's NP head is trained on a voxel subsample, with a KL term pulling the
target (pseudo-labeled) latent distribution toward the context (labeled) one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nnunet_semi.components.ema import ema_momentum, ema_update, make_teacher
from nnunet_semi.components.feature_capture import DecoderFeatures
from nnunet_semi.components.losses import masked_soft_dice_loss, weighted_ce_dice_loss, weighted_mean
from nnunet_semi.components.networks import features_per_stage
from nnunet_semi.components.neural_process import (
    ClassMemoryBank,
    NeuralProcessHead,
    gaussian_kl,
    sample_voxels_per_image,
)
from nnunet_semi.components.pseudo_labels import dual_confidence_weights
from nnunet_semi.components.uncertainty import percentile
from nnunet_semi.methods.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_semi.trainer.deployment import BEST_VALIDATED
from nnunet_semi.trainer.outputs import full_resolution, take_samples

PSEUDO_LABEL_SOURCES = ("np", "fused")


class nnUNetTrainerNPCal(nnUNetTrainerMeanTeacher):
    """NP calibration and dual-confidence pseudo supervision on the mean-teacher base.

    Attributes (beyond the base's):
        np_latent_dim, np_hidden_dim: NP head sizes (projection/latent and decoder hidden layer).
        np_samples: latent samples T averaged per prediction.
        np_voxels_per_image: voxels per image drawn for the student's NP pass, the per-image summaries and each
            bank update (bounds the NP head's memory on full 3D patches).
        np_class_balanced_sampling: draw those voxels with equal mass per class present (else uniformly, which on
            small structures is mostly background).
        np_chunk_voxels: voxels decoded at once by the teacher's dense NP prediction (no gradient), over batch and
            space together: its peak memory does not grow with the batch.
        np_dice_weight: weight of the soft Dice beside the CE in the NP head's losses (0: NLL alone).
        np_warmup_min_iterations, np_warmup_dice_momentum: the NP head supplies pseudo labels only once it is warm:
            after at least this many steps, when the EMA (this momentum) of its hard Dice on the sampled labeled
            voxels reaches that of the segmentation head on the same voxels; until then the teacher's segmentation
            labels and weights (its probability of its label). Once warm it stays warm (saved in ``semi_state``).
        bank_length, bank_push_per_class: FIFO length per class and vectors pushed per class and step.
        target_bank_min_weight: unlabeled voxels enter the target bank only with a dual-confidence weight at least
            this (0: all, the plain NP-SemiSeg target set).
        kl_weight: beta of KL(q_target || q_context) (NP-SemiSeg's 0.005).
        np_loss_weight: weight of the NP head's CE on pseudo-labeled voxels.
        dual_confidence_rule, dual_confidence_tau, dual_confidence_measure: see
            ``neural_process.dual_confidence_weights`` (default: each head's probability of the pseudo label).
        pseudo_label_source: "np" (argmax of the calibrated prediction) or "fused" (of its mean with the teacher's
            segmentation probabilities).

    Terms: ``sup`` (nnU-Net's loss, deep supervision), ``sup_np`` (NP head CE + soft Dice on the sampled labeled
    voxels), ``pseudo`` (dual-confidence weighted CE + Dice of the student's strong-view output against the
    calibrated pseudo label, full resolution), ``np_pseudo`` (the same weighting for the NP head's CE + Dice on the
    sampled unlabeled voxels), ``np_kl``.
    ``sup*`` terms and ``np_kl`` (NP-SemiSeg's beta-weighted KL) are not ramped; ``pseudo`` and ``np_pseudo`` follow
    the base's sigmoid ramp (lambda(t) of the reconstruction). Inference uses the plain network.
    """

    np_latent_dim: int = 32
    np_hidden_dim: int = 64
    np_samples: int = 5
    np_voxels_per_image: int = 4096
    np_class_balanced_sampling: bool = True
    np_chunk_voxels: int = 2**15
    np_dice_weight: float = 1.0
    np_warmup_min_iterations: int = 250
    np_warmup_dice_momentum: float = 0.9
    bank_length: int = 2560
    bank_push_per_class: int = 256
    target_bank_min_weight: float = 0.0
    kl_weight: float = 0.005
    np_loss_weight: float = 1.0
    dual_confidence_rule: str = "agreement"
    dual_confidence_tau: float = 0.2
    dual_confidence_measure: str = "pseudo_label_prob"
    pseudo_label_source: str = "np"
    unsup_weight = 1.0
    unsup_rampup_iterations = 6000
    ramped_terms = ("pseudo", "np_pseudo")
    supports_regions = False  # the NP head predicts mutually exclusive classes

    loss_terms = ("sup", "sup_np", "pseudo", "np_pseudo", "np_kl")
    supervised_terms = ("sup", "sup_np")
    term_weights = {"np_pseudo": "np_loss_weight", "np_kl": "kl_weight"}
    statistics = ("confident_fraction", "teacher_student_agreement", "seg_np_agreement", "confidence_gap",
                  "weight_mean", "weight_p10", "weight_p90", "np_labeled_dice", "seg_labeled_dice", "np_warm")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # EMAs of the hard Dice of the NP and the segmentation head on the sampled labeled voxels, and the latch
        self.np_warmup = {"np_dice": 0.0, "seg_dice": 0.0, "steps": 0, "warm": False}

    def build_auxiliary_modules(self) -> nn.ModuleDict:
        if self.pseudo_label_source not in PSEUDO_LABEL_SOURCES:
            raise ValueError(f"{self.__class__.__name__}.pseudo_label_source must be one of {PSEUDO_LABEL_SOURCES},"
                             f" got {self.pseudo_label_source!r}")
        modules = super().build_auxiliary_modules()
        feature_dim = features_per_stage(self.configuration_manager)[0]  # full-resolution decoder stage
        classes = self.label_manager.num_segmentation_heads
        modules["np_head"] = NeuralProcessHead(feature_dim, classes, self.np_latent_dim, self.np_hidden_dim)
        modules["np_head_teacher"] = make_teacher(modules["np_head"])
        modules["context_bank"] = ClassMemoryBank(classes, self.np_latent_dim, self.bank_length)
        modules["target_bank"] = ClassMemoryBank(classes, self.np_latent_dim, self.bank_length)
        return modules

    def initialize(self):
        super().initialize()
        # before the first (possibly compiled) forward: torch.compile skips hooks added after it
        self.student_features = DecoderFeatures(self.unwrapped_network())
        self.teacher_features = DecoderFeatures(self.teacher)

    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        ema_update(self.auxiliary["np_head_teacher"], self.auxiliary["np_head"],
                   ema_momentum(self.global_step, self.teacher_momentum))

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        x_l = labeled["data"]
        num_labeled = x_l.shape[0]
        head, head_teacher = self.auxiliary["np_head"], self.auxiliary["np_head_teacher"]
        context, target = self.auxiliary["context_bank"], self.auxiliary["target_bank"]
        labels = full_resolution(labeled["target"])
        labels = labels.long()
        valid = labels != self.label_manager.ignore_label if self.label_manager.has_ignore_label else \
            torch.ones_like(labels, dtype=torch.bool)
        n, balanced = self.np_voxels_per_image, self.np_class_balanced_sampling

        with self.student_features as student_captured:
            output = self.network(torch.cat([x_l, unlabeled["data_strong"]]))
        logits = full_resolution(output)
        with self.teacher_features as teacher_captured:
            teacher_probs = self.teacher_probabilities(torch.cat([x_l, unlabeled["data_weak"]]))[num_labeled:]
        teacher_features = teacher_captured.take()

        rng = self.random_generator(logits.device)
        with torch.no_grad():
            # banks hold the EMA head's projections (a slowly moving key space, as the EMA teacher)
            features_l, labels_l, _ = sample_voxels_per_image(teacher_features[:num_labeled], labels, valid, n,
                                                              balanced, rng)
            # (an image without valid voxels draws ignore-label voxels; banks skip labels outside the classes)
            projected_l, labels_l = head_teacher.project(features_l.float()).flatten(0, 1), labels_l.flatten()
            context.push(projected_l, labels_l, self.bank_push_per_class, rng)
            target.push(projected_l, labels_l, self.bank_push_per_class, rng)
            np_probs = head_teacher.predict_dense(teacher_features[num_labeled:], context, target, self.np_samples,
                                                  n, self.np_chunk_voxels, rng)
            if self.np_warmup["warm"]:
                source = np_probs if self.pseudo_label_source == "np" else (np_probs + teacher_probs) / 2
                pseudo = source.argmax(1, keepdim=True)
                weights, confidence_seg, confidence_np = dual_confidence_weights(
                    teacher_probs, np_probs, self.dual_confidence_rule, self.dual_confidence_tau,
                    self.dual_confidence_measure, pseudo)
            else:  # the NP head is not yet better than chance against the segmentation head: it labels nothing
                pseudo = teacher_probs.argmax(1, keepdim=True)
                weights = confidence_seg = torch.gather(teacher_probs, 1, pseudo)
                confidence_np = torch.gather(np_probs, 1, pseudo)
            features_u, labels_u, _ = sample_voxels_per_image(
                teacher_features[num_labeled:], pseudo, weights >= self.target_bank_min_weight, n, balanced, rng)
            target.push(head_teacher.project(features_u.float()).flatten(0, 1), labels_u.flatten(),
                        self.bank_push_per_class, rng)

        # the student's NP head on a voxel subsample of labeled (labels) and unlabeled (pseudo labels) images
        student_features = student_captured.take()
        sampled_l, sampled_labels_l, index_l = sample_voxels_per_image(student_features[:num_labeled], labels, valid,
                                                                       n, balanced, rng)
        sampled_valid_l = torch.gather(valid.flatten(1), 1, index_l)
        sampled_u, sampled_labels_u, index_u = sample_voxels_per_image(
            student_features[num_labeled:], pseudo, torch.ones_like(pseudo, dtype=torch.bool), n, balanced, rng)
        sampled_weights_u = torch.gather(weights.flatten(1), 1, index_u)
        projected = head.project(torch.cat([sampled_l, sampled_u]).float())
        summary = head.summarize(projected, context.centers(), context.available(), target.centers(),
                                 target.available())
        np_logits = head.decode(projected, summary, summary.q_target, self.np_samples, generator=rng)  # (T, B, n, C)
        log_mean = torch.logsumexp(torch.log_softmax(np_logits.float(), -1), 0) - math.log(self.np_samples)
        sampled_labels = torch.cat([torch.where(sampled_valid_l, sampled_labels_l, 0), sampled_labels_u])
        nll = -torch.gather(log_mean, -1, sampled_labels[..., None])[..., 0]  # (B, n)
        # soft Dice of the NP mean prediction over each image's sampled voxels, as (B, C, n) "images"
        np_mean_probs, dice_labels = log_mean.exp().transpose(1, 2), sampled_labels[:, None]

        def np_dice(rows: slice, weight: torch.Tensor) -> torch.Tensor:
            return masked_soft_dice_loss(np_mean_probs[rows], dice_labels[rows], weight[:, None])

        self._update_np_warmup(log_mean[:num_labeled].detach(), logits[:num_labeled].detach(), index_l,
                               sampled_labels_l, sampled_valid_l)
        self.log_confidence_and_agreement(teacher_probs, self.probabilities(logits[num_labeled:]).detach(),
                                          "teacher_student_agreement")
        self.log_step_statistic("seg_np_agreement", (teacher_probs.argmax(1) == np_probs.argmax(1)).float().mean())
        self.log_step_statistic("confidence_gap", (confidence_seg - confidence_np).abs().mean())
        self.log_step_statistic("weight_mean", weights.mean())
        self.log_step_statistic("weight_p10", percentile(weights, 10, generator=self.random_generator("cpu")))
        self.log_step_statistic("weight_p90", percentile(weights, 90, generator=self.random_generator("cpu")))

        labeled_rows, unlabeled_rows = slice(0, num_labeled), slice(num_labeled, None)
        return {
            "sup": self.supervised_loss(take_samples(output, num_labeled), labeled["target"]),
            "sup_np": weighted_mean(nll[labeled_rows], sampled_valid_l)
            + self.np_dice_weight * np_dice(labeled_rows, sampled_valid_l.float()),
            "pseudo": weighted_ce_dice_loss(logits[num_labeled:], pseudo, weights),
            "np_pseudo": weighted_mean(nll[unlabeled_rows], sampled_weights_u)
            + self.np_dice_weight * np_dice(unlabeled_rows, sampled_weights_u.float()),
            "np_kl": gaussian_kl(summary.q_target, summary.q_context),
        }

    @torch.no_grad()
    def _update_np_warmup(self, np_log_probs: torch.Tensor, seg_logits: torch.Tensor, index: torch.Tensor,
                          labels: torch.Tensor, valid: torch.Tensor) -> None:
        """Compare the NP head with the segmentation head on the sampled labeled voxels (hard foreground Dice),
        smooth both, and latch ``warm`` once the NP head has caught up (after ``np_warmup_min_iterations``).

        Args:
            np_log_probs: (B_l, n, C) the student NP head's log mean probabilities at the sampled voxels.
            seg_logits: (B_l, C, *spatial) the student's full-resolution logits on the labeled images.
            index, labels, valid: (B_l, n) flat voxel indices, labels and validity of the sampled voxels.
        """
        classes = seg_logits.shape[1]
        seg_prediction = torch.gather(seg_logits.flatten(2).argmax(1), 1, index)
        state, momentum = self.np_warmup, self.np_warmup_dice_momentum
        for key, prediction in (("np_dice", np_log_probs.argmax(-1)), ("seg_dice", seg_prediction)):
            dice = _foreground_dice(prediction[valid], labels[valid], classes)
            if not math.isnan(dice):
                state[key] = momentum * state[key] + (1 - momentum) * dice if state["steps"] else dice
        state["steps"] += 1
        if not state["warm"] and state["steps"] >= self.np_warmup_min_iterations \
                and state["np_dice"] >= state["seg_dice"]:
            state["warm"] = True
            self.print_to_log_file(f"NP head warm at step {self.global_step}: Dice on sampled labeled voxels "
                                   f"{state['np_dice']:.4f} (segmentation head {state['seg_dice']:.4f}); from now on "
                                   f"it supplies the pseudo labels")
        self.log_step_statistic("np_labeled_dice", state["np_dice"])
        self.log_step_statistic("seg_labeled_dice", state["seg_dice"])
        self.log_step_statistic("np_warm", float(state["warm"]))

    def semi_state(self) -> dict:
        return super().semi_state() | {"np_warmup": dict(self.np_warmup)}

    def load_semi_state(self, state: dict) -> None:
        super().load_semi_state(state)
        # checkpoints from before the warm-up gate: their NP head already supplied pseudo labels
        self.np_warmup = dict(state.get("np_warmup", {"np_dice": 0.0, "seg_dice": 0.0, "steps": 0, "warm": True}))


def _foreground_dice(prediction: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean hard Dice over the foreground classes present in ``labels`` or ``prediction`` (1-D tensors); NaN if
    none is."""
    scores = []
    for c in range(1, num_classes):
        predicted, true = prediction == c, labels == c
        denominator = int(predicted.sum() + true.sum())
        if denominator:
            scores.append(2 * int((predicted & true).sum()) / denominator)
    return sum(scores) / len(scores) if scores else float("nan")


class nnUNetTrainerNPCal_productConfidence(nnUNetTrainerNPCal):
    dual_confidence_rule = "product"


class nnUNetTrainerNPCal_minConfidence(nnUNetTrainerNPCal):
    dual_confidence_rule = "min"


class nnUNetTrainerNPCal_fusedPseudoLabel(nnUNetTrainerNPCal):
    pseudo_label_source = "fused"


class nnUNetTrainerNPCal_deployBestValidated(nnUNetTrainerNPCal):
    deployed_model = BEST_VALIDATED


class nnUNetTrainerNPCal_50epochs(nnUNetTrainerNPCal):
    epochs = 50


class nnUNetTrainerNPCal_100epochs(nnUNetTrainerNPCal):
    epochs = 100


class nnUNetTrainerNPCal_250epochs(nnUNetTrainerNPCal):
    epochs = 250


class nnUNetTrainerNPCal_500epochs(nnUNetTrainerNPCal):
    epochs = 500
