"""Warm start (``nnUNetv2_train ... -pretrained_weights CHECKPOINT``) of every trainer: the checkpoint is loaded
whole, output layers included, through the function nnU-Net's ``maybe_load_checkpoint`` calls; the teacher starts
as the loaded student; the loaded weights are the ones the optimizer trains; ``--c`` resumes the warm-started run;
a checkpoint of other classes or another network is a one-line error naming both, with nothing loaded."""

from __future__ import annotations

import json

import pytest
import torch

import nnunet_semi.methods
from helpers import DATASET_ID, tiny_schedule
from nnunet_semi.errors import SemiInputError
from nnunet_semi.trainer import warm_start
from nnunet_semi.trainer.warm_start import PEER_WEIGHTS_VARIABLE, nnUNetTrainer_warmStart

# every method (variants change class attributes only) and the stock control
TRAINERS = sorted({getattr(nnunet_semi.methods, n) for n in nnunet_semi.methods.__all__ if "_" not in n},
                  key=lambda c: c.__name__) + [nnUNetTrainer_warmStart]


def _plans_and_json(env) -> tuple[dict, dict]:
    plans = json.loads((env.preprocessed_dataset / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    return plans, json.loads((env.preprocessed_dataset / "dataset.json").read_text())


def _trainer(env, cls):
    plans, dataset_json = _plans_and_json(env)
    return tiny_schedule(cls)(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))


def _trained_checkpoint(env, name: str, cls=None, shift: float = 1.0) -> tuple[str, dict]:
    """A checkpoint written by a trainer's own ``save_checkpoint`` (``init_args`` and all), whose weights are
    shifted away from any fresh initialisation; returns its path and network weights."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = _trainer(env, cls or nnUNetTrainer)
    trainer.initialize()
    with torch.no_grad():
        for value in trainer.network.state_dict().values():
            if value.dtype.is_floating_point:
                value.add_(shift + torch.rand_like(value))
    path = str(env.results / f"{name}.pth")
    trainer.save_checkpoint(path)
    return path, torch.load(path, weights_only=False)["network_weights"]


def _assert_state(module, weights):
    state = module.state_dict()
    assert set(state) == set(weights)
    for key, value in weights.items():
        assert torch.equal(state[key].cpu(), value.cpu()), key


def _nnunetv2_train_start(trainer, checkpoint: str):
    """What nnUNetv2_train does with -pretrained_weights: nnU-Net's maybe_load_checkpoint, then training starts."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    maybe_load_checkpoint(trainer, False, False, checkpoint)
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()


@pytest.mark.parametrize("trainer_cls", TRAINERS, ids=lambda c: c.__name__)
def test_warm_start_loads_every_layer_and_the_loaded_weights_train_and_resume(trainer_cls, semi_dataset):
    checkpoint, weights = _trained_checkpoint(semi_dataset, "stock")
    assert any(".seg_layers." in k for k in weights)
    trainer = _trainer(semi_dataset, trainer_cls)
    _nnunetv2_train_start(trainer, checkpoint)
    _assert_state(trainer.network, weights)  # output layers included
    assert trainer.warm_started_from == checkpoint
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None:  # the teacher starts as the loaded student
        _assert_state(teacher, weights)
    # the loaded tensors are the ones the optimizer steps
    network_parameters = list(trainer.network.parameters())
    assert all(any(p is q for q in trainer.optimizer.param_groups[0]["params"]) for p in network_parameters)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    step = trainer.train_step(next(trainer.dataloader_train))
    after = trainer.network.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if ".seg_layers." in k)

    # --c after a warm start: the warm-started run's own checkpoint is resumed, not the warm start again
    trainer.on_train_epoch_end([step])
    latest = str(semi_dataset.results / "latest.pth")
    trainer.save_checkpoint(latest)
    resumed = _trainer(semi_dataset, type("Resumed", (trainer_cls,), {"warm_start_checkpoint": checkpoint}))
    resumed.load_checkpoint(latest)
    resumed.on_train_start()
    _assert_state(resumed.network, {k: v.cpu() for k, v in trainer.network.state_dict().items()})
    assert resumed.warm_started_from is None and resumed.current_epoch == 1
    if teacher is not None:
        _assert_state(resumed.teacher, {k: v.cpu() for k, v in trainer.teacher.state_dict().items()})
    for module in (trainer, resumed):
        module.on_train_end()


def test_a_run_class_with_a_warm_start_checkpoint_starts_from_it(semi_dataset):
    """The benchmark's warm-start runs carry their checkpoint as a class attribute (no -pretrained_weights)."""
    checkpoint, weights = _trained_checkpoint(semi_dataset, "stock")
    cls = type("Warm", (nnunet_semi.methods.nnUNetTrainerMeanTeacher,), {"warm_start_checkpoint": checkpoint})
    trainer = _trainer(semi_dataset, cls)
    trainer.on_train_start()
    _assert_state(trainer.network, weights)
    _assert_state(trainer.teacher, weights)
    trainer.on_train_end()


def test_stock_nnunet_keeps_its_own_loading_unless_every_trainer_is_warm_started(semi_dataset):
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    checkpoint, weights = _trained_checkpoint(semi_dataset, "stock")
    stock = _trainer(semi_dataset, nnUNetTrainer)
    maybe_load_checkpoint(stock, False, False, checkpoint)  # nnU-Net's function: output layers skipped
    state = stock.network.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights if ".seg_layers." not in k)
    assert not any(torch.equal(state[k], weights[k]) for k in weights if ".seg_layers." in k)
    try:  # python -m nnunet_semi.tools.warm_train: every trainer of the process loads whole
        warm_start.warm_start_every_trainer()
        finetuned = _trainer(semi_dataset, nnUNetTrainer)
        maybe_load_checkpoint(finetuned, False, False, checkpoint)
        _assert_state(finetuned.network, weights)
    finally:
        warm_start.warm_start_every_trainer(False)


def test_a_checkpoint_of_another_network_is_one_line_naming_both_and_nothing_is_loaded(semi_dataset, capsys):
    from helpers import shrink_network

    plans_file = semi_dataset.preprocessed_dataset / "nnUNetPlans.json"
    original = plans_file.read_text()
    shrink_network(plans_file, features=(2, 4, 8))
    other, _ = _trained_checkpoint(semi_dataset, "other_network")
    plans_file.write_text(original)

    trainer = _trainer(semi_dataset, nnunet_semi.methods.nnUNetTrainerMeanTeacher)
    trainer.initialize()
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    with pytest.raises(SemiInputError) as error:
        trainer.load_warm_start(other)
    message = str(error.value)
    assert "\n" not in message and other in message and "another network" in message
    assert "trainer nnUNetTrainer" in message and "nnUNetTrainerMeanTeacher" in message  # both sides named
    assert "is (2," in message or "is (4," in message or "is (8," in message  # the first tensor that differs
    _assert_state(trainer.network, before)

    # through nnUNetv2_train: `nnUNetv2_train: error: ...` and exit code 2, before training starts
    from nnunetv2.run.run_training import maybe_load_checkpoint

    fresh = _trainer(semi_dataset, nnunet_semi.methods.nnUNetTrainerMeanTeacher)
    with pytest.raises(SystemExit) as exit_info:
        maybe_load_checkpoint(fresh, False, False, other)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("nnUNetv2_train: error: ")


def test_a_checkpoint_of_other_classes_is_refused_naming_both(semi_dataset):
    checkpoint, _ = _trained_checkpoint(semi_dataset, "stock")
    saved = torch.load(checkpoint, weights_only=False)
    saved["init_args"]["dataset_json"]["labels"] = {"background": 0, "atrium": 1, "vein": 2}
    torch.save(saved, checkpoint)
    trainer = _trainer(semi_dataset, nnUNetTrainer_warmStart)
    with pytest.raises(SemiInputError, match=r"trained on the classes .*vein.* this trainer segments"):
        trainer.load_warm_start(checkpoint)
    with pytest.raises(SemiInputError, match="no such file"):
        trainer.load_warm_start(str(semi_dataset.results / "missing.pth"))


@pytest.mark.parametrize("method", ["CPS", "DualCCE"])
def test_the_peer_starts_from_its_own_checkpoint_or_from_scratch(method, semi_dataset, monkeypatch):
    from nnunet_semi.methods.dual_cce import nnUNetTrainer_DualCCEPeer

    cls = getattr(nnunet_semi.methods, f"nnUNetTrainer{method}")
    student_checkpoint, student_weights = _trained_checkpoint(semi_dataset, "stock")
    peer_source = nnUNetTrainer_DualCCEPeer if method == "DualCCE" else None  # CPS: stock of another seed
    peer_checkpoint, peer_weights = _trained_checkpoint(semi_dataset, "peer", peer_source, shift=2.0)

    monkeypatch.setenv(PEER_WEIGHTS_VARIABLE, peer_checkpoint)
    trainer = _trainer(semi_dataset, cls)
    _nnunetv2_train_start(trainer, student_checkpoint)
    _assert_state(trainer.network, student_weights)
    _assert_state(trainer.auxiliary["peer"], peer_weights)
    trainer.on_train_end()

    monkeypatch.setenv(PEER_WEIGHTS_VARIABLE, student_checkpoint)  # the same start for both: refused
    with pytest.raises(SemiInputError, match="the student's -pretrained_weights"):
        _trainer(semi_dataset, cls).load_warm_start(student_checkpoint)

    monkeypatch.delenv(PEER_WEIGHTS_VARIABLE)  # none given: the peer keeps its own random initialisation
    trainer = _trainer(semi_dataset, cls)
    trainer.initialize()
    fresh_peer = {k: v.clone() for k, v in trainer.auxiliary["peer"].state_dict().items()}
    trainer.load_warm_start(student_checkpoint)
    _assert_state(trainer.auxiliary["peer"], fresh_peer)
    assert DATASET_ID  # the dataset the fixture planned
