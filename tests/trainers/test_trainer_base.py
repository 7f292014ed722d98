"""The semi-supervised base and Mean Teacher, driven in-process on the tiny planned dataset (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import make_trainer, tiny_schedule
from nnunet_semi.components.ema import ema_momentum, ema_update, make_teacher
from nnunet_semi.components.schedules import sigmoid_rampup
from nnunet_semi.data.loaders import TwoViewUnlabeledLoader
from nnunet_semi.methods import nnUNetTrainerMeanTeacher


class _TinyMeanTeacher(nnUNetTrainerMeanTeacher):
    epochs = 4
    iterations_per_epoch = 2
    val_iterations_per_epoch = 1


def _make_trainer(env, cls=_TinyMeanTeacher):
    return make_trainer(env, cls)


def test_sigmoid_rampup_endpoints_and_monotonic():
    values = [sigmoid_rampup(s, 10) for s in range(12)]
    assert values[0] == pytest.approx(np.exp(-5)) and values[10] == 1.0 and values[11] == 1.0
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert sigmoid_rampup(3, 0) == 1.0


def test_ema_update_matches_the_formula_and_copies_integer_buffers():
    student = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(4, 3))  # moves running stats and the integer counter
    ema_update(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        s = student.state_dict()[k]
        expected = s if not v.dtype.is_floating_point else 0.9 * before[k] + 0.1 * s
        torch.testing.assert_close(v, expected)
    assert ema_momentum(0, 0.99) == 0.0 and ema_momentum(9, 0.99) == pytest.approx(0.9)
    assert ema_momentum(10_000, 0.99) == 0.99


def test_unlabeled_views_share_the_crop_and_carry_no_target(semi_dataset):
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    trainer = _make_trainer(semi_dataset)
    loader = trainer.dataloader_unlabeled.data_loader
    batch = next(trainer.dataloader_unlabeled)
    assert set(batch) == {"data_weak", "data_strong", "keys"}
    assert batch["data_weak"].shape == batch["data_strong"].shape == (2, 1, 24, 24, 24)
    loader.strong_transforms = ComposeTransforms([])  # without photometric changes the views are identical
    for _ in range(3):
        batch = next(trainer.dataloader_unlabeled)
        torch.testing.assert_close(batch["data_weak"], batch["data_strong"])
        assert batch["data_weak"].std() > 0  # a real image, not padding


def test_each_method_builds_only_the_unlabeled_views_it_reads(semi_dataset):
    from nnunet_semi.methods import (
        nnUNetTrainerCIFP,
        nnUNetTrainerCPS,
        nnUNetTrainerMeanTeacher,
        nnUNetTrainerNPCal,
        nnUNetTrainerSGRS,
        nnUNetTrainerSGRS_strongView,
    )

    expected = {nnUNetTrainerMeanTeacher: {"data_weak", "data_strong"}, nnUNetTrainerSGRS: {"data_weak"},
                nnUNetTrainerSGRS_strongView: {"data_weak", "data_strong"}, nnUNetTrainerCPS: {"data_strong"},
                nnUNetTrainerNPCal: {"data_weak", "data_strong"}, nnUNetTrainerCIFP: {"data_weak", "data_strong"}}
    for cls, views in expected.items():
        trainer = make_trainer(semi_dataset, tiny_schedule(cls))
        assert set(next(trainer.dataloader_unlabeled)) == views | {"keys"}, cls.__name__
        trainer.train_step(next(trainer.dataloader_train))  # and it trains on them
    with pytest.raises(ValueError, match="views must be a non-empty subset"):
        TwoViewUnlabeledLoader(trainer.unlabeled_pool, 2, (24, 24, 24), (24, 24, 24), trainer.label_manager,
                               None, None, None, views=("plain",))


def test_strong_view_differs_from_the_weak_one_on_every_sample(semi_dataset):
    trainer = _make_trainer(semi_dataset)
    loader = trainer.dataloader_unlabeled.data_loader

    def unchanged_samples(n_batches=10):
        batches = [next(trainer.dataloader_unlabeled) for _ in range(n_batches)]
        return sum(torch.equal(w, s) for b in batches for w, s in zip(b["data_weak"], b["data_strong"]))

    assert unchanged_samples() == 0
    loader.strong_transforms = loader.strong_transforms.pipeline  # nnU-Net's pipeline as it is: many crops untouched
    assert unchanged_samples() >= 2


def test_a_pipeline_that_cannot_change_the_image_returns_it():
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    from nnunet_semi.data.loaders import PerturbedUntilChanged

    image = torch.ones(1, 4, 4, 4)
    assert PerturbedUntilChanged(ComposeTransforms([]))(image=image)["image"] is image
    calls = []
    never_changes = ComposeTransforms([type("Identity", (), {"__call__": lambda self, **d: (calls.append(1), d)[1]})()])
    assert torch.equal(PerturbedUntilChanged(never_changes, max_attempts=5)(image=image)["image"], image)
    assert len(calls) == 5


def _zero_background_case(folder, name="bg_000", shape=(24, 24, 24)):
    """A preprocessed image-only case that is exactly 0 outside a central box, as nnU-Net's mask-for-norm leaves it."""
    import blosc2

    image = np.zeros((1, *shape), dtype=np.float32)
    image[:, 6:18, 6:18, 6:18] = np.random.default_rng(0).normal(size=(12, 12, 12))
    blosc2.asarray(np.ascontiguousarray(image), urlpath=str(folder / f"{name}.b2nd"), mode="w")
    return name


@pytest.mark.parametrize("masked", [True, False])
def test_mask_for_norm_keeps_the_background_of_both_views_at_zero(tmp_path, masked):
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_semi.data.loaders import (
        ImageOnlyDataset,
        PerturbedUntilChanged,
        TwoViewUnlabeledLoader,
        split_spatial_and_photometric,
    )

    case = _zero_background_case(tmp_path)
    pipeline = nnUNetTrainer.get_training_transforms((24, 24, 24), (0, 0), None, (0, 1, 2), False,
                                                     use_mask_for_norm=[masked])
    spatial, photometric, mask_for_norm = split_spatial_and_photometric(pipeline)
    assert (mask_for_norm is not None) == masked
    loader = TwoViewUnlabeledLoader(ImageOnlyDataset({case: str(tmp_path)}), 4, (24, 24, 24), (24, 24, 24),
                                    LabelManager({"background": 0, "x": 1}, None), spatial, ComposeTransforms([]),
                                    PerturbedUntilChanged(photometric), mask_for_norm)
    background = torch.ones(24, 24, 24, dtype=torch.bool)
    background[6:18, 6:18, 6:18] = False  # no rotation or scaling in this pipeline: only mirroring moves voxels
    batch = loader.generate_train_batch()
    assert torch.all(batch["data_weak"][:, 0, background] == 0)  # no photometric change: stays 0 either way
    # the student's intensity changes (contrast, gamma, noise, blur) reach the background unless it is masked again
    assert torch.all(batch["data_strong"][:, 0, background] == 0) == masked
    assert batch["data_strong"][:, 0, ~background].abs().sum() > 0


def test_unlabeled_loader_takes_the_plans_mask_for_norm(semi_dataset):
    trainer = _make_trainer(semi_dataset)
    assert trainer.dataloader_unlabeled.data_loader.mask_for_norm is None
    trainer.configuration_manager.configuration["use_mask_for_norm"] = [True]
    assert trainer._build_unlabeled_dataloader(0).data_loader.mask_for_norm.apply_to_channels == [0]


def test_unlabeled_pool_is_split_cases_plus_images_unlabeled(semi_dataset):
    trainer = _make_trainer(semi_dataset)
    split = json.loads((semi_dataset.preprocessed_dataset / "splits_final.json").read_text())[0]
    assert trainer.unlabeled_pool.identifiers == sorted(split["unlabeled"] + ["unl_000", "unl_001", "unl_002"])
    assert not set(trainer.unlabeled_pool.identifiers) & set(split["val"] + split["train"])


def test_unlabeled_labels_are_never_read(semi_dataset):
    """Destroy the segmentation files of the split's unlabeled cases: training must not notice."""
    split = json.loads((semi_dataset.preprocessed_dataset / "splits_final.json").read_text())[0]
    for case in split["unlabeled"]:
        (semi_dataset.preprocessed_dataset / "nnUNetPlans_3d_fullres" / f"{case}_seg.b2nd").write_bytes(b"poison")
    trainer = _make_trainer(semi_dataset)
    seen = set()
    for _ in range(4):
        seen.update(next(trainer.dataloader_unlabeled)["keys"])
        out = trainer.train_step(next(trainer.dataloader_train))
        assert np.isfinite(out["loss"])
    assert seen & set(split["unlabeled"])


def test_consistency_alone_trains_the_student_not_the_teacher(semi_dataset):
    trainer = _make_trainer(semi_dataset)
    labeled = next(trainer.dataloader_train)
    unlabeled = next(trainer.dataloader_unlabeled)
    labeled = {"data": labeled["data"], "target": labeled["target"]}
    trainer.optimizer.zero_grad()
    terms = trainer.compute_losses(labeled, {k: v for k, v in unlabeled.items() if k != "keys"})
    assert set(terms) == set(trainer.loss_terms)
    terms["consistency"].backward()
    no_grad = {n for n, p in trainer.network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    # full-resolution consistency: only the low-resolution deep-supervision heads stay without gradient
    assert no_grad == {n for n, _ in trainer.network.named_parameters()
                       if n.startswith("decoder.seg_layers.") and not n.startswith("decoder.seg_layers.1.")}
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert not any(p is q for p in trainer.teacher.parameters() for g in trainer.optimizer.param_groups
                   for q in g["params"])


def test_teacher_computes_the_full_resolution_output_only(semi_dataset):
    trainer = _make_trainer(semi_dataset)
    x = next(trainer.dataloader_train)["data"]
    with torch.no_grad():
        student, teacher = trainer.network(x), trainer.teacher(x)
    assert isinstance(student, (list, tuple)) and len(student) > 1  # the student keeps deep supervision
    assert isinstance(teacher, torch.Tensor) and teacher.shape == student[0].shape


def test_train_step_is_one_optimizer_step_and_one_ema_update(semi_dataset):
    trainer = _make_trainer(semi_dataset)
    calls = []
    original_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (calls.append(1), original_step(*a, **k))[1]
    trainer.train_step(next(trainer.dataloader_train))  # step 0: momentum 0, teacher := student
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    out = trainer.train_step(next(trainer.dataloader_train))
    assert len(calls) == 2 and trainer.global_step == 2
    m = ema_momentum(1, trainer.teacher_momentum)
    student = trainer.network.state_dict()
    for k, v in trainer.teacher.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, m * teacher_before[k] + (1 - m) * student[k])
    assert {"loss", "loss_sup", "loss_consistency", "stat_confident_fraction",
            "stat_teacher_student_agreement"} <= set(out)
    assert out["unsup_weight"] == pytest.approx(trainer.unsup_weight * sigmoid_rampup(1, 6000))
    expected = out["loss_sup"] + out["unsup_weight"] * out["loss_consistency"]
    assert out["loss"] == pytest.approx(expected, rel=1e-5)


def test_resume_restores_teacher_and_ramp_step(semi_dataset):
    trainer = _make_trainer(semi_dataset)
    outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
    trainer.on_train_epoch_end(outputs)
    # as nnU-Net's on_epoch_end: the checkpoint written during epoch 0 records epoch 1 as the next one
    checkpoint = semi_dataset.results / "latest.pth"
    trainer.save_checkpoint(str(checkpoint))
    saved = torch.load(checkpoint, weights_only=False)
    assert set(saved["network_weights"]) == set(trainer.network.state_dict())
    assert not any(k.startswith("teacher") for k in saved["network_weights"])

    resumed = _make_trainer(semi_dataset)
    resumed.load_checkpoint(str(checkpoint))
    resumed.on_train_epoch_start()
    for k, v in trainer.teacher.state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[k], v)
    # the step (and with it the ramp and the EMA momentum) continues from the 2 steps of the finished epoch
    assert resumed.current_epoch == 1 and resumed.global_step == trainer.num_iterations_per_epoch == 2
    assert resumed.unsupervised_ramp() == pytest.approx(trainer.unsup_weight * sigmoid_rampup(2, 6000))


def _bare(cls, **attributes):
    """An instance of ``cls`` (with class attributes overridden) that has not run nnU-Net's __init__: enough for the
    methods that read class attributes only."""
    variant = type(cls.__name__, (cls,), attributes)
    return variant.__new__(variant)


def test_ramp_length_is_iterations_whatever_the_schedule():
    short, long = _bare(_TinyMeanTeacher), _bare(_TinyMeanTeacher, epochs=1000, iterations_per_epoch=250)
    for trainer in (short, long):
        trainer.current_epoch, trainer._iteration_in_epoch, trainer.num_iterations_per_epoch = 0, 3000, 1
    assert short.unsupervised_ramp() == long.unsupervised_ramp() == pytest.approx(0.1 * sigmoid_rampup(3000, 6000))


def test_each_method_declares_its_papers_ramp_and_only_the_declared_terms_ramp():
    from nnunet_semi.methods import (
        nnUNetTrainerCIFP,
        nnUNetTrainerCPS,
        nnUNetTrainerDualCCE,
        nnUNetTrainerNPCal,
        nnUNetTrainerSGRS,
    )

    declared = {cls: (cls.unsup_weight, cls.unsup_rampup_iterations, cls.ramped_unsupervised_terms())
                for cls in (nnUNetTrainerMeanTeacher, nnUNetTrainerSGRS, nnUNetTrainerCPS, nnUNetTrainerCIFP,
                            nnUNetTrainerNPCal, nnUNetTrainerDualCCE)}
    assert declared == {nnUNetTrainerMeanTeacher: (0.1, 6000, ("consistency",)),
                        nnUNetTrainerSGRS: (1.0, 6000, ("pseudo_ce", "pseudo_dice")),
                        nnUNetTrainerCPS: (1.5, 6000, ()),
                        nnUNetTrainerCIFP: (1.0, 6000, ()),
                        nnUNetTrainerNPCal: (1.0, 6000, ("pseudo", "np_pseudo")),
                        nnUNetTrainerDualCCE: (1.0, 6000, ("prototype",))}
    one = torch.tensor(1.0)
    # early in the ramp (0.01): CPS's cross term already weighs 1.5; of DualCCE's terms only the prototype is ramped
    assert float(_bare(nnUNetTrainerCPS).combine_losses({"sup": one, "sup_peer": one, "cross_pseudo": one}, 0.01)) \
        == pytest.approx(3.5)
    dual_terms = dict.fromkeys(nnUNetTrainerDualCCE.loss_terms, one)
    # sup, sup_peer, 0.5 x sup_cross_reliable; three unsupervised terms at weight 1; 0.1 x the ramped prototype
    assert float(_bare(nnUNetTrainerDualCCE).combine_losses(dual_terms, 0.01)) == pytest.approx(2.5 + 3 + 0.001)
    with pytest.raises(ValueError, match="not unsupervised terms"):
        _bare(nnUNetTrainerMeanTeacher, ramped_terms=("sup", "nonsense")).ramped_unsupervised_terms()
    # what the training log and the benchmark print, from the class alone
    assert nnUNetTrainerCPS.describe_ramp(600) == "no ramp"
    assert nnUNetTrainerSGRS.describe_ramp() == "sigmoid ramp over 6000 iterations for pseudo_ce, pseudo_dice"
    assert nnUNetTrainerDualCCE.describe_ramp(600) == ("sigmoid ramp over 600 iterations for prototype; from the "
                                                      "first step for entropy_filtered, kl_weighted, output_cosine")


def test_missing_unlabeled_preprocessing_is_reported(planned_dataset, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    with pytest.raises(RuntimeError, match="Run nnUNetv2_semi_preprocess -d Dataset990_SemiSynthetic -c 3d_fullres"):
        _make_trainer(planned_dataset)


def test_stale_unlabeled_preprocessing_is_reported(semi_dataset):
    plans_file = semi_dataset.preprocessed_dataset / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] += 1.0  # as after re-planning
    plans_file.write_text(json.dumps(plans))
    with pytest.raises(RuntimeError, match="preprocessed with other plans.*Run nnUNetv2_semi_preprocess"):
        _make_trainer(semi_dataset)


def test_cascade_is_refused(semi_dataset):
    plans = json.loads((semi_dataset.preprocessed_dataset / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_fullres"}
    plans["continue_training"] = False
    dataset_json = json.loads((semi_dataset.preprocessed_dataset / "dataset.json").read_text())
    trainer = _TinyMeanTeacher(plans, "3d_cascade_fullres", 0, dataset_json, device=torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="does not support cascade"):
        trainer.initialize()


def test_teacher_is_deployed_when_it_validates_better_and_the_student_is_kept(semi_dataset):
    best_validated = type("BestValidated", (_TinyMeanTeacher,), {"deployed_model": "best_validated"})
    trainer = _make_trainer(semi_dataset, best_validated)
    trainer.train_step(next(trainer.dataloader_train))
    trainer.train_step(next(trainer.dataloader_train))
    student = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    store = trainer.logger.local_logger.my_fantastic_logging
    store["semi_teacher_dice"], store["mean_fg_dice"] = [0.8, 0.9], [0.7, 0.85]
    for _ in range(2):  # a second call (a finished run resumed with --c) must not overwrite the kept student
        trainer.finalize_deployed_weights()
        assert trainer.deployed_weights == "teacher"
        for k, v in trainer.network.state_dict().items():
            torch.testing.assert_close(v, teacher[k])
            torch.testing.assert_close(trainer.auxiliary["student"].state_dict()[k], student[k])

    other = _make_trainer(semi_dataset, type(trainer))
    store = other.logger.local_logger.my_fantastic_logging
    store["semi_teacher_dice"], store["mean_fg_dice"] = [0.5], [0.6]
    other.finalize_deployed_weights()
    assert other.deployed_weights == "student" and "student" not in other.auxiliary


def test_the_declared_model_is_deployed_whatever_validates_better(semi_dataset):
    trainer = _make_trainer(semi_dataset)
    store = trainer.logger.local_logger.my_fantastic_logging
    store["semi_teacher_dice"], store["mean_fg_dice"] = [0.9], [0.1]
    trainer.finalize_deployed_weights()
    assert trainer.deployed_model == "student" and trainer.deployed_weights == "student"
    with pytest.raises(ValueError, match="deployed_model is 'techer'"):
        _make_trainer(semi_dataset, type("Misspelt", (_TinyMeanTeacher,), {"deployed_model": "techer"}))


def test_a_nan_validation_score_never_wins():
    trainer = _bare(_TinyMeanTeacher)
    assert trainer.choose_deployed_weights({"student": float("nan"), "teacher": 0.8}) == "teacher"
    assert trainer.choose_deployed_weights({"student": 0.8, "teacher": float("nan")}) == "student"
    assert trainer.choose_deployed_weights({"student": 0.8, "teacher": 0.8}) == "teacher"  # ties: the later one


def test_cps_trains_both_networks_with_one_optimizer(semi_dataset):
    from nnunet_semi.methods import nnUNetTrainerCPS

    class TinyCPS(nnUNetTrainerCPS):
        epochs, iterations_per_epoch, val_iterations_per_epoch = 4, 2, 1

    trainer = _make_trainer(semi_dataset, TinyCPS)
    assert trainer.teacher is None and len(trainer.optimizer.param_groups) == 2
    peer_before = {k: v.clone() for k, v in trainer.auxiliary["peer"].state_dict().items()}
    network_before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    # differently initialised networks, as CPS needs
    assert any(not torch.equal(v, network_before[k]) for k, v in peer_before.items())
    out = trainer.train_step(next(trainer.dataloader_train))
    assert {"loss_sup", "loss_sup_peer", "loss_cross_pseudo", "stat_network_agreement"} <= set(out)
    for before, module in ((peer_before, trainer.auxiliary["peer"]), (network_before, trainer.network)):
        assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
    trainer.lr_scheduler.step(3)
    assert trainer.optimizer.param_groups[0]["lr"] == trainer.optimizer.param_groups[1]["lr"] < trainer.initial_lr


class _UndeclaredStatistic(_TinyMeanTeacher):
    def compute_losses(self, labeled, unlabeled):
        terms = super().compute_losses(labeled, unlabeled)
        self.log_step_statistic("made_up_fraction", 0.5)
        return terms


class _UndeclaredTerm(_TinyMeanTeacher):
    def compute_losses(self, labeled, unlabeled):
        return super().compute_losses(labeled, unlabeled) | {"extra": torch.zeros((), requires_grad=True)}


@pytest.mark.parametrize("cls, named", [(_UndeclaredStatistic, "made_up_fraction"), (_UndeclaredTerm, "extra")])
def test_undeclared_statistics_and_terms_are_refused_at_the_first_step(semi_dataset, cls, named):
    """The method contract: every statistic and term a method produces is declared, so none vanishes from the logs
    or trains unlogged."""
    trainer = _make_trainer(semi_dataset, cls)
    with pytest.raises(ValueError, match=named):
        trainer.train_step(next(trainer.dataloader_train))


@pytest.mark.parametrize("declarations, named", [
    ({"supervised_terms": ("sup", "made_up")}, "supervised_terms names \\['made_up'\\]"),
    ({"term_weights": {"made_up": 0.5}}, "term_weights names \\['made_up'\\]"),
    ({"term_weights": {"consistency": "no_such_attribute"}}, "'no_such_attribute', which is not a number"),
])
def test_loss_declarations_naming_nothing_are_refused_at_initialize(semi_dataset, declarations, named):
    with pytest.raises(ValueError, match=named):
        _make_trainer(semi_dataset, type("Misdeclared", (_TinyMeanTeacher,), declarations))


def test_term_weights_are_applied_by_the_base_and_logged_raw_and_weighted(semi_dataset):
    """A weight named by attribute follows that attribute (a one-line variant), a supervised term takes no ramp."""
    cls = type("Weighted", (_TinyMeanTeacher,), {"consistency_factor": 3.0, "term_weights": {
        "sup": 2.0, "consistency": "consistency_factor"}})
    trainer = _make_trainer(semi_dataset, cls)
    out = trainer.train_step(next(trainer.dataloader_train))
    ramp = float(out["unsup_weight"])
    assert float(out["weighted_sup"]) == pytest.approx(2.0 * float(out["loss_sup"]))
    assert float(out["weighted_consistency"]) == pytest.approx(3.0 * ramp * float(out["loss_consistency"]))
    assert float(out["loss"]) == pytest.approx(float(out["weighted_sup"] + out["weighted_consistency"]), rel=1e-5)
    trainer.on_train_epoch_end([out])
    logged = trainer.logger.local_logger.my_fantastic_logging
    assert logged["semi_weighted_consistency"][-1] == pytest.approx(float(out["weighted_consistency"]))
    assert logged["semi_loss_consistency"][-1] == pytest.approx(float(out["loss_consistency"]))


def test_setting_nnunets_schedule_attribute_on_a_class_is_refused():
    with pytest.raises(TypeError, match="sets `num_epochs`.*set `epochs` instead"):
        type("WrongSchedule", (_TinyMeanTeacher,), {"num_epochs": 10})


def test_the_base_puts_trained_auxiliary_modules_in_train_mode_and_all_in_eval_for_validation(semi_dataset):
    from nnunet_semi.methods import nnUNetTrainerCPS

    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerCPS, teacher_momentum=0.99))
    trainer.auxiliary["peer"].eval()  # as validation leaves it
    trainer.on_train_epoch_start()
    assert trainer.auxiliary["peer"].training and not trainer.teacher.training
    trainer.on_validation_epoch_start()
    assert not trainer.auxiliary["peer"].training and not trainer.teacher.training


def test_a_checkpoint_logged_with_fewer_keys_resumes_with_those_keys_aligned(semi_dataset, tmp_path):
    """A checkpoint of an older version lacks some log keys: after the resume they are NaN for its epochs."""
    trainer = _make_trainer(semi_dataset)
    for epoch in range(2):  # as nnU-Net saves at the end of epoch 1: its checkpoint resumes at epoch 2
        trainer.current_epoch = epoch
        trainer.on_train_epoch_end([trainer.train_step(next(trainer.dataloader_train))])
    for key in ("semi_weighted_sup", "semi_weighted_consistency"):
        del trainer.logger.local_logger.my_fantastic_logging[key]
    trainer.save_checkpoint(str(tmp_path / "old.pth"))
    resumed = _make_trainer(semi_dataset)
    resumed.load_checkpoint(str(tmp_path / "old.pth"))
    logged = resumed.logger.local_logger.my_fantastic_logging
    assert len(logged["semi_weighted_sup"]) == 2 and np.isnan(logged["semi_weighted_sup"]).all()
    resumed.on_train_epoch_end([resumed.train_step(next(resumed.dataloader_train))])
    assert len(logged["semi_weighted_sup"]) == 3 and np.isfinite(logged["semi_weighted_sup"][2])


def test_the_runs_random_streams_derive_from_its_seed():
    def stream(seed):
        trainer = _bare(_TinyMeanTeacher)
        trainer._generators = {}
        torch.manual_seed(seed)
        return torch.rand(5, generator=trainer.random_generator("cpu"))

    torch.testing.assert_close(stream(7), stream(7), rtol=0, atol=0)
    assert not torch.equal(stream(7), stream(8))
