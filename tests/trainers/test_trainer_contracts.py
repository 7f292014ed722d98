"""Contract of every registered trainer, in 2D and 3D, binary, multi-class, regions and ignore label (timm's
test_models.py pattern).

Each trainer is built on CPU from a tiny planned dataset with a labeled subset and imagesUnlabeled, then must:
take finite steps that report exactly its declared terms; send gradient from its unsupervised terms alone into every
student parameter except the deep-supervision heads it declares unused; leave the teacher without gradient; round-
trip its checkpoint state; and keep network_weights loadable into the inference network.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import nnunet_semi.methods
from helpers import DATASET_ID, DATASET_NAME, plan_and_preprocess, point_nnunet_at, shrink_network
from nnunet_semi.data.splits import make_labeled_split
from nnunet_semi.data.unlabeled import preprocess_unlabeled
from nnunet_semi.tools.synthetic import make_synthetic_dataset
from support.fixmatch_method import nnUNetTrainerFixMatchExample

# one class per method: variants (``<Trainer>_<change>``) only change class attributes of their parent; and the
# test-only FixMatch example of "Adding a method", confident everywhere (an untrained network is confident nowhere)
TRAINERS = sorted({getattr(nnunet_semi.methods, n) for n in nnunet_semi.methods.__all__ if "_" not in n},
                  key=lambda c: c.__name__) + [
    type("nnUNetTrainerFixMatchExample", (nnUNetTrainerFixMatchExample,), {"pseudo_label_threshold": 0.0})]
SETTINGS = {  # name: (spatial shape, foreground classes, configuration, dataset.json labels or None)
    "2d_binary": ((40, 40), 1, "2d", None),
    "3d_multiclass": ((24, 24, 24), 2, "3d_fullres", None),
    # nnU-Net's region-based training (sigmoid outputs) and ignore label (label 2 is unannotated)
    "3d_regions": ((24, 24, 24), 2, "3d_fullres", {"background": 0, "object": [1, 2], "attachment": 2}),
    "3d_ignore_label": ((24, 24, 24), 2, "3d_fullres", {"background": 0, "object": 1, "ignore": 2}),
}
OUTPUT_CHANNELS = {"2d_binary": 2, "3d_multiclass": 3, "3d_regions": 2, "3d_ignore_label": 2}


@pytest.fixture(scope="session")
def _contract_templates(tmp_path_factory):
    templates = {}
    for name, (shape, classes, configuration, labels) in SETTINGS.items():
        root = tmp_path_factory.mktemp(name)
        mp = pytest.MonkeyPatch()
        try:
            folders = point_nnunet_at(mp, root)
            make_synthetic_dataset(str(folders.raw), DATASET_ID, num_labeled=5, num_unlabeled=2, num_test=0,
                                   shape=shape, num_foreground_classes=classes, seed=5)
            if labels is not None:
                dataset_json_file = folders.raw / DATASET_NAME / "dataset.json"
                dataset_json = json.loads(dataset_json_file.read_text()) | {"labels": labels}
                if any(isinstance(v, list) for v in labels.values()):
                    dataset_json["regions_class_order"] = [1, 2]
                dataset_json_file.write_text(json.dumps(dataset_json))
            plan_and_preprocess(DATASET_ID, configurations=(configuration,))
            shrink_network(folders.preprocessed / DATASET_NAME / "nnUNetPlans.json")
            make_labeled_split(DATASET_ID, 2)
            preprocess_unlabeled(DATASET_ID, [configuration], num_processes=1)
        finally:
            mp.undo()
        templates[name] = root
    return templates


class _Tiny:
    epochs, iterations_per_epoch, val_iterations_per_epoch = 2, 2, 1


def _build(trainer_cls, template, tmp_path, monkeypatch, configuration):
    root = tmp_path / "nnunet"
    shutil.copytree(template, root)
    folders = point_nnunet_at(monkeypatch, root)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    plans = json.loads((folders.preprocessed_dataset / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    dataset_json = json.loads((folders.preprocessed_dataset / "dataset.json").read_text())
    cls = type(f"{trainer_cls.__name__}Tiny", (_Tiny, trainer_cls), {})
    trainer = cls(plans, configuration, 0, dataset_json, device=torch.device("cpu"))
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    return trainer, folders


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("trainer_cls", TRAINERS, ids=lambda c: c.__name__)
def test_trainer_contract(trainer_cls, setting, _contract_templates, tmp_path, monkeypatch):
    shape, classes, configuration, _ = SETTINGS[setting]
    if setting == "3d_regions" and not trainer_cls.supports_regions:
        with pytest.raises(NotImplementedError, match="does not support region-based training"):
            _build(trainer_cls, _contract_templates[setting], tmp_path, monkeypatch, configuration)
        return
    trainer, folders = _build(trainer_cls, _contract_templates[setting], tmp_path, monkeypatch, configuration)
    outputs = trainer.label_manager.num_segmentation_heads
    assert outputs == OUTPUT_CHANNELS[setting]
    assert trainer.label_manager.has_regions == (setting == "3d_regions")
    assert trainer.label_manager.has_ignore_label == (setting == "3d_ignore_label")

    out = trainer.train_step(next(trainer.dataloader_train))
    assert {f"loss_{t}" for t in trainer.loss_terms} <= set(out)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values())

    # the unsupervised terms alone train the student
    labeled = next(trainer.dataloader_train)
    unlabeled = {k: v for k, v in next(trainer.dataloader_unlabeled).items() if k != "keys"}
    assert set(unlabeled) == {f"data_{v}" for v in trainer.unlabeled_views}
    assert all(v.shape[2:] == tuple(trainer.configuration_manager.patch_size) for v in unlabeled.values())
    # a validation step also scores the teacher (ignore label and regions included)
    validation = trainer.validation_step(next(trainer.dataloader_val))
    if trainer.teacher is not None:
        assert validation["teacher_tp"].shape == validation["tp_hard"].shape
    trainer.optimizer.zero_grad(set_to_none=True)
    global_random_state = torch.get_rng_state()
    terms = trainer.compute_losses({"data": labeled["data"], "target": labeled["target"]}, unlabeled)
    # every draw of the method comes from the run's generators (random_generator), none from torch's global one
    assert torch.equal(torch.get_rng_state(), global_random_state)
    sum(v for k, v in terms.items() if k not in trainer.supervised_terms).backward()
    heads = len(trainer.network.decoder.seg_layers)
    if trainer.unsup_uses_deep_supervision:  # every head but those nnU-Net weighs 0 (its lowest resolution)
        weights = getattr(trainer.loss, "weight_factors", [1])  # full resolution first; seg_layers: last
        silent = {heads - 1 - j for j, w in enumerate(weights) if w == 0}
    else:
        silent = set(range(heads - 1))
    unused = {n for n, _ in trainer.network.named_parameters()
              if any(n.startswith(f"decoder.seg_layers.{h}.") for h in silent)}
    without_grad = {n for n, p in trainer.network.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    assert without_grad == unused
    assert all(p.grad is None for p in trainer.auxiliary.parameters() if not p.requires_grad)
    for name, module in trainer.auxiliary.items():  # trained modules beside the student (a peer network, heads)
        if any(p.requires_grad for p in module.parameters()):
            names = {n for n, _ in module.named_parameters()}
            assert {n for n, p in module.named_parameters() if p.grad is None or p.grad.abs().sum() == 0} == \
                unused & names, name
            assert any(p is q for g in trainer.optimizer.param_groups for q in g["params"]
                       for p in module.parameters())

    # checkpoint state round trip, and network_weights is the inference network
    checkpoint = tmp_path / "checkpoint.pth"
    trainer.save_checkpoint(str(checkpoint))
    fresh, _ = _build(trainer_cls, _contract_templates[setting], tmp_path / "fresh", monkeypatch, configuration)
    fresh.load_checkpoint(str(checkpoint))
    for k, v in trainer.auxiliary.state_dict().items():
        torch.testing.assert_close(fresh.auxiliary.state_dict()[k], v)
    for device_type, generator in trainer._generators.items():  # the random streams continue where they were
        assert torch.equal(fresh.random_generator(device_type).get_state(), generator.get_state())
    saved = torch.load(checkpoint, weights_only=False)
    inference_network = trainer_cls.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, outputs, enable_deep_supervision=False)
    inference_network.load_state_dict(saved["network_weights"], strict=True)
