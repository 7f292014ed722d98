"""Cross pseudo supervision (Chen et al., CVPR 2021) on nnU-Net: two networks of the same plans, differently
initialised, each trained on the other's hard pseudo labels."""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_semi.components.losses import hard_pseudo_label_loss
from nnunet_semi.errors import SemiInputError
from nnunet_semi.trainer.base import SEMI_STATE_KEY, SemiSupervisedTrainerBase
from nnunet_semi.trainer.outputs import full_resolution, take_samples
from nnunet_semi.trainer.warm_start import PEER_WEIGHTS_VARIABLE, load_whole


class nnUNetTrainerCPS(SemiSupervisedTrainerBase):
    """Network 1 is ``self.network`` (deployed); network 2, the peer, lives in ``auxiliary["peer"]``.

    Both networks get the same batch (labeled samples and the strong view of the unlabeled crops) and nnU-Net's
    supervised loss with deep supervision. The cross term is the CE of each network's full-resolution output
    against the other's argmax (``cps_on_labeled``: on labeled samples too, as in the paper). One optimizer with a
    parameter group per network, so nnU-Net's poly learning rate and GradScaler drive both.

    Warm start (``-pretrained_weights``): network 1 loads the checkpoint; the peer loads its own labeled-only
    checkpoint (``peer_warm_start_checkpoint`` or ``$nnUNet_semi_peer_weights``: a stock run of another seed),
    else it starts from its own random initialisation, as from scratch. Never the student's checkpoint: two
    identical networks on the same batch would stay identical and teach each other nothing.
    """

    teacher_momentum = None
    unsup_weight = 1.5  # the paper's lambda, constant from the first step
    ramped_terms = ()
    cps_on_labeled: bool = True
    unlabeled_views = ("strong",)  # both networks see the same strong view; no teacher view
    loss_terms = ("sup", "sup_peer", "cross_pseudo")
    supervised_terms = ("sup", "sup_peer")
    statistics = ("confident_fraction", "network_agreement")
    peer_labeled_only_trainer = "nnUNetTrainer"  # the peer warm-starts from stock nnU-Net of another seed

    def build_auxiliary_modules(self) -> nn.ModuleDict:
        modules = super().build_auxiliary_modules()
        modules["peer"] = self.build_peer_network()
        return modules

    def build_peer_network(self) -> nn.Module:
        """Network 2. Default: the plans' architecture again (nnU-Net initialises it independently)."""
        return self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision)

    @classmethod
    def member_weights(cls, checkpoint: dict) -> dict[str, dict]:
        """Network 1 (``student``, deployed) and the ``peer``."""
        peer = {k[len("peer."):]: v for k, v in checkpoint.get(SEMI_STATE_KEY, {}).get("auxiliary", {}).items()
                if k.startswith("peer.")}
        return {"student": checkpoint["network_weights"], "peer": peer} if peer else {}

    @classmethod
    def exportable_networks(cls, checkpoint: dict) -> dict[str, tuple[dict, dict | None]]:
        return {name: (weights, None) for name, weights in cls.member_weights(checkpoint).items()} or \
            super().exportable_networks(checkpoint)

    def load_warm_start_auxiliary(self, checkpoint_file: str) -> None:
        super().load_warm_start_auxiliary(checkpoint_file)
        peer_checkpoint = self.peer_checkpoint()
        if peer_checkpoint is None:
            self.print_to_log_file(f"Warm start: the peer network starts from its own random initialisation (give "
                                   f"it a labeled-only checkpoint of its own with {PEER_WEIGHTS_VARIABLE}).")
            return
        if os.path.abspath(peer_checkpoint) == os.path.abspath(checkpoint_file):
            raise SemiInputError(f"{PEER_WEIGHTS_VARIABLE} {peer_checkpoint} is the student's -pretrained_weights: "
                                 f"the two networks would stay identical; give the peer a checkpoint of its own "
                                 f"(another seed).")
        load_whole(self.auxiliary["peer"], peer_checkpoint, self.dataset_json,
                   f"the peer network of {type(self).__name__}", what=PEER_WEIGHTS_VARIABLE)
        self.print_to_log_file(f"Warm start: every layer of {peer_checkpoint} loaded into the peer network.")

    def initialize(self):
        super().initialize()
        peer = self.auxiliary["peer"]
        # compiled and DDP-wrapped like nnU-Net's self.network; the parameters stay those of auxiliary["peer"]
        forward = torch.compile(peer) if self._do_i_compile() else peer
        self.peer_forward = DDP(forward, device_ids=[self.local_rank]) if self.is_ddp else forward
        if self.is_ddp:
            self.ddp_wrapped_auxiliary.add("peer")

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        num_labeled = labeled["data"].shape[0]
        data = torch.cat([labeled["data"], unlabeled["data_strong"]])
        outputs = [self.network(data), self.peer_forward(data)]
        first = 0 if self.cps_on_labeled else num_labeled
        logits = [full_resolution(o)[first:] for o in outputs]
        probs = [self.probabilities(x).detach() for x in logits]
        regions = self.label_manager.has_regions
        cross = (hard_pseudo_label_loss(logits[0], probs[1], regions)
                 + hard_pseudo_label_loss(logits[1], probs[0], regions))
        unlabeled_start = num_labeled - first
        self.log_confidence_and_agreement(probs[0][unlabeled_start:], probs[1][unlabeled_start:], "network_agreement")
        return {"sup": self.supervised_loss(take_samples(outputs[0], num_labeled), labeled["target"]),
                "sup_peer": self.supervised_loss(take_samples(outputs[1], num_labeled), labeled["target"]),
                "cross_pseudo": cross}


class nnUNetTrainerCPS_ssl4mis(nnUNetTrainerCPS):
    """The medical 3D form of SSL4MIS: weight 0.1 ramped over its 30 000-iteration run, unlabeled samples only."""

    unsup_weight = 0.1
    unsup_rampup_iterations = 30_000
    ramped_terms = None
    cps_on_labeled = False


class nnUNetTrainerCPS_50epochs(nnUNetTrainerCPS):
    epochs = 50


class nnUNetTrainerCPS_100epochs(nnUNetTrainerCPS):
    epochs = 100


class nnUNetTrainerCPS_250epochs(nnUNetTrainerCPS):
    epochs = 250


class nnUNetTrainerCPS_500epochs(nnUNetTrainerCPS):
    epochs = 500
