"""nnUNetTrainerNPCal on the tiny planned dataset: head, EMA head and banks beside the stock network, gradient of
each term, bank updates, statistics, variants and --c state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_semi.ema import ema_momentum
from nnunet_semi.training import (
    nnUNetTrainerNPCal,
    nnUNetTrainerNPCal_fusedPseudoLabel,
    nnUNetTrainerNPCal_productConfidence,
)

from conftest import has_grad, make_trainer, next_batches, tiny_schedule


def test_np_modules_live_beside_the_stock_network(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerNPCal))
    head, head_teacher = trainer.auxiliary["np_head"], trainer.auxiliary["np_head_teacher"]
    assert type(trainer.network).__name__ == "PlainConvUNet"
    assert head.project[0].in_features == 4  # features_per_stage[0] of the tiny plans
    assert any(p is head.project[0].weight for g in trainer.optimizer.param_groups for p in g["params"])
    assert not any(p.requires_grad for p in head_teacher.parameters())
    assert trainer.auxiliary["context_bank"].memory.shape == (2, trainer.bank_length, trainer.np_latent_dim)


@pytest.mark.parametrize("term", ["sup_np", "pseudo", "np_pseudo", "np_kl"])
def test_each_term_trains_its_parameters(term, semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerNPCal))
    trainer.optimizer.zero_grad(set_to_none=True)
    terms = trainer.compute_losses(*next_batches(trainer))
    assert set(terms) == set(trainer.loss_terms) and all(torch.isfinite(v) for v in terms.values())
    terms[term].backward()
    network, head = trainer.unwrapped_network(), trainer.auxiliary["np_head"]
    assert has_grad(network, "encoder.")  # every term reaches the backbone (the NP terms via decoder features)
    assert has_grad(network, "decoder.seg_layers.1.") == (term == "pseudo")
    assert not has_grad(network, "decoder.seg_layers.0.")
    assert has_grad(head) == (term != "pseudo")
    if term == "np_kl":
        assert has_grad(head, "latent.") and not has_grad(head, "decoder.")
    assert all(p.grad is None for p in trainer.auxiliary["np_head_teacher"].parameters())


def test_step_fills_banks_updates_the_ema_head_and_logs_statistics(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerNPCal))
    head, head_teacher = trainer.auxiliary["np_head"], trainer.auxiliary["np_head_teacher"]
    out = trainer.train_step(next(trainer.dataloader_train))
    # labeled voxels enter both banks, pseudo-labeled ones the target bank only
    context, target = trainer.auxiliary["context_bank"], trainer.auxiliary["target_bank"]
    assert context.size.sum() > 0 and target.size.sum() > context.size.sum()
    before = {k: v.clone() for k, v in head_teacher.state_dict().items()}
    trainer.train_step(next(trainer.dataloader_train))
    m = ema_momentum(trainer.global_step - 1, trainer.teacher_momentum)
    name = "project.0.weight"
    torch.testing.assert_close(head_teacher.state_dict()[name],
                               m * before[name] + (1 - m) * head.state_dict()[name])
    assert 0 <= out["stat_weight_p10"] <= out["stat_weight_p90"] <= 1
    assert 0 <= out["stat_seg_np_agreement"] <= 1 and 0 <= out["stat_confidence_gap"] <= 1
    trainer.on_train_epoch_end([out])
    for key in ("semi_loss_np_kl", "semi_seg_np_agreement", "semi_weight_p90"):
        assert np.isfinite(trainer.logger.get_value(key, step=-1)), key


def test_resume_restores_head_ema_head_and_banks(semi_dataset, tmp_path):
    cls = tiny_schedule(nnUNetTrainerNPCal)
    trainer = make_trainer(semi_dataset, cls)
    trainer.train_step(next(trainer.dataloader_train))
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    fresh = make_trainer(semi_dataset, cls)
    fresh.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    for name in ("np_head", "np_head_teacher", "context_bank", "target_bank"):
        for k, v in trainer.auxiliary[name].state_dict().items():
            torch.testing.assert_close(fresh.auxiliary[name].state_dict()[k], v)
    assert fresh.auxiliary["target_bank"].size.sum() > 0


@pytest.mark.parametrize("variant", [nnUNetTrainerNPCal_productConfidence, nnUNetTrainerNPCal_fusedPseudoLabel],
                         ids=lambda c: c.__name__)
def test_variants_take_finite_steps(variant, semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(variant))
    out = trainer.train_step(next(trainer.dataloader_train))
    assert all(np.isfinite(out[f"loss_{t}"]) for t in trainer.loss_terms)


def test_unknown_pseudo_label_source_is_refused(semi_dataset):
    with pytest.raises(ValueError, match="pseudo_label_source must be one of"):
        make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerNPCal, pseudo_label_source="teacher"))
