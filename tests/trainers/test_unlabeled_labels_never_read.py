"""The guarantee the README gives for every trainer: the labels of cases declared unlabeled are never read. Their
preprocessed segmentations, their raw labelsTr files and their foreground locations are all poisoned; each trainer
still trains, validates and writes its checkpoints."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import nnunet_semi.methods

METHODS = sorted({getattr(nnunet_semi.methods, n) for n in nnunet_semi.methods.__all__ if "_" not in n},
                 key=lambda c: c.__name__)


class _Short:
    """Two epochs of two steps, one validation step each, a checkpoint every epoch."""

    epochs, iterations_per_epoch, val_iterations_per_epoch, deploy_selection_epochs = 2, 2, 1, 2

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1


def _poison(env, cases: list[str]) -> None:
    preprocessed = env.preprocessed_dataset / "nnUNetPlans_3d_fullres"
    for case in cases:
        (preprocessed / f"{case}_seg.b2nd").write_bytes(b"poison")  # the preprocessed label
        (env.raw_dataset / "labelsTr" / f"{case}.nii.gz").write_bytes(b"poison")  # the raw label
        properties_file = preprocessed / f"{case}.pkl"
        properties = pickle.loads(properties_file.read_bytes())
        # where the label's foreground is: coordinates far outside the image, fatal if a sampler used them
        properties["class_locations"] = {1: np.full((4, 4), 10**6, dtype=np.int64)}
        properties_file.write_bytes(pickle.dumps(properties))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS, ids=lambda c: c.__name__)
def test_every_trainer_trains_validates_and_checkpoints_without_reading_unlabeled_labels(method, semi_dataset):
    split = json.loads((semi_dataset.preprocessed_dataset / "splits_final.json").read_text())[0]
    _poison(semi_dataset, split["unlabeled"])
    plans = json.loads((semi_dataset.preprocessed_dataset / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((semi_dataset.preprocessed_dataset / "dataset.json").read_text())
    cls = type(f"{method.__name__}Poisoned", (_Short, method), {})
    trainer = cls(plans | {"continue_training": False}, "3d_fullres", 0, dataset_json)
    trainer.run_training()  # training, validation and the checkpoints of every epoch
    assert set(split["unlabeled"]) <= set(trainer.unlabeled_pool.identifiers)
    # checkpoint_latest was written every epoch (nnU-Net removes it when training ends); best and final remain
    for name, epoch in (("checkpoint_best.pth", None), ("checkpoint_final.pth", 2)):
        checkpoint = torch.load(f"{trainer.output_folder}/{name}", weights_only=False)
        assert "semi_state" in checkpoint and epoch in (None, checkpoint["current_epoch"])
    losses = trainer.logger.get_value("train_losses", step=None)
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert len(trainer.logger.get_value("mean_fg_dice", step=None)) == 2  # validated every epoch
