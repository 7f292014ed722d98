"""nnUNetTrainerBCP and its pre-training on the tiny planned dataset: the two mixed images, their split targets at
every deep-supervision scale, the two loss parts and their weights, the statistics, the step decay."""

from __future__ import annotations

import pytest
import torch

from helpers import make_trainer, next_batches, random_streams_rewinder
from nnunet_semi.components.mixing import cube_mask
from nnunet_semi.methods import nnUNetTrainer_BCPPretrain, nnUNetTrainerBCP, nnUNetTrainerBCP_stepLR
from nnunet_semi.trainer.outputs import full_resolution


class _Tiny:
    epochs, iterations_per_epoch, val_iterations_per_epoch = 6, 2, 1


def _bcp(env, cls=nnUNetTrainerBCP, **attributes):
    return make_trainer(env, type(f"{cls.__name__}Tiny", (_Tiny, cls), attributes))


def test_bcp_mixes_both_ways_and_splits_each_target_into_truth_and_pseudo_parts(semi_dataset, monkeypatch):
    trainer = _bcp(semi_dataset)
    labeled, unlabeled = next_batches(trainer)
    rewind = random_streams_rewinder(trainer)
    seen = {}
    network = trainer.network

    def recording(images):
        seen["images"] = images
        return network(images)

    monkeypatch.setattr(trainer, "network", recording)
    losses = {}
    real = trainer.part_loss

    def part_loss(output, target):
        losses.setdefault("targets", []).append(target)
        return real(output, target)

    monkeypatch.setattr(trainer, "part_loss", part_loss)
    terms = trainer.compute_losses(labeled, unlabeled)
    rewind()
    cube = cube_mask(labeled["data"].shape[2:], trainer.cube_ratio, "cpu", trainer.random_generator("cpu"))
    pairs = min(labeled["data"].shape[0], unlabeled["data_weak"].shape[0])
    x_l, x_u = labeled["data"][:pairs], unlabeled["data_weak"][:pairs]
    partner = torch.roll(torch.arange(pairs), -1)
    # image 1: the labeled crop with the unlabeled one inside the cube; image 2: the reverse, with the next labeled
    torch.testing.assert_close(seen["images"][:pairs], torch.where(cube, x_u, x_l))
    torch.testing.assert_close(seen["images"][pairs:], torch.where(cube, x_l[partner], x_u))
    truth_targets, pseudo_targets = losses["targets"]
    scales = trainer._get_deep_supervision_scales()
    assert len(truth_targets) == len(scales)  # every deep-supervision scale, as nnU-Net's targets
    truth, pseudo = truth_targets[0], pseudo_targets[0]
    label = full_resolution(labeled["target"])[:pairs]
    part = trainer.part_label
    # the truth part: image 1 outside the cube, image 2 inside; the pseudo part the rest; never both, never neither
    assert torch.equal(truth[:pairs], torch.where(cube, torch.full_like(label, part), label))
    assert torch.equal(truth[pairs:], torch.where(cube, label[partner], torch.full_like(label, part)))
    assert torch.equal((truth != part) ^ (pseudo != part), torch.ones_like(truth, dtype=torch.bool))
    assert all(t.shape[2:] == s.shape[2:] for t, s in zip(pseudo_targets, truth_targets))
    assert set(terms) == {"mixed_truth", "mixed_pseudo"} and all(torch.isfinite(v) for v in terms.values())


def test_bcp_weighs_the_pseudo_part_half_from_the_first_step_and_logs_its_pseudo_labels(semi_dataset):
    trainer = _bcp(semi_dataset)
    out = trainer.train_step(next(trainer.dataloader_train))
    assert float(out["unsup_weight"]) == 0.5  # no ramp: the release's u_weight from the first step
    assert float(out["weighted_mixed_pseudo"]) == pytest.approx(0.5 * float(out["loss_mixed_pseudo"]), rel=1e-6)
    assert float(out["loss"]) == pytest.approx(float(out["loss_mixed_truth"]) + float(out["weighted_mixed_pseudo"]),
                                               rel=1e-5)
    assert 0 <= out["stat_pseudo_foreground_fraction"] <= 1 and 0 <= out["stat_largest_component_share"] <= 1
    # the pseudo part alone trains the student
    labeled, unlabeled = next_batches(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.compute_losses(labeled, unlabeled)["mixed_pseudo"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.network.parameters())
    assert all(p.grad is None for p in trainer.teacher.parameters())


@pytest.mark.parametrize("ratio", [0.0, 1.2, 0.01])
def test_a_cube_that_does_not_fit_is_refused_naming_the_value(semi_dataset, ratio):
    with pytest.raises(ValueError, match=f"cube_ratio: .*{ratio}"):
        _bcp(semi_dataset, cube_ratio=ratio)


def test_the_pretraining_pastes_the_next_crop_into_one_cube_in_image_and_every_target_scale(semi_dataset,
                                                                                           monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = make_trainer(semi_dataset, type("Pretrain", (nnUNetTrainer_BCPPretrain,), {}))
    trainer.initialize() if not trainer.was_initialized else None
    batch = next(trainer.dataloader_train)
    given = {}
    monkeypatch.setattr(nnUNetTrainer, "train_step", lambda self, b: given.update(b) or {"loss": 0.0})
    state = trainer._cube_generator.get_state()
    trainer.train_step(batch)
    trainer._cube_generator.set_state(state)
    cube = cube_mask(batch["data"].shape[2:], trainer.cube_ratio, "cpu", trainer._cube_generator)
    partner = torch.roll(torch.arange(batch["data"].shape[0]), -1)
    torch.testing.assert_close(given["data"], torch.where(cube, batch["data"][partner], batch["data"]))
    for mixed, target in zip(given["target"], batch["target"]):
        inside = torch.nn.functional.interpolate(cube.float(), target.shape[2:], mode="nearest-exact").bool()
        assert torch.equal(mixed, torch.where(inside, target[partner], target))


def test_the_step_decay_divides_the_learning_rate_by_ten_every_sixth_of_the_run(semi_dataset):
    trainer = _bcp(semi_dataset, cls=nnUNetTrainerBCP_stepLR)
    rates = []
    for epoch in range(trainer.num_epochs):
        trainer.lr_scheduler.step(epoch)
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([trainer.initial_lr * 0.1 ** e for e in range(6)])  # 6 epochs, 6 intervals
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {rates[-1]}
