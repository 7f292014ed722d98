"""Uncertainty-guided dual network (Lu et al., Knowledge-Based Systems 2025; documentation/methods/dual_cce.md) on nnU-Net, as the
paper intends: every unsupervised term carries gradient (the released code trains only two of them)."""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_semi.components.ensemble import DEPLOYED_MEMBERS, DualNetworkEnsemble, is_ensemble_state, member_state
from nnunet_semi.components.feature_capture import DecoderFeatures
from nnunet_semi.components.losses import (
    cosine_consistency_loss,
    hard_pseudo_label_loss,
    kl_weighted_pseudo_label_loss,
    masked_probability_mse,
    masked_pseudo_label_cross_entropy,
)
from nnunet_semi.components.masks import cross_reliable_mask, entropy_percentile_mask
from nnunet_semi.components.networks import (
    RESENC_BLOCKS_PER_STAGE,
    build_network,
    features_per_stage,
    plans_architecture,
    residual_encoder_sibling,
)
from nnunet_semi.components.prototypes import PrototypeBank, gather_voxels
from nnunet_semi.components.pseudo_labels import union_pseudo_label
from nnunet_semi.methods.cps import nnUNetTrainerCPS
from nnunet_semi.trainer.base import SEMI_STATE_KEY
from nnunet_semi.trainer.deployment import BEST_VALIDATED
from nnunet_semi.trainer.outputs import full_resolution, take_samples

NETWORK_KINDS = ("plans", "residual_encoder")


class _MemberInTrainingEnsembleAtInference:
    """``build_network_architecture`` of the dual network. nnU-Net calls it on the trainer instance in
    ``initialize`` (2.8: ``self.network = self.build_network_architecture(...)``), where it must build network 1,
    the plain plans network that ``self.network`` is during training; and on the class in ``nnUNetv2_predict``
    (``trainer_class.build_network_architecture(...)``), where it must build the deployable model holding both
    networks. Accessed on an instance it is ``build_member_network``, on the class ``build_deployable_model``."""

    def __get__(self, trainer, trainer_class):
        return trainer_class.build_deployable_model if trainer is None else trainer.build_member_network


class nnUNetTrainerDualCCE(nnUNetTrainerCPS):
    """Two networks of the same plans (by default the plans' U-Net and a residual-encoder sibling) trained on the
    same batch, with cross consistency enhancement, KL-weighted pseudo supervision and prototype contrast.

    Terms (``loss_terms``, returned unweighted; the base multiplies each by the weight attribute that
    ``term_weights`` names; only ``prototype`` is ramped, as the release ramps lambda_c, the others enter from the
    first step):
        sup, sup_peer: nnU-Net's loss with deep supervision, per network.
        sup_cross_reliable: on labeled voxels where the two networks' confident (max p >= 0.6) foreground decisions
            differ, the squared error of each network's foreground probabilities to the one-hot label (the paper's
            L_cr; the release's binary form for two classes).
        entropy_filtered: CE of each network against the union pseudo label on the unlabeled voxels whose
            normalised entropy is below the ``entropy_percent``-th percentile for at least one network, averaged
            over the kept voxels (``entropy_filtered_release_scale``: times N / N_kept once more, as released).
        kl_weighted: exp(-KL)-weighted CE toward the other network's argmax plus the KL itself, both directions
            (``kl_symmetric``; False: only the peer toward network 1, as released).
        output_cosine: mean over voxels of 1 - cos(p_1, p_2) over the class axis, every sample, both networks.
        prototype: InfoNCE of the uncertain (not kept) unlabeled voxels' full-resolution decoder features, labeled
            by the network's own argmax, against class prototypes that are EMA means of the kept voxels' features
            under the union label; one prototype bank per network (buffers, saved in ``semi_state``). At most
            ``contrast_voxels_per_class`` voxels of each class enter the update and the contrast.
        cross_pseudo (``_plainCrossPseudo`` only): plain cross pseudo supervision, in neither the paper nor the
            release.

    Deep supervision: only ``sup`` and ``sup_peer``; every other term uses the full-resolution output and decoder
    features.

    Deployment: the softmax-average ensemble of both networks (``deployed_model``, the release's test code), or
    "student" (network 1), "peer", or "best_validated": the best of the three by validation pseudo Dice over the
    last ``deploy_selection_epochs`` epochs (ties: ensemble, then peer). ``build_network_architecture`` (what
    ``nnUNetv2_predict`` calls) returns a ``DualNetworkEnsemble`` whose ``deployed_member`` buffer says which of the
    three predicts; during training ``self.network`` is the plain plans network.

    Warm start: as CPS's; the peer's own labeled-only checkpoint is a ``nnUNetTrainer_DualCCEPeer`` run (stock
    nnU-Net training the peer's architecture).
    """

    build_network_architecture = _MemberInTrainingEnsembleAtInference()
    network_pair: tuple[str, str] = ("plans", "residual_encoder")
    peer_labeled_only_trainer = "nnUNetTrainer_DualCCEPeer"  # stock nnU-Net training the peer's architecture
    deployed_model = "ensemble"
    peer_blocks_per_stage: tuple[int, ...] | None = RESENC_BLOCKS_PER_STAGE
    unsup_weight = 1.0
    unsup_rampup_iterations = 6000  # lambda_c: 40 x 150 iterations
    ramped_terms = ("prototype",)
    cross_pseudo_weight: float = 1.0  # only where loss_terms has "cross_pseudo"
    entropy_percent: float = 20.0
    entropy_filtered_weight: float = 1.0
    entropy_filtered_release_scale: bool = False
    kl_weight: float = 1.0
    kl_symmetric: bool = True
    cosine_weight: float = 1.0
    prototype_weight: float = 0.1
    prototype_temperature: float = 0.1
    prototype_momentum: float = 0.99
    contrast_voxels_per_class: int = 2048
    cross_reliable_weight: float = 0.5
    cross_reliable_confidence: float = 0.6
    supports_regions = False
    loss_terms = ("sup", "sup_peer", "sup_cross_reliable", "entropy_filtered", "kl_weighted", "output_cosine",
                  "prototype")
    supervised_terms = ("sup", "sup_peer", "sup_cross_reliable")
    term_weights = {"sup_cross_reliable": "cross_reliable_weight", "entropy_filtered": "entropy_filtered_weight",
                    "kl_weighted": "kl_weight", "output_cosine": "cosine_weight", "prototype": "prototype_weight"}
    statistics = ("confident_fraction", "network_agreement", "kept_fraction", "mean_kl", "prototype_similarity")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.best_single_network = "student"

    # --------------------------------------------------------------------------------------------- networks
    @classmethod
    def peer_architecture(cls, configuration_manager) -> dict:
        """Plans architecture dict of network 2."""
        first, second = cls.network_pair
        if first != "plans" or second not in NETWORK_KINDS:
            raise ValueError(f"{cls.__name__}.network_pair must be ('plans', one of {NETWORK_KINDS}), got "
                             f"{cls.network_pair}: network 1 is self.network, the plans' architecture.")
        architecture = plans_architecture(configuration_manager)
        if second == "residual_encoder":
            return residual_encoder_sibling(architecture, cls.peer_blocks_per_stage)
        return architecture

    def build_member_network(self, plans_manager, configuration_manager, num_input_channels: int,
                             num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """Network 1: nnU-Net's network of the plans."""
        return super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                  num_output_channels, enable_deep_supervision)

    @classmethod
    def build_deployable_model(cls, plans_manager, configuration_manager, num_input_channels: int,
                               num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """The deployable model ``nnUNetv2_predict`` builds: both networks; the checkpoint's weights decide which
        of them, or their ensemble, predicts (single-network weights deploy network 1)."""
        first = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                   num_output_channels, enable_deep_supervision)
        second = build_network(cls.peer_architecture(configuration_manager), num_input_channels,
                               num_output_channels, enable_deep_supervision)
        return DualNetworkEnsemble(first, second)

    def build_peer_network(self) -> nn.Module:
        return build_network(self.peer_architecture(self.configuration_manager), self.num_input_channels,
                             self.label_manager.num_segmentation_heads, self.enable_deep_supervision)

    def build_auxiliary_modules(self) -> nn.ModuleDict:
        modules = super().build_auxiliary_modules()
        feature_dim = features_per_stage(self.configuration_manager)[0]  # full-resolution decoder stage
        for name in ("prototypes_first", "prototypes_peer"):
            modules[name] = PrototypeBank(self.label_manager.num_segmentation_heads, feature_dim,
                                          self.prototype_momentum)
        return modules

    def initialize(self):
        super().initialize()
        # before the first (possibly compiled) forward: torch.compile skips hooks added after it
        self.first_features = DecoderFeatures(self.unwrapped_network())
        self.peer_features = DecoderFeatures(self.auxiliary["peer"])

    def set_deep_supervision_enabled(self, enabled: bool):
        if isinstance(self.network, DualNetworkEnsemble):  # final validation of a deployed peer or ensemble
            for network in (self.network.first, self.network.second):
                network.decoder.deep_supervision = enabled
            return
        super().set_deep_supervision_enabled(enabled)
        if "peer" in self.auxiliary:
            self.auxiliary["peer"].decoder.deep_supervision = enabled

    # ----------------------------------------------------------------------------------------------- losses
    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        num_labeled = labeled["data"].shape[0]
        data = torch.cat([labeled["data"], unlabeled["data_strong"]])
        with self.first_features as first_features, self.peer_features as peer_features:
            outputs = [self.network(data), self.peer_forward(data)]
        logits = [full_resolution(o) for o in outputs]
        probs = [self.probabilities(z).detach() for z in logits]

        terms = {"sup": self.supervised_loss(take_samples(outputs[0], num_labeled), labeled["target"]),
                 "sup_peer": self.supervised_loss(take_samples(outputs[1], num_labeled), labeled["target"]),
                 "sup_cross_reliable": self._cross_reliable_loss(
                     [z[:num_labeled] for z in logits], [p[:num_labeled] for p in probs], labeled["target"])}

        first = 0 if self.cps_on_labeled else num_labeled
        if "cross_pseudo" in self.loss_terms:
            terms["cross_pseudo"] = (hard_pseudo_label_loss(logits[0][first:], probs[1][first:])
                                     + hard_pseudo_label_loss(logits[1][first:], probs[0][first:]))
        kl_peer, mean_kl = kl_weighted_pseudo_label_loss(logits[1][first:], probs[0][first:])
        kl_total = kl_peer
        if self.kl_symmetric:
            kl_first, mean_kl_first = kl_weighted_pseudo_label_loss(logits[0][first:], probs[1][first:])
            kl_total, mean_kl = kl_total + kl_first, (mean_kl + mean_kl_first) / 2
        terms["kl_weighted"] = kl_total
        terms["output_cosine"] = cosine_consistency_loss(
            self.probabilities(logits[0][first:]), self.probabilities(logits[1][first:]))

        unlabeled_logits = [z[num_labeled:] for z in logits]
        unlabeled_probs = [p[num_labeled:] for p in probs]
        union = union_pseudo_label(*unlabeled_probs)
        kept = entropy_percentile_mask(*unlabeled_probs, percent=self.entropy_percent,
                                       generator=self.random_generator("cpu"))
        on_device = self.random_generator(kept.device)
        terms["entropy_filtered"] = sum(
            masked_pseudo_label_cross_entropy(z, union, kept, self.entropy_filtered_release_scale)
            for z in unlabeled_logits)

        prototype_loss, similarities = 0.0, []
        for captured, bank, own_probs in ((first_features, self.auxiliary["prototypes_first"], unlabeled_probs[0]),
                                          (peer_features, self.auxiliary["prototypes_peer"], unlabeled_probs[1])):
            features = captured.take()[num_labeled:]
            bank.update(*gather_voxels(features.detach(), union, kept, self.contrast_voxels_per_class, on_device))
            uncertain_features, uncertain_labels = gather_voxels(
                features, own_probs.argmax(1, keepdim=True), ~kept, self.contrast_voxels_per_class, on_device)
            prototype_loss = prototype_loss + bank.contrast_loss(uncertain_features, uncertain_labels,
                                                                 self.prototype_temperature)
            similarities.append(bank.similarity_to_own_class(uncertain_features.detach(), uncertain_labels))
        terms["prototype"] = prototype_loss

        self.log_confidence_and_agreement(unlabeled_probs[0], unlabeled_probs[1], "network_agreement")
        self.log_step_statistic("kept_fraction", kept.float().mean())
        self.log_step_statistic("mean_kl", mean_kl)
        self.log_step_statistic("prototype_similarity", torch.tensor(similarities).nanmean())
        return terms

    def _cross_reliable_loss(self, logits: list[torch.Tensor], probs: list[torch.Tensor], target) -> torch.Tensor:
        """L_cr summed over both networks on the labeled samples (full resolution)."""
        labels = full_resolution(target)
        ignore = labels == self.label_manager.ignore_label if self.label_manager.has_ignore_label else None
        region = cross_reliable_mask(probs[0], probs[1], self.cross_reliable_confidence)
        return sum(masked_probability_mse(self.probabilities(z), labels.long(), region, ignore) for z in logits)

    # ----------------------------------------------------------------------------------- validation, deploy
    def validated_models(self) -> tuple[str, ...]:
        return ("peer", "ensemble")

    @torch.no_grad()
    def validation_probabilities(self, data: torch.Tensor, network_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        first = self.probabilities(network_logits)
        peer = self.probabilities(full_resolution(self.peer_forward(data)))
        return {"peer": peer, "ensemble": (first + peer) / 2}

    def finalize_deployed_weights(self) -> None:
        """Deploy what ``deployed_model`` says, and remember the single network ``nnUNetv2_semi_export`` writes:
        the deployed one, network 1 for the ensemble, or under "best_validated" the better validated of the two."""
        scores = self.validation_scores()
        self.deployed_weights = self.declared_deployment(scores)
        if self.deployed_model == BEST_VALIDATED:
            self.best_single_network = self.choose_deployed_weights({k: scores[k] for k in ("student", "peer")})
        else:
            self.best_single_network = "peer" if self.deployed_weights == "peer" else "student"
        self.print_to_log_file(f"network_weights in checkpoint_final.pth: {self.deployed_weights} (better single "
                               f"network, for export: {self.best_single_network})")

    @classmethod
    def member_weights(cls, checkpoint: dict) -> dict[str, dict]:
        """Network 1 (``student``), the ``peer`` and their ``ensemble``, each as weights of the deployable
        ``DualNetworkEnsemble`` whose ``deployed_member`` selects it."""
        state = checkpoint.get(SEMI_STATE_KEY) or {}
        peer = member_state(state.get("auxiliary", {}), "peer")
        if not peer:
            return {}
        weights = checkpoint["network_weights"]
        first, second = (member_state(weights, "first"), member_state(weights, "second")) \
            if is_ensemble_state(weights) else (weights, peer)

        def deploying(member: str) -> dict:
            return {**{f"first.{k}": v for k, v in first.items()}, **{f"second.{k}": v for k, v in second.items()},
                    "deployed_member": torch.tensor(DEPLOYED_MEMBERS.index(member))}

        return {"student": deploying("first"), "peer": deploying("second"), "ensemble": deploying("ensemble")}

    @classmethod
    def exportable_networks(cls, checkpoint: dict) -> dict[str, tuple[dict, dict | None]]:
        """Network 1 with the plans' architecture and the peer with its own (the ensemble is no single network)."""
        state = checkpoint.get(SEMI_STATE_KEY) or {}
        if "peer_architecture" not in state:
            return super().exportable_networks(checkpoint)
        weights = checkpoint["network_weights"]
        first = member_state(weights, "first") if is_ensemble_state(weights) else weights
        return {"student": (first, None),
                "peer": (member_state(state["auxiliary"], "peer"), state["peer_architecture"])}

    @classmethod
    def default_export(cls, checkpoint: dict) -> str:
        """The single network that validated better alone, recorded at the end of training (network 1 before)."""
        return (checkpoint.get(SEMI_STATE_KEY) or {}).get("best_single_network", "student")

    def deployable_model(self) -> DualNetworkEnsemble:
        member = {"student": "first", "peer": "second", "ensemble": "ensemble"}[self.deployed_weights]
        return DualNetworkEnsemble(self.unwrapped_network(), self.auxiliary["peer"], member)

    def deployed_network_state(self) -> dict | None:
        return None if self.deployed_weights == "student" else self.deployable_model().state_dict()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.deployed_weights == "student":
            return super().perform_actual_validation(save_probabilities)
        trained = self.network
        self.network = self.deployable_model()  # validate what checkpoint_final.pth deploys
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.network = trained

    # ------------------------------------------------------------------------------------------ checkpoints
    def semi_state(self) -> dict:
        return super().semi_state() | {"best_single_network": self.best_single_network,
                                       "peer_architecture": self.peer_architecture(self.configuration_manager)}

    def load_semi_state(self, state: dict) -> None:
        super().load_semi_state(state)
        self.best_single_network = state.get("best_single_network", "student")

    def prepare_loaded_checkpoint(self, checkpoint: dict) -> dict:
        # a final checkpoint deploying the peer or the ensemble: self.network takes network 1's part (the peer comes
        # from semi_state)
        if not is_ensemble_state(checkpoint["network_weights"]):
            return checkpoint
        return checkpoint | {"network_weights": member_state(checkpoint["network_weights"], "first")}


class nnUNetTrainerDualCCE_plainCrossPseudo(nnUNetTrainerDualCCE):
    """Adds plain cross pseudo supervision (CE toward the other network's argmax on every voxel), which this
    trainer had before it followed the paper; it largely cancels the KL weighting."""

    loss_terms = nnUNetTrainerDualCCE.loss_terms + ("cross_pseudo",)
    term_weights = nnUNetTrainerDualCCE.term_weights | {"cross_pseudo": "cross_pseudo_weight"}


class nnUNetTrainerDualCCE_releaseCCEScale(nnUNetTrainerDualCCE):
    """The release's CCE scale: the kept-voxel mean times N / N_kept."""

    entropy_filtered_release_scale = True


class nnUNetTrainerDualCCE_samePair(nnUNetTrainerDualCCE):
    network_pair = ("plans", "plans")
    peer_labeled_only_trainer = "nnUNetTrainer"


class nnUNetTrainerDualCCE_oneWayKL(nnUNetTrainerDualCCE):
    kl_symmetric = False


class nnUNetTrainerDualCCE_noPrototype(nnUNetTrainerDualCCE):
    prototype_weight = 0.0


# control of the real-data check (issue #22): only the `supervised_terms` train; the unsupervised ones are still
# computed and logged but weighted 0, so what remains of a gain is not the unlabeled data's
class nnUNetTrainerDualCCE_unsupWeight0(nnUNetTrainerDualCCE):
    unsup_weight = 0.0


class nnUNetTrainer_DualCCEPeer(nnUNetTrainer):
    """Stock nnU-Net on the labeled cases alone, training DualCCE's network 2 (the plans U-Net's residual-encoder
    sibling) as ``self.network``: the labeled-only baseline for a dual network whose peer or ensemble is deployed,
    since a stronger architecture alone may explain part of its gain over stock's plain U-Net. Predicts with
    ``nnUNetv2_predict`` like any stock trainer."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_network(nnUNetTrainerDualCCE.peer_architecture(configuration_manager), num_input_channels,
                             num_output_channels, enable_deep_supervision)


class nnUNetTrainerDualCCE_deployBestValidated(nnUNetTrainerDualCCE):
    deployed_model = BEST_VALIDATED


class nnUNetTrainerDualCCE_50epochs(nnUNetTrainerDualCCE):
    epochs = 50


class nnUNetTrainerDualCCE_100epochs(nnUNetTrainerDualCCE):
    epochs = 100


class nnUNetTrainerDualCCE_250epochs(nnUNetTrainerDualCCE):
    epochs = 250


class nnUNetTrainerDualCCE_500epochs(nnUNetTrainerDualCCE):
    epochs = 500
