"""nnUNetTrainerNPCal on the tiny planned dataset: head, EMA head and banks beside the stock network, gradient of
each term, bank updates, statistics, variants and --c state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import has_grad, make_trainer, next_batches, random_streams_rewinder, tiny_schedule
from nnunet_semi.components.ema import ema_momentum
from nnunet_semi.methods import (
    nnUNetTrainerNPCal,
    nnUNetTrainerNPCal_fusedPseudoLabel,
    nnUNetTrainerNPCal_productConfidence,
)


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


def _record_pseudo_labels(monkeypatch):
    import nnunet_semi.methods.np_calibration as module

    recorded = []
    original = module.weighted_ce_dice_loss

    def record(logits, labels, weight):
        recorded.append((labels.clone(), weight.clone()))
        return original(logits, labels, weight)

    monkeypatch.setattr(module, "weighted_ce_dice_loss", record)
    return recorded


def test_the_teacher_segmentation_labels_until_the_np_head_is_warm(semi_dataset, monkeypatch):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerNPCal))
    with torch.no_grad():  # the EMA NP head predicts class 1 everywhere, the teacher's segmentation mostly class 0
        trainer.auxiliary["np_head_teacher"].decoder[-1].bias.copy_(torch.tensor([-20.0, 20.0]))
        trainer.teacher.decoder.seg_layers[-1].bias.copy_(torch.tensor([5.0, -5.0]))
    recorded = _record_pseudo_labels(monkeypatch)
    labeled, unlabeled = next_batches(trainer)
    assert not trainer.np_warmup["warm"]
    trainer.compute_losses(labeled, unlabeled)
    cold_labels, cold_weights = recorded[-1]
    assert cold_labels.float().mean() < 0.5  # the segmentation head's labels, not the NP head's
    trainer.np_warmup["warm"] = True
    trainer.compute_losses(labeled, unlabeled)
    warm_labels, warm_weights = recorded[-1]
    assert warm_labels.eq(1).all()  # the calibrated (NP) pseudo label
    # where the two heads confidently disagree, the label's weight is small
    assert warm_weights.mean() < 0.05 < cold_weights.mean()


def test_the_np_head_warms_once_it_matches_the_segmentation_head_and_stays_warm(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerNPCal, np_warmup_min_iterations=3))
    labels = torch.tensor([[0, 1, 1, 0]])
    index = torch.tensor([[0, 1, 2, 3]])
    valid = torch.ones_like(labels, dtype=torch.bool)
    right = torch.log(torch.nn.functional.one_hot(labels, 2).float().clamp_min(1e-6))  # (1, 4, 2)
    wrong_seg = torch.tensor([[[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]]])  # (1, 2, 4): all background
    for step in range(3):
        assert not trainer.np_warmup["warm"]  # not before np_warmup_min_iterations
        trainer._update_np_warmup(right, wrong_seg, index, labels, valid)
    assert trainer.np_warmup["warm"] and trainer.np_warmup["np_dice"] == pytest.approx(1.0)
    assert trainer._step_statistics["np_warm"] == 1.0
    right_seg = torch.tensor([[[5.0, -5.0, -5.0, 5.0], [0.0, 0.0, 0.0, 0.0]]])
    for _ in range(5):
        trainer._update_np_warmup(right.flip(-1), right_seg, index, labels, valid)
    assert trainer.np_warmup["warm"]  # latched


def test_resume_restores_the_warm_up_state(semi_dataset, tmp_path):
    cls = tiny_schedule(nnUNetTrainerNPCal)
    trainer = make_trainer(semi_dataset, cls)
    trainer.train_step(next(trainer.dataloader_train))
    trainer.np_warmup["warm"] = True
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    fresh = make_trainer(semi_dataset, cls)
    fresh.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert fresh.np_warmup == trainer.np_warmup and fresh.np_warmup["steps"] == 1


def test_the_np_losses_include_a_soft_dice(semi_dataset):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerNPCal))
    labeled, unlabeled = next_batches(trainer)
    state = {k: v.clone() for k, v in trainer.auxiliary.state_dict().items()}
    rewind = random_streams_rewinder(trainer)

    def terms_with(dice_weight):
        trainer.auxiliary.load_state_dict(state)
        trainer.np_dice_weight = dice_weight
        rewind()
        with torch.no_grad():
            return trainer.compute_losses(labeled, unlabeled)

    with_dice, without = terms_with(1.0), terms_with(0.0)
    assert with_dice["sup_np"] > without["sup_np"] + 1e-3
    assert with_dice["np_pseudo"] > without["np_pseudo"] + 1e-3
    torch.testing.assert_close(with_dice["np_kl"], without["np_kl"])
