"""nnUNetTrainerSGRS on the tiny planned dataset: terms, region statistics, variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_trainer, next_batches
from nnunet_semi.components.ema import ema_momentum
from nnunet_semi.methods import nnUNetTrainerSGRS, nnUNetTrainerSGRS_doubleEMA, nnUNetTrainerSGRS_unsupWeight0


class _Tiny:
    epochs, iterations_per_epoch, val_iterations_per_epoch = 4, 2, 1


def test_sgrs_step_reports_terms_and_a_full_region_partition(semi_dataset):
    trainer = make_trainer(semi_dataset, type("TinySGRS", (_Tiny, nnUNetTrainerSGRS), {}))
    assert trainer.unsup_rampup_iterations == 6000 and trainer.unsup_weight == 1.0
    # the student sees the plain unlabeled crop: the strong pipeline is empty unless student_uses_strong_view
    assert len(trainer.dataloader_unlabeled.data_loader.strong_transforms.pipeline.transforms) == 0
    out = trainer.train_step(next(trainer.dataloader_train))
    assert {"loss_sup", "loss_pseudo_ce", "loss_pseudo_dice"} <= set(out)
    fractions = [out[f"stat_{k}"] for k in ("agree_certain_fraction", "disagree_certain_fraction",
                                              "ambiguous_fraction")]
    assert all(0 <= f <= 1 for f in fractions) and sum(fractions) == pytest.approx(1.0, abs=1e-6)
    assert np.isfinite(out["loss"]) and out["loss_pseudo_dice"] >= 0 and out["loss_pseudo_ce"] >= 0
    # the epoch end logs and plots them with the base's curves
    trainer.on_train_epoch_end([out])
    assert trainer.logger.get_value("semi_ambiguous_fraction", step=-1) == pytest.approx(fractions[2])


def test_double_ema_variant_is_the_current_releases_update_with_its_weight_shrink(semi_dataset):
    trainer = make_trainer(semi_dataset, type("TinySGRSDouble", (_Tiny, nnUNetTrainerSGRS_doubleEMA), {}))
    assert trainer.student_weight_shrink == 2e-4
    trainer.train_step(next(trainer.dataloader_train))
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    shrink = 1 - trainer.student_weight_shrink
    trainer.optimizer.step = lambda *args, **kwargs: None  # isolate the updates after the optimizer step
    student_before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.train_step(next(trainer.dataloader_train))
    student = trainer.network.state_dict()
    m1, m2 = trainer.teacher_momentum, ema_momentum(1, trainer.teacher_momentum)
    for k, v in trainer.teacher.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(student[k], shrink * student_before[k])  # the student's weights shrink
            # a fixed-0.99 EMA toward the unshrunk student, then the warm-up EMA toward the shrunk one
            once = m1 * before[k] + (1 - m1) * student_before[k]
            torch.testing.assert_close(v, m2 * once + (1 - m2) * student[k])


@pytest.mark.parametrize("variant", ["nnUNetTrainerSGRS", "nnUNetTrainerSGRS_releaseSupervisedWeight"])
def test_the_total_is_the_papers_weighting_of_the_unweighted_terms(semi_dataset, variant):
    """The terms come back unweighted (the pseudo ones as means over views); the base applies SGRS's 0.5 to L_pseudo
    and the supervised weight (0.5 in the release variant), and logs each term as it entered the total."""
    import nnunet_semi.methods

    cls = getattr(nnunet_semi.methods, variant)
    trainer = make_trainer(semi_dataset, type(f"{variant}Tiny", (_Tiny, cls), {}))
    out = trainer.train_step(next(trainer.dataloader_train))
    ramp = float(out["unsup_weight"])
    assert 0 < ramp < 1  # at the start of the ramp
    expected = {"sup": cls.supervised_weight, "pseudo_ce": 0.5 * ramp, "pseudo_dice": 0.5 * ramp}
    for term, weight in expected.items():
        assert float(out[f"weighted_{term}"]) == pytest.approx(weight * float(out[f"loss_{term}"]), rel=1e-6)
    assert float(out["loss"]) == pytest.approx(sum(float(out[f"weighted_{t}"]) for t in expected), rel=1e-5)
    assert 0 < float(out["loss_pseudo_dice"]) <= 1  # a mean of soft Dice losses, not a sum over views


def test_the_zero_weight_control_trains_the_labeled_loss_alone(semi_dataset):
    trainer = make_trainer(semi_dataset, type("TinySGRSZero", (_Tiny, nnUNetTrainerSGRS_unsupWeight0), {}))
    out = trainer.train_step(next(trainer.dataloader_train))
    assert float(out["loss_pseudo_ce"]) > 0 and float(out["loss_pseudo_dice"]) > 0  # computed and logged raw
    assert float(out["weighted_pseudo_ce"]) == 0 and float(out["weighted_pseudo_dice"]) == 0
    assert float(out["loss"]) == pytest.approx(float(out["loss_sup"]), rel=1e-6)


@pytest.mark.parametrize("views", [("plain", "mixed"), ("plain",)])
def test_regional_loss_supervises_the_declared_views_only(semi_dataset, views):
    """The pseudo-label terms send gradient into the student's input rows of the views they supervise: the plain
    unlabeled rows always, the mixed rows unless the one-view ablation drops them, the labeled rows never."""
    trainer = make_trainer(semi_dataset, type("TinySGRSViews", (_Tiny, nnUNetTrainerSGRS),
                                              {"pseudo_label_views": views}))
    labeled, unlabeled = next_batches(trainer)
    captured = {}

    class CaptureInput(torch.nn.Module):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, x):
            captured["x"] = x = x.detach().requires_grad_(True)
            return self.network(x)

    trainer.network = CaptureInput(trainer.network)
    terms = trainer.compute_losses(labeled, unlabeled)
    (terms["pseudo_ce"] + terms["pseudo_dice"]).backward()
    grad = captured["x"].grad.abs().flatten(1).sum(1)
    n_l, n_u = labeled["data"].shape[0], unlabeled["data_weak"].shape[0]
    assert (grad[:n_l] == 0).all() and (grad[n_l:n_l + n_u] > 0).all()
    assert ((grad[n_l + n_u:] > 0).all() if "mixed" in views else (grad[n_l + n_u:] == 0).all())


def test_mixed_target_with_label_trains_the_mixed_view_on_mixup_targets(semi_dataset, monkeypatch):
    """``_mixedTargetWithLabel``: the mixed view's target is what ``mixup_targets`` makes of the pseudo label and the
    partner's ground truth; replaced by the pseudo label alone, the step is the paper's default one."""
    import nnunet_semi.methods.sgrs as sgrs
    from helpers import random_streams_rewinder
    from nnunet_semi.methods import nnUNetTrainerSGRS_mixedTargetWithLabel

    trainer = make_trainer(semi_dataset, type("TinySGRSMixed", (_Tiny, nnUNetTrainerSGRS_mixedTargetWithLabel), {}))
    labeled, unlabeled = next_batches(trainer)
    rewind = random_streams_rewinder(trainer)
    calls = []
    real = sgrs.mixup_targets

    def recording(pseudo, partner, lambdas, num_classes, ignore):
        calls.append((pseudo, partner, lambdas))
        return real(pseudo, partner, lambdas, num_classes, ignore)

    monkeypatch.setattr(sgrs, "mixup_targets", recording)
    with_label = trainer.compute_losses(labeled, unlabeled)
    pseudo, partner, lambdas = calls[0]
    assert partner.shape == pseudo.shape and (lambdas >= 0.5).all()
    assert (partner != pseudo).any()  # the ground truth says something the pseudo label does not
    rewind()
    monkeypatch.setattr(sgrs, "mixup_targets", lambda pseudo, *args: pseudo)
    pseudo_only = trainer.compute_losses(labeled, unlabeled)
    rewind()
    trainer.mixed_target_includes_label = False
    default = trainer.compute_losses(labeled, unlabeled)
    for term in ("pseudo_ce", "pseudo_dice"):
        torch.testing.assert_close(pseudo_only[term], default[term])
    assert not torch.equal(with_label["pseudo_ce"], default["pseudo_ce"])


def test_teacher_dropout_makes_the_labeling_teacher_stochastic_and_leaves_it_otherwise_unchanged(semi_dataset):
    from nnunet_semi.methods import nnUNetTrainerSGRS_teacherDropout

    trainer = make_trainer(semi_dataset, type("TinySGRSDrop", (_Tiny, nnUNetTrainerSGRS_teacherDropout), {}))
    x = next(trainer.dataloader_train)["data"]
    generator = torch.Generator().manual_seed(0)
    first, second = (trainer.labeling_teacher_probabilities(x, generator) for _ in range(2))
    assert not torch.allclose(first, second)  # channels dropped, differently each call
    # outside labeling (validation, deployment) the teacher is the plain EMA network
    torch.testing.assert_close(trainer.teacher_probabilities(x), trainer.teacher_probabilities(x))
    weights = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.train_step(next(trainer.dataloader_train))
    assert set(trainer.teacher.state_dict()) == set(weights)  # hooks only, no new state


@pytest.mark.parametrize("confidence, all_kept", [(None, True), (1.01, False)])
def test_confident_pseudo_labels_drop_the_regional_loss_where_the_teacher_is_unsure(semi_dataset, confidence,
                                                                                   all_kept):
    trainer = make_trainer(semi_dataset, type("TinySGRSConf", (_Tiny, nnUNetTrainerSGRS),
                                              {"pseudo_label_confidence": confidence}))
    out = trainer.train_step(next(trainer.dataloader_train))
    if all_kept:
        assert out["stat_pseudo_label_kept_fraction"] == 1.0 and out["loss_pseudo_ce"] > 0
    else:  # no probability reaches 1.01: no voxel is supervised
        assert out["stat_pseudo_label_kept_fraction"] == 0.0
        assert out["loss_pseudo_ce"] == 0 and out["loss_pseudo_dice"] == pytest.approx(0.0, abs=1e-6)


def test_largest_component_pseudo_labels_filter_the_teachers_labels_before_every_loss(semi_dataset, monkeypatch):
    """``_largestComponentPseudoLabels``: the teacher's hard labels pass through ``largest_component_per_class``
    before the regional losses; erasing them there changes the losses, and the share kept is logged (1 without)."""
    import nnunet_semi.methods.sgrs as sgrs
    from helpers import random_streams_rewinder
    from nnunet_semi.methods import nnUNetTrainerSGRS_largestComponentPseudoLabels

    trainer = make_trainer(semi_dataset, type("TinySGRSLCC", (_Tiny, nnUNetTrainerSGRS_largestComponentPseudoLabels),
                                              {}))
    labeled, unlabeled = next_batches(trainer)
    rewind = random_streams_rewinder(trainer)
    seen = []
    real = sgrs.largest_component_per_class

    def recording(labels, num_classes):
        seen.append(labels.clone())
        return real(labels, num_classes)

    monkeypatch.setattr(sgrs, "largest_component_per_class", recording)
    filtered = trainer.compute_losses(labeled, unlabeled)
    assert len(seen) == 1 and seen[0].shape == (unlabeled["data_weak"].shape[0], 1, *labeled["data"].shape[2:])
    assert (seen[0] > 0).any()  # the teacher labels some foreground: the filter has something to keep
    assert 0 < trainer._step_statistics["largest_component_share"] <= 1
    rewind()
    monkeypatch.setattr(sgrs, "largest_component_per_class", lambda labels, c: (torch.zeros_like(labels), 0.0))
    erased = trainer.compute_losses(labeled, unlabeled)
    assert not torch.equal(erased["pseudo_ce"], filtered["pseudo_ce"])
    assert trainer._step_statistics["largest_component_share"] == 0.0
    rewind()
    trainer.pseudo_label_largest_component = False
    trainer.compute_losses(labeled, unlabeled)
    assert len(seen) == 1 and trainer._step_statistics["largest_component_share"] == 1.0
