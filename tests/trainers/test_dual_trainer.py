"""nnUNetTrainerDualCCE on the tiny planned dataset: the network pair, gradient of every term, statistics, and the
deployment of network 1, the peer or their ensemble through checkpoint, nnU-Net's builder and the export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from helpers import has_grad, make_trainer, next_batches, tiny_schedule
from nnunet_semi.components.ensemble import DualNetworkEnsemble, is_ensemble_state
from nnunet_semi.errors import SemiInputError
from nnunet_semi.methods import (
    nnUNetTrainer_DualCCEPeer,
    nnUNetTrainerDualCCE,
    nnUNetTrainerDualCCE_deployBestValidated,
    nnUNetTrainerDualCCE_oneWayKL,
    nnUNetTrainerDualCCE_plainCrossPseudo,
    nnUNetTrainerDualCCE_releaseCCEScale,
    nnUNetTrainerDualCCE_samePair,
    nnUNetTrainerDualCCE_unsupWeight0,
)
from nnunet_semi.tools.export import export_vanilla


def test_network_pair_optimizer_groups_and_inference_builder(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE))
    assert type(trainer.network).__name__ == "PlainConvUNet"  # self.network stays the stock network
    peer = trainer.auxiliary["peer"]
    assert type(peer).__name__ == "ResidualEncoderUNet"
    assert [len(s.blocks) for s in peer.encoder.stages] == [1, 3, 4]
    assert any(p is peer.encoder.stem.convs[0].conv.weight for p in trainer.optimizer.param_groups[1]["params"])
    assert trainer.auxiliary["prototypes_first"].prototypes.shape == (2, 4)  # classes x features_per_stage[0]
    deployable = nnUNetTrainerDualCCE.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, 2, enable_deep_supervision=False)
    assert isinstance(deployable, DualNetworkEnsemble)
    assert type(deployable.second).__name__ == "ResidualEncoderUNet"
    same = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE_samePair))
    assert type(same.auxiliary["peer"]).__name__ == "PlainConvUNet"


def _disagreeing_step(trainer):
    """A batch, with network 1 biased to background and the peer to foreground, so that every term has voxels
    (cross-reliable region, kept and uncertain voxels) and both prototypes exist."""
    with torch.no_grad():
        trainer.unwrapped_network().decoder.seg_layers[-1].bias.copy_(torch.tensor([1.0, -1.0]))
        trainer.auxiliary["peer"].decoder.seg_layers[-1].bias.copy_(torch.tensor([-1.0, 1.0]))
        for name in ("prototypes_first", "prototypes_peer"):
            bank = trainer.auxiliary[name]
            bank.prototypes.copy_(torch.randn_like(bank.prototypes))
            bank.initialized.fill_(True)
    return next_batches(trainer)


@pytest.mark.parametrize("term", ["sup_cross_reliable", "entropy_filtered", "kl_weighted", "output_cosine",
                                  "prototype"])
def test_every_dual_term_trains_both_networks(term, semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE))
    labeled, unlabeled = _disagreeing_step(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    terms = trainer.compute_losses(labeled, unlabeled)
    assert set(terms) == set(trainer.loss_terms) and all(torch.isfinite(v) for v in terms.values())
    terms[term].backward()
    for network in (trainer.unwrapped_network(), trainer.auxiliary["peer"]):
        assert has_grad(network, "encoder.")
        last_head = f"decoder.seg_layers.{len(network.decoder.seg_layers) - 1}."
        # the prototype term acts on decoder features, before the segmentation head
        assert has_grad(network, last_head) == (term != "prototype")
        assert not has_grad(network, "decoder.seg_layers.0.")  # full resolution only, no deep supervision


def test_the_loss_is_the_papers_and_plain_cross_pseudo_supervision_is_only_a_variant(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE))
    labeled, unlabeled = _disagreeing_step(trainer)
    terms = trainer.compute_losses(labeled, unlabeled)
    # the paper's L_s + L_cr, CCE, KL weighting, cosine consistency and lambda_c L_c; no plain CPS term
    assert set(terms) == {"sup", "sup_peer", "sup_cross_reliable", "entropy_filtered", "kl_weighted",
                          "output_cosine", "prototype"}
    assert terms["output_cosine"] > 0  # the two networks were biased apart
    variant = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE_plainCrossPseudo))
    labeled, unlabeled = _disagreeing_step(variant)
    variant.optimizer.zero_grad(set_to_none=True)
    cross = variant.compute_losses(labeled, unlabeled)["cross_pseudo"]
    cross.backward()
    assert has_grad(variant.unwrapped_network()) and has_grad(variant.auxiliary["peer"])


def test_the_release_cce_scale_is_n_over_n_kept_times_the_kept_voxel_mean(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE))
    labeled, unlabeled = _disagreeing_step(trainer)
    with torch.no_grad():
        mean = trainer.compute_losses(labeled, unlabeled)["entropy_filtered"]
        kept_fraction = trainer._step_statistics["kept_fraction"]
        trainer.entropy_filtered_release_scale = True
        released = trainer.compute_losses(labeled, unlabeled)["entropy_filtered"]
    assert 0 < kept_fraction <= 0.4 + 1e-6
    torch.testing.assert_close(released, mean / kept_fraction, rtol=1e-4, atol=0)
    assert nnUNetTrainerDualCCE_releaseCCEScale.entropy_filtered_release_scale


def test_the_supervised_only_control_keeps_the_labeled_terms_and_weights_the_unsupervised_ones_zero(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE_unsupWeight0))
    _disagreeing_step(trainer)  # the biases, so that every term is non-zero
    out = trainer.train_step(next(trainer.dataloader_train))
    unsupervised = set(trainer.loss_terms) - set(trainer.supervised_terms)
    assert unsupervised == {"entropy_filtered", "kl_weighted", "output_cosine", "prototype"}
    assert all(float(out[f"weighted_{t}"]) == 0 for t in unsupervised)
    assert float(out["loss_kl_weighted"]) > 0 and float(out["loss_output_cosine"]) > 0  # computed, logged raw
    assert float(out["weighted_sup_cross_reliable"]) == pytest.approx(
        trainer.cross_reliable_weight * float(out["loss_sup_cross_reliable"]))
    labeled_total = sum(float(out[f"weighted_{t}"]) for t in trainer.supervised_terms)
    assert float(out["loss"]) == pytest.approx(labeled_total, rel=1e-5)


def test_prototype_voxels_are_drawn_per_class(semi_dataset, monkeypatch):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE, contrast_voxels_per_class=7))
    labeled, unlabeled = _disagreeing_step(trainer)
    contrasted = []
    original = type(trainer.auxiliary["prototypes_first"]).contrast_loss

    def record(bank, features, labels, temperature=0.1):
        contrasted.append(labels.bincount(minlength=2).tolist())
        return original(bank, features, labels, temperature)

    monkeypatch.setattr(type(trainer.auxiliary["prototypes_first"]), "contrast_loss", record)
    trainer.compute_losses(labeled, unlabeled)
    # each network's uncertain voxels: at most 7 of each class, so a rare class is not crowded out
    assert len(contrasted) == 2 and all(max(counts) <= 7 and sum(counts) > 0 for counts in contrasted)


def test_validation_runs_network_one_once_and_the_unlabeled_loader_builds_only_the_strong_view(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE))
    assert set(next(trainer.dataloader_unlabeled)) == {"data_strong", "keys"}  # no teacher, no weak view
    calls = []
    handle = trainer.unwrapped_network().register_forward_hook(lambda *args: calls.append(1))
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        validation = trainer.validation_step(next(trainer.dataloader_val))
    handle.remove()
    assert len(calls) == 1 and {"peer_tp", "ensemble_tp", "tp_hard"} <= set(validation)


def test_the_peer_is_compiled_when_nnunet_compiles(semi_dataset):
    from torch._dynamo import OptimizedModule

    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE, _do_i_compile=lambda self: True))
    assert isinstance(trainer.peer_forward, OptimizedModule)
    assert trainer.peer_forward._orig_mod is trainer.auxiliary["peer"]


def test_one_way_kl_variant_trains_only_the_peer_toward_network_one(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE_oneWayKL))
    labeled, unlabeled = _disagreeing_step(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.compute_losses(labeled, unlabeled)["kl_weighted"].backward()
    assert has_grad(trainer.auxiliary["peer"]) and not has_grad(trainer.unwrapped_network())


def test_step_statistics_are_logged_per_epoch_and_prototypes_follow_kept_voxels(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE))
    out = trainer.train_step(next(trainer.dataloader_train))
    # each network keeps its lowest-entropy 20 % (strictly below the percentile), the union at most 40 %
    assert 0.0 < out["stat_kept_fraction"] <= 0.4 + 1e-6
    assert out["stat_mean_kl"] >= 0 and 0 <= out["stat_network_agreement"] <= 1
    assert trainer.auxiliary["prototypes_first"].initialized.any()  # updated from the kept voxels
    similarity = out["stat_prototype_similarity"]
    assert np.isnan(similarity) or -1 <= similarity <= 1
    trainer.on_train_epoch_end([out, trainer.train_step(next(trainer.dataloader_train))])
    for key in ("semi_kept_fraction", "semi_mean_kl", "semi_loss_prototype", "semi_loss_entropy_filtered"):
        assert np.isfinite(trainer.logger.get_value(key, step=-1)), key
    # validation scores the peer and the ensemble beside network 1
    trainer.on_validation_epoch_start()
    validation = trainer.validation_step(next(trainer.dataloader_val))
    assert validation["peer_tp"].shape == validation["ensemble_tp"].shape == validation["tp_hard"].shape
    trainer.on_validation_epoch_end([validation])
    assert 0 <= trainer.logger.get_value("semi_ensemble_dice", step=-1) <= 1


def test_the_fixed_ensemble_is_deployed_by_default_and_a_nan_never_wins(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE))
    _log_scores(trainer, student=0.9, peer=0.1, ensemble=0.2)
    trainer.finalize_deployed_weights()
    assert (trainer.deployed_weights, trainer.best_single_network) == ("ensemble", "student")
    chooser = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE_deployBestValidated))
    _log_scores(chooser, student=float("nan"), peer=0.6, ensemble=0.5)
    chooser.finalize_deployed_weights()
    assert (chooser.deployed_weights, chooser.best_single_network) == ("peer", "peer")


def _log_scores(trainer, student, peer, ensemble):
    store = trainer.logger.local_logger.my_fantastic_logging
    store["mean_fg_dice"], store["semi_peer_dice"], store["semi_ensemble_dice"] = [student], [peer], [ensemble]


def _model_folder(trainer, semi_dataset, tmp_path, checkpoint_file):
    folder = tmp_path / "model"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(checkpoint_file, folder / "fold_0" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(trainer.plans_manager.plans))
    (folder / "dataset.json").write_text(json.dumps(trainer.dataset_json))
    return folder


def test_ensemble_deployment_round_trips_through_checkpoint_predictor_builder_and_export(semi_dataset, tmp_path):
    cls = tiny_schedule(nnUNetTrainerDualCCE_deployBestValidated)
    trainer = make_trainer(semi_dataset, cls)
    trainer.train_step(next(trainer.dataloader_train))
    _log_scores(trainer, student=0.5, peer=0.6, ensemble=0.7)
    trainer.finalize_deployed_weights()
    assert (trainer.deployed_weights, trainer.best_single_network) == ("ensemble", "peer")
    checkpoint_file = tmp_path / "checkpoint_final.pth"
    trainer.save_checkpoint(str(checkpoint_file))
    checkpoint = torch.load(checkpoint_file, weights_only=False)
    assert is_ensemble_state(checkpoint["network_weights"])

    # what nnUNetv2_predict does with the checkpoint: the class-level builder, then load_state_dict
    first, peer = trainer.unwrapped_network(), trainer.auxiliary["peer"]
    trainer.set_deep_supervision_enabled(False)
    first.eval(), peer.eval()
    deployable = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 2,
                                                enable_deep_supervision=False).eval()
    deployable.load_state_dict(checkpoint["network_weights"])
    x = torch.randn(1, 1, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        expected = (torch.softmax(first(x), 1) + torch.softmax(peer(x), 1)) / 2
        torch.testing.assert_close(torch.softmax(deployable(x), 1), expected)

    # --c / --val on the final checkpoint restore both networks and the decision
    fresh = make_trainer(semi_dataset, cls)
    fresh.load_checkpoint(str(checkpoint_file))
    assert fresh.deployed_weights == "ensemble" and fresh.best_single_network == "peer"
    for k, v in first.state_dict().items():
        torch.testing.assert_close(fresh.unwrapped_network().state_dict()[k], v)

    # the export takes the better single network, the peer, and writes its architecture into plans.json
    model = _model_folder(trainer, semi_dataset, tmp_path, checkpoint_file)
    export_vanilla(str(model), str(tmp_path / "exported"))
    plans = PlansManager(str(tmp_path / "exported" / "plans.json"))
    configuration = plans.get_configuration("3d_fullres")
    assert configuration.network_arch_class_name.endswith("ResidualEncoderUNet")
    vanilla = nnUNetTrainer.build_network_architecture(plans, configuration, 1, 2, False).eval()
    exported = torch.load(tmp_path / "exported" / "fold_0" / "checkpoint_final.pth", weights_only=True)
    vanilla.load_state_dict(exported["network_weights"])
    with torch.no_grad():
        torch.testing.assert_close(vanilla(x), peer(x))
    provenance = json.loads((tmp_path / "exported" / "semi_export.json").read_text())
    assert provenance["fold_0/checkpoint_final.pth"]["exported_network"] == "peer"
    # or network 1 on request, with the plans' own architecture
    export_vanilla(str(model), str(tmp_path / "exported_first"), single_network="student")
    plans = PlansManager(str(tmp_path / "exported_first" / "plans.json"))
    assert plans.get_configuration("3d_fullres").network_arch_class_name.endswith("PlainConvUNet")


def test_network_one_deployment_keeps_vanilla_network_weights(semi_dataset, tmp_path):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE_deployBestValidated))
    _log_scores(trainer, student=0.8, peer=0.6, ensemble=0.7)
    trainer.finalize_deployed_weights()
    assert (trainer.deployed_weights, trainer.best_single_network) == ("student", "student")
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    weights = torch.load(tmp_path / "checkpoint.pth", weights_only=False)["network_weights"]
    assert weights.keys() == trainer.unwrapped_network().state_dict().keys()


def test_export_refuses_folds_whose_better_networks_differ_unless_one_is_chosen(semi_dataset, tmp_path):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE_deployBestValidated))
    _log_scores(trainer, student=0.5, peer=0.6, ensemble=0.7)
    trainer.finalize_deployed_weights()
    trainer.save_checkpoint(str(tmp_path / "checkpoint_final.pth"))
    model = _model_folder(trainer, semi_dataset, tmp_path, tmp_path / "checkpoint_final.pth")
    other = torch.load(tmp_path / "checkpoint_final.pth", weights_only=False)
    other["semi_state"]["best_single_network"] = "student"
    (model / "fold_1").mkdir()
    torch.save(other, model / "fold_1" / "checkpoint_final.pth")
    with pytest.raises(SemiInputError, match=r"fold_0: peer, fold_1: student.*--network student or --network peer"):
        export_vanilla(str(model), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    export_vanilla(str(model), str(tmp_path / "exported"), single_network="peer")
    provenance = json.loads((tmp_path / "exported" / "semi_export.json").read_text())
    assert {r["exported_network"] for r in provenance.values()} == {"peer"}


def test_the_labeled_only_peer_control_is_stock_nnunet_training_dualcces_network_2(semi_dataset, tmp_path):
    dual = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerDualCCE))
    control = make_trainer(semi_dataset, nnUNetTrainer_DualCCEPeer)
    split = json.loads((semi_dataset.preprocessed_dataset / "splits_final.json").read_text())[0]
    assert sorted(control.dataloader_train.data_loader._data.identifiers) == sorted(split["train"])  # labeled only
    assert split["unlabeled"] and not hasattr(control, "dataloader_unlabeled")
    network = control.network
    assert type(network).__name__ == "ResidualEncoderUNet"
    assert {k: v.shape for k, v in network.state_dict().items()} == \
        {k: v.shape for k, v in dual.auxiliary["peer"].state_dict().items()}
    before = {k: v.clone() for k, v in network.state_dict().items()}
    loss = control.train_step(next(control.dataloader_train))["loss"]
    assert np.isfinite(loss) and any(not torch.equal(before[k], v) for k, v in network.state_dict().items())

    # what nnUNetv2_predict does: the class's builder, then the checkpoint's weights
    control.save_checkpoint(str(tmp_path / "checkpoint_final.pth"))
    checkpoint = torch.load(tmp_path / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer_DualCCEPeer"
    deployed = nnUNetTrainer_DualCCEPeer.build_network_architecture(
        control.plans_manager, control.configuration_manager, 1, 2, enable_deep_supervision=False).eval()
    deployed.load_state_dict(checkpoint["network_weights"])
    control.set_deep_supervision_enabled(False)
    x = torch.randn(1, 1, *control.configuration_manager.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), network.eval()(x))
