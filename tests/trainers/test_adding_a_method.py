"""Adding a method is one file (``tests/support/fixmatch_method.py``, a FixMatch-style example) plus its tests: the
contract test runs it with the shipped trainers; here, what its one hook computes and a whole training through the
base."""

from __future__ import annotations

import json
import types

import pytest
import torch

from helpers import has_grad, make_trainer, next_batches, tiny_schedule
from nnunet_semi.components.losses import hard_pseudo_label_loss
from support.fixmatch_method import nnUNetTrainerFixMatchExample


def test_the_example_method_is_declarations_and_one_hook():
    defined = {name for name, value in vars(nnUNetTrainerFixMatchExample).items()
               if isinstance(value, (types.FunctionType, property, classmethod, staticmethod))}
    assert defined == {"compute_losses"}


def _fixmatch_term(trainer, threshold, labeled, unlabeled):
    trainer.pseudo_label_threshold = threshold
    trainer.optimizer.zero_grad(set_to_none=True)
    term = trainer.compute_losses(labeled, unlabeled)["fixmatch"]
    term.backward()
    return term


def test_the_threshold_selects_the_pseudo_labeled_voxels(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerFixMatchExample))
    labeled, unlabeled = next_batches(trainer)
    # no voxel reaches a probability above 1: no pseudo label, no gradient
    assert float(_fixmatch_term(trainer, 1.01, labeled, unlabeled)) == 0.0
    assert not has_grad(trainer.network)
    # every voxel is confident at 0: plain CE of the strong view against the weak view's argmax
    everywhere = _fixmatch_term(trainer, 0.0, labeled, unlabeled)
    assert has_grad(trainer.network, "encoder.")
    with torch.no_grad():  # InstanceNorm: each sample's output does not depend on the rest of the batch
        weak = torch.softmax(trainer.network(unlabeled["data_weak"])[0].float(), 1)
        expected = hard_pseudo_label_loss(trainer.network(unlabeled["data_strong"])[0], weak)
    torch.testing.assert_close(everywhere.detach(), expected, rtol=1e-4, atol=1e-5)


def test_the_example_method_trains_checkpoints_and_deploys_through_the_base(semi_dataset, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    plans = json.loads((semi_dataset.preprocessed_dataset / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((semi_dataset.preprocessed_dataset / "dataset.json").read_text())
    cls = tiny_schedule(nnUNetTrainerFixMatchExample, epochs=2, pseudo_label_threshold=0.5)
    trainer = cls(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.run_training()
    log = next(p for p in (semi_dataset.results.rglob("training_log_*.txt"))).read_text()
    assert log.count("Semi-supervised: loss_sup:") == 2 and "loss_fixmatch:" in log
    checkpoint = torch.load(next(semi_dataset.results.rglob("checkpoint_final.pth")), weights_only=False)
    network = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 2, False)
    network.load_state_dict(checkpoint["network_weights"])
    logged = checkpoint["logging"]
    assert len(logged["semi_weighted_fixmatch"]) == 2 and logged["semi_unsup_weight"] == pytest.approx([1.0, 1.0])
