"""SGRS-Net (Synergy-Guided Regional Supervision of pseudo labels, MICCAI 2025) on nnU-Net.

Per step: the EMA teacher labels the (noised) unlabeled crops; each unlabeled crop is MixUp-ed with a labeled partner
(the unlabeled image dominating); the student predicts the plain and the mixed unlabeled images; voxels are split by
whether those two predictions agree and whether either is ambiguous; agree-and-certain voxels get hard CE + soft Dice
against the pseudo label, disagree-and-certain voxels label-smoothed CE + a heavily smoothed Dice, ambiguous voxels
nothing. Implemented "as intended" (documentation/methods/sgrs.md: the released code's deviations and the named variants).
"""

from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnunet_semi.components.ema import ema_update
from nnunet_semi.components.feature_perturbation import ChannelDropoutOnOutputs, encoder_and_decoder
from nnunet_semi.components.losses import masked_soft_dice_loss, voxel_cross_entropy
from nnunet_semi.components.masks import synergy_regions
from nnunet_semi.components.mixing import clipped_gaussian_noise, mixup_targets, mixup_with_labeled_partners
from nnunet_semi.components.pseudo_labels import largest_component_per_class
from nnunet_semi.methods.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_semi.trainer.deployment import BEST_VALIDATED
from nnunet_semi.trainer.outputs import full_resolution, take_samples


class nnUNetTrainerSGRS(nnUNetTrainerMeanTeacher):
    """SGRS-Net's regional pseudo-label supervision on the mean-teacher base.

    Attributes (beyond the base's):
        ambiguity_tau: binary threshold tau (ambiguous: tau < p_bg < 1 - tau), generalised to C classes by
            ``ambiguity_measure`` ("margin": top-2 margin < 1 - 2 tau, flags a two-class tie for any C; "entropy":
            normalised entropy > H_2(tau); "max_prob": max p < 1 - tau; all three are the paper's rule for C = 2).
        ambiguity_from_both_views: ambiguity from the plain and the mixed prediction (paper, current release) or the
            plain one only (the release's first upload).
        ce_on_ambiguous_agree: also apply the hard CE on agreeing ambiguous voxels (released code).
        disagree_label_smoothing: epsilon of the CE on disagree-certain voxels (0.2: targets 0.9/0.1 for 2 classes).
        agree_dice_smooth, disagree_dice_smooth: smoothing of the masked soft Dice per region (1 and 20).
        mixup_alpha: Beta(alpha, alpha) of the MixUp weight.
        noise_std, noise_clip: clipped Gaussian noise on the teacher's and the mixing inputs.
        student_uses_strong_view: student sees nnU-Net's intensity-augmented view of the unlabeled crop instead of
            the plain one (the released code feeds the plain image).
        double_ema: the released code's two EMA updates per step (fixed 0.99 then the warm-up schedule).
        student_weight_shrink: after the first of those updates the release multiplies the student's float weights
            by (1 - this) every step (its WeightEMA's "customized weight decay", 0.02 x 0.01 = 2e-4); 0: none.
        supervised_weight: factor on nnU-Net's supervised loss (``term_weights["sup"]``); the release's
            ``0.5 * (CE + Dice)`` is 0.5.
        pseudo_label_views: the student views the regional loss supervises: the plain and the mixed unlabeled
            prediction (paper), or one of them (an ablation; the partition always uses both).
        mixed_target_includes_label: the mixed image's target is lambda * pseudo label + (1 - lambda) * the labeled
            partner's ground truth (a distribution; the release computes it and discards it, training the mixed view
            on the pseudo label alone).
        teacher_dropout: channel dropout on the teacher's bottleneck and last decoder features while it labels (the
            release's teacher is a V-Net with Dropout3d(0.5) there, run in train mode; nnU-Net's U-Net has no
            dropout, so without it the teacher is the student's average and agrees with it on 99.5 % of voxels).
        pseudo_label_confidence: the regional loss only where the teacher's maximum probability reaches this
            (None: everywhere, as the paper).
        pseudo_label_largest_component: each foreground class of the teacher's hard labels reduced to its largest
            connected component before the losses (BCP's filter; a wrongly segmented structure beside the target
            is no longer taught).
    The regional loss uses the full-resolution output only (``unsup_uses_deep_supervision = False``); the supervised
    loss is nnU-Net's deep-supervised Dice + CE.
    """

    ambiguity_tau: float = 0.425
    ambiguity_measure: str = "margin"
    ambiguity_from_both_views: bool = True
    ce_on_ambiguous_agree: bool = False
    disagree_label_smoothing: float = 0.2
    agree_dice_smooth: float = 1.0
    disagree_dice_smooth: float = 20.0
    mixup_alpha: float = 0.75
    noise_std: float = 0.1
    noise_clip: float = 0.2
    student_uses_strong_view: bool = False
    double_ema: bool = False
    student_weight_shrink: float = 0.0
    supervised_weight: float = 1.0
    pseudo_label_views: tuple[str, ...] = ("plain", "mixed")
    mixed_target_includes_label: bool = False
    teacher_dropout: float = 0.0
    pseudo_label_confidence: float | None = None
    pseudo_label_largest_component: bool = False
    unsup_weight = 1.0
    unsup_rampup_iterations = 6000  # the release: 40 x 150 iterations, of 15 000
    deployed_model = "student"  # the release's test_3d.py loads the student
    supports_regions = False  # the partition is defined on mutually exclusive classes

    loss_terms = ("sup", "pseudo_ce", "pseudo_dice")
    # L_pseudo = 0.5 * (mean of the Dice terms + mean of the CE terms); compute_losses returns the two means
    term_weights = {"sup": "supervised_weight", "pseudo_ce": 0.5, "pseudo_dice": 0.5}
    statistics = ("confident_fraction", "teacher_student_agreement", "agree_certain_fraction",
                  "disagree_certain_fraction", "ambiguous_fraction", "pseudo_label_kept_fraction",
                  "largest_component_share")

    def build_strong_transforms(self, nnunet_photometric: ComposeTransforms) -> ComposeTransforms:
        return nnunet_photometric if self.student_uses_strong_view else ComposeTransforms([])

    @property
    def unlabeled_views(self) -> tuple[str, ...]:
        return ("weak", "strong") if self.student_uses_strong_view else ("weak",)

    def initialize(self):
        super().initialize()
        self.teacher_dropout_hooks = None
        if self.teacher_dropout:
            encoder, decoder = encoder_and_decoder(self.teacher)
            self.teacher_dropout_hooks = ChannelDropoutOnOutputs([encoder.stages[-1], decoder.stages[-1]],
                                                                 self.teacher_dropout)

    def labeling_teacher_probabilities(self, data: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The teacher's probabilities for pseudo labels (with ``teacher_dropout``: channels dropped)."""
        if self.teacher_dropout_hooks is None:
            return self.teacher_probabilities(data)
        with self.teacher_dropout_hooks.active(generator):
            return self.teacher_probabilities(data)

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        x_l, x_u = labeled["data"], unlabeled["data_weak"]
        n_l, n_u = x_l.shape[0], x_u.shape[0]
        on_device, on_cpu = self.random_generator(x_u.device), self.random_generator("cpu")
        noisy_u = clipped_gaussian_noise(x_u, self.noise_std, self.noise_clip, on_device)
        noisy_l = clipped_gaussian_noise(x_l, self.noise_std, self.noise_clip, on_device)
        teacher = self.labeling_teacher_probabilities(noisy_u, on_device)
        pseudo = teacher.argmax(1, keepdim=True)  # (B_u, 1, *spatial)
        share = 1.0  # of the teacher's foreground voxels kept
        if self.pseudo_label_largest_component:
            pseudo, share = largest_component_per_class(pseudo, teacher.shape[1])
        self.log_step_statistic("largest_component_share", share)
        mixed, lambdas, partners = mixup_with_labeled_partners(noisy_u, noisy_l, self.mixup_alpha, on_cpu)
        targets = {"plain": pseudo, "mixed": pseudo}
        if self.mixed_target_includes_label:
            partner_labels = full_resolution(labeled["target"])[partners.to(x_l.device)]
            ignore = self.label_manager.ignore_label if self.label_manager.has_ignore_label else None
            targets["mixed"] = mixup_targets(pseudo, partner_labels, lambdas, teacher.shape[1], ignore)

        student_u = unlabeled["data_strong"] if self.student_uses_strong_view else x_u
        output = self.network(torch.cat([x_l, student_u, mixed]))
        logits = full_resolution(output)
        logits_u, logits_m = logits[n_l:n_l + n_u], logits[n_l + n_u:]
        probs_u, probs_m = self.probabilities(logits_u), self.probabilities(logits_m)
        regions = synergy_regions(probs_u.detach(), probs_m.detach(), self.ambiguity_tau, self.ambiguity_measure,
                                  self.ambiguity_from_both_views)
        kept = torch.ones_like(regions.agree_certain) if self.pseudo_label_confidence is None else \
            teacher.amax(1, keepdim=True) >= self.pseudo_label_confidence
        agree_certain, disagree_certain = regions.agree_certain & kept, regions.disagree_certain & kept
        hard_ce_region = agree_certain | (regions.agree_ambiguous & kept) if self.ce_on_ambiguous_agree \
            else agree_certain

        ce, dice = 0.0, 0.0
        views = {"plain": (logits_u, probs_u), "mixed": (logits_m, probs_m)}
        for view in self.pseudo_label_views:
            (view_logits, view_probs), target = views[view], targets[view]
            # mean over all voxels, as the paper: masked-out voxels count as zeros (per-sample masks)
            ce = ce + (voxel_cross_entropy(view_logits, target) * hard_ce_region
                       + voxel_cross_entropy(view_logits, target, self.disagree_label_smoothing)
                       * disagree_certain).mean()
            dice = dice + masked_soft_dice_loss(view_probs, target, agree_certain, self.agree_dice_smooth) \
                + masked_soft_dice_loss(view_probs, target, disagree_certain, self.disagree_dice_smooth)

        self.log_confidence_and_agreement(teacher, probs_u.detach(), "teacher_student_agreement")
        for name, mask in (("agree_certain_fraction", regions.agree_certain),
                           ("disagree_certain_fraction", regions.disagree_certain),
                           ("ambiguous_fraction", regions.ambiguous)):
            self.log_step_statistic(name, mask.float().mean())
        self.log_step_statistic("pseudo_label_kept_fraction", kept.float().mean())
        n_views = len(self.pseudo_label_views)  # one CE and two Dice terms per view
        return {"sup": self.supervised_loss(take_samples(output, n_l), labeled["target"]),
                "pseudo_ce": ce / n_views, "pseudo_dice": dice / (2 * n_views)}

    def after_optimizer_step(self) -> None:
        if self.double_ema:  # released: a fixed-0.99 EMA, then the warm-up EMA, every step
            ema_update(self.teacher, self.unwrapped_network(), self.teacher_momentum)
        if self.student_weight_shrink:  # released: between the two updates
            with torch.no_grad():
                for parameter in self.unwrapped_network().parameters():
                    parameter.mul_(1 - self.student_weight_shrink)
        super().after_optimizer_step()


class nnUNetTrainerSGRS_doubleEMA(nnUNetTrainerSGRS):
    """The current release's teacher update (ortonwang/SGRS-Net at c99025f): a fixed-0.99 EMA, the student's weights
    shrunk by (1 - 2e-4), then the warm-up EMA, every step."""

    double_ema = True
    student_weight_shrink = 2e-4


class nnUNetTrainerSGRS_releaseSupervisedWeight(nnUNetTrainerSGRS):
    """The release's supervised loss weight, 0.5 * (CE + Dice): half of nnU-Net's loss against the pseudo term."""

    supervised_weight = 0.5


class nnUNetTrainerSGRS_ceOnAmbiguousAgree(nnUNetTrainerSGRS):
    ce_on_ambiguous_agree = True


class nnUNetTrainerSGRS_plainViewAmbiguity(nnUNetTrainerSGRS):
    """Ambiguity from the plain view only: the release's first upload (2be1336), fixed in its commit ebccd19; the
    current release, like the default here, takes it from both views."""

    ambiguity_from_both_views = False


class nnUNetTrainerSGRS_maxProbAmbiguity(nnUNetTrainerSGRS):
    ambiguity_measure = "max_prob"


class nnUNetTrainerSGRS_entropyAmbiguity(nnUNetTrainerSGRS):
    ambiguity_measure = "entropy"  # the default before issue #20: misses two-class ties for C >= 3


class nnUNetTrainerSGRS_strongView(nnUNetTrainerSGRS):
    student_uses_strong_view = True


# ablations of the real-data check (issue #22): the unsupervised weight, and the regional loss on one view only
class nnUNetTrainerSGRS_unsupWeight0p1(nnUNetTrainerSGRS):
    unsup_weight = 0.1


# control of issue #37 item 4: the regional terms computed and logged but weighted 0, so the student trains on the
# labeled loss alone through SGRS's own step; what separates it from stock nnU-Net is not the unlabeled data's
class nnUNetTrainerSGRS_unsupWeight0(nnUNetTrainerSGRS):
    unsup_weight = 0.0


class nnUNetTrainerSGRS_plainViewLossOnly(nnUNetTrainerSGRS):
    pseudo_label_views = ("plain",)


# the changes of issue #37 item 4, each keeping the mechanism (teacher labels, MixUp with a labeled partner, regions)
class nnUNetTrainerSGRS_mixedTargetWithLabel(nnUNetTrainerSGRS):
    mixed_target_includes_label = True


class nnUNetTrainerSGRS_teacherDropout(nnUNetTrainerSGRS):
    teacher_dropout = 0.5  # the release's Dropout3d(0.5)


class nnUNetTrainerSGRS_confidentPseudoLabels(nnUNetTrainerSGRS):
    pseudo_label_confidence = 0.95


class nnUNetTrainerSGRS_largestComponentPseudoLabels(nnUNetTrainerSGRS):
    pseudo_label_largest_component = True


class nnUNetTrainerSGRS_deployBestValidated(nnUNetTrainerSGRS):
    deployed_model = BEST_VALIDATED


class nnUNetTrainerSGRS_50epochs(nnUNetTrainerSGRS):
    epochs = 50


class nnUNetTrainerSGRS_100epochs(nnUNetTrainerSGRS):
    epochs = 100


class nnUNetTrainerSGRS_250epochs(nnUNetTrainerSGRS):
    epochs = 250


class nnUNetTrainerSGRS_500epochs(nnUNetTrainerSGRS):
    epochs = 500
