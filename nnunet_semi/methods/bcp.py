"""Bidirectional Copy-Paste (BCP, Bai et al., CVPR 2023; the recipe most later Left Atrium results build on) on
nnU-Net.

Per step, one cube mask M (``cube_ratio`` of every patch edge, at a random position) and, for every pair of a
labeled and an unlabeled crop, two mixed images: the labeled crop with the unlabeled one pasted into M, and the
unlabeled crop with a labeled one pasted into M. Their targets are mixed the same way from the ground truth and the
EMA teacher's pseudo labels (argmax, the largest connected component per class). Each image's loss is nnU-Net's Dice
+ CE with deep supervision, computed apart on its ground-truth part (weight 1, ``mixed_truth``) and its pseudo-label
part (weight ``unsup_weight`` = 0.5, ``mixed_pseudo``): ground truth enters every unlabeled loss, and no image is a
pure pseudo-label target. There is no pure labeled or pure unlabeled term, as in the release.
"""

from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_semi.components.mixing import cube_mask
from nnunet_semi.components.pseudo_labels import largest_component_per_class
from nnunet_semi.components.schedules import StepDecayLRScheduler
from nnunet_semi.trainer.base import SemiSupervisedTrainerBase
from nnunet_semi.trainer.outputs import full_resolution


def _check_cube(trainer: nnUNetTrainer) -> None:
    """The cube fits the plans' patch (a one-line ValueError naming the ratio and the patch otherwise)."""
    try:
        cube_mask(trainer.configuration_manager.patch_size, trainer.cube_ratio)
    except ValueError as error:
        raise ValueError(f"{type(trainer).__name__}.cube_ratio: {error}") from None


def _per_scale(trainer: nnUNetTrainer, labels: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
    """Full-resolution labels (B, 1, *patch) downsampled to every deep-supervision scale as nnU-Net's data pipeline
    downsamples its targets (``DownsampleSegForDSTransform``, nearest); the labels themselves without deep
    supervision."""
    scales = trainer._get_deep_supervision_scales()
    if not trainer.enable_deep_supervision or scales is None:
        return labels
    # the transform resizes the channels of one sample: the batch stands in for the channels
    return [s[:, None] for s in DownsampleSegForDSTransform(scales)._apply_to_segmentation(labels[:, 0])]


class nnUNetTrainerBCP(SemiSupervisedTrainerBase):
    """BCP's self-training stage (see the module doc), best started warm (``-pretrained_weights``: BCP itself
    pre-trains on labeled data and loads those weights into student and teacher).

    Attributes (beyond the base's):
        cube_ratio: the cube's edge over the patch edge, in (0, 1) (the release: 2/3).
        unsup_weight: the pseudo-label part's weight (the release's u_weight 0.5), from the first step.

    Pairs: the i-th labeled and unlabeled crops make image 1 (labeled outside M, unlabeled inside) and image 2 (the
    unlabeled crop outside M, the next labeled crop inside), so every labeled crop appears in both kinds; the batch
    sizes pair up to the smaller one. The student runs once on the 2 x pairs mixed images. Pseudo labels: the
    teacher's argmax on the plain unlabeled crop (for two classes the release's foreground probability >= 0.5), then
    per foreground class the largest connected component. Region-based labels are refused (mutually exclusive classes
    are mixed); an ignore label of the dataset stays ignored in the ground-truth part.
    """

    cube_ratio: float = 2 / 3
    unsup_weight = 0.5  # the release's u_weight
    ramped_terms = ()  # the release's self-training has no ramp
    teacher_momentum = 0.99
    unlabeled_views = ("weak",)  # teacher and student see the plain crop; the mixing is the perturbation
    deployed_model = "student"  # the release's test code loads the student
    supports_regions = False
    unsup_uses_deep_supervision = True  # the pseudo part is nnU-Net's deep-supervised loss, like the truth part
    loss_terms = ("mixed_truth", "mixed_pseudo")
    supervised_terms = ("mixed_truth",)
    statistics = ("confident_fraction", "pseudo_foreground_fraction", "largest_component_share")

    def initialize(self):
        _check_cube(self)
        super().initialize()
        # nnU-Net's Dice + CE with deep supervision, as configured in its _build_loss, with an ignore label that masks
        # the other part of each mixed target
        self.part_label = self.label_manager.ignore_label if self.label_manager.has_ignore_label else \
            self.label_manager.num_segmentation_heads
        part_loss = DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5,
                                    "do_bg": False, "ddp": self.is_ddp}, {}, weight_ce=1, weight_dice=1,
                                   ignore_label=self.part_label, dice_class=MemoryEfficientSoftDiceLoss)
        self.part_loss = DeepSupervisionWrapper(part_loss, self.loss.weight_factors) \
            if isinstance(self.loss, DeepSupervisionWrapper) else part_loss

    @torch.no_grad()
    def pseudo_labels(self, data: torch.Tensor) -> torch.Tensor:
        """The teacher's hard labels (B, 1, *patch), each foreground class reduced to its largest component."""
        probs = self.teacher_probabilities(data)
        self.log_step_statistic("confident_fraction", (probs.max(1).values > self.confidence_threshold).float().mean())
        labels, share = largest_component_per_class(probs.argmax(1, keepdim=True), probs.shape[1])
        self.log_step_statistic("largest_component_share", share)
        self.log_step_statistic("pseudo_foreground_fraction", (labels > 0).float().mean())
        return labels

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        pairs = min(labeled["data"].shape[0], unlabeled["data_weak"].shape[0])
        x_l, x_u = labeled["data"][:pairs], unlabeled["data_weak"][:pairs]
        truth = full_resolution(labeled["target"])[:pairs]
        pseudo = self.pseudo_labels(x_u).to(truth.dtype)
        cube = cube_mask(x_l.shape[2:], self.cube_ratio, x_l.device, self.random_generator("cpu"))
        partner = torch.roll(torch.arange(pairs, device=x_l.device), -1)  # image 2 pastes the next labeled crop
        images = torch.cat([torch.where(cube, x_u, x_l), torch.where(cube, x_l[partner], x_u)])
        part = torch.full_like(truth, self.part_label)
        truth_part = torch.cat([torch.where(cube, part, truth), torch.where(cube, truth[partner], part)])
        pseudo_part = torch.cat([torch.where(cube, pseudo, part), torch.where(cube, part, pseudo)])
        output = self.network(images)
        return {"mixed_truth": self.part_loss(output, _per_scale(self, truth_part)),
                "mixed_pseudo": self.part_loss(output, _per_scale(self, pseudo_part))}


class nnUNetTrainerBCP_stepLR(nnUNetTrainerBCP):
    """The release's schedule mapped onto the run: the learning rate divided by 10 every sixth of the training (the
    release: every 2 500 of 15 000 iterations) instead of nnU-Net's poly decay."""

    def configure_optimizers(self):
        optimizer, poly = super().configure_optimizers()
        assert isinstance(poly, PolyLRScheduler)
        return optimizer, StepDecayLRScheduler(optimizer, self.initial_lr, self.num_epochs, steps=6, factor=0.1)


class nnUNetTrainerBCP_copyPastePretrain(nnUNetTrainerBCP):
    """BCP started from the release's labeled copy-paste pre-training (``nnUNetTrainer_BCPPretrain``) instead of
    stock nnU-Net: the benchmark's warm-start mode trains that start and continues from it."""

    warm_start_trainer = "nnUNetTrainer_BCPPretrain"


class nnUNetTrainer_BCPPretrain(nnUNetTrainer):
    """BCP's pre-training: stock nnU-Net on the labeled cases, each crop with the next crop of the batch pasted into
    one cube per step (``cube_ratio`` of every edge), the labels mixed the same way; nnU-Net's own step, loss and
    schedule. Its checkpoint is the warm start of ``nnUNetTrainerBCP_copyPastePretrain``."""

    cube_ratio: float = nnUNetTrainerBCP.cube_ratio

    def initialize(self):
        _check_cube(self)
        super().initialize()
        self._cube_generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"]
        cube = cube_mask(data.shape[2:], self.cube_ratio, data.device, self._cube_generator)
        partner = torch.roll(torch.arange(data.shape[0]), -1)
        batch = batch | {"data": torch.where(cube, data[partner], data)}
        targets = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
        mixed = []
        for target in targets:  # every deep-supervision scale with the cube at its resolution (nearest)
            scaled = torch.nn.functional.interpolate(cube.float(), target.shape[2:], mode="nearest-exact").bool()
            mixed.append(torch.where(scaled, target[partner], target))
        batch["target"] = mixed if isinstance(batch["target"], list) else mixed[0]
        return super().train_step(batch)


class nnUNetTrainerBCP_50epochs(nnUNetTrainerBCP):
    epochs = 50


class nnUNetTrainerBCP_100epochs(nnUNetTrainerBCP):
    epochs = 100


class nnUNetTrainerBCP_250epochs(nnUNetTrainerBCP):
    epochs = 250


class nnUNetTrainerBCP_500epochs(nnUNetTrainerBCP):
    epochs = 500

