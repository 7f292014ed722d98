"""nnUNetv2_semi_pseudolabel: a trained model's pseudo labels of a fold's unlabeled cases as a new nnU-Net dataset,
uncertain voxels as the ignore label, the fold's validation cases kept out, bad input refused without writing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import DATASET_ID, DATASET_NAME
from nnunet_semi.cli import pseudolabel_entry
from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.self_training import pseudo_label, pseudolabel_dataset


def _train_stock_fold_0(env):
    """Stock nnUNetTrainer, fold 0, 1 epoch of 2 iterations on the tiny network: a barely trained, uncertain model."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = json.loads((env.preprocessed_dataset / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    dataset_json = json.loads((env.preprocessed_dataset / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
    trainer.run_training()


def _label(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_pseudo_label_keeps_the_certain_argmax_and_ignores_the_rest():
    probabilities = np.array([[0.95, 0.6, 0.1, 0.5], [0.05, 0.4, 0.9, 0.5]])[:, None]  # (C=2, 1, 4)
    labels, confidence, ignored = pseudo_label(probabilities, 0.9, ignore_label=2)
    assert labels.tolist() == [[0, 2, 1, 2]] and ignored == 0.5
    assert confidence == pytest.approx(0.9)  # mean max probability over the one voxel predicted foreground
    hard, _, none_ignored = pseudo_label(probabilities, 0.9, ignore_label=None)
    assert hard.tolist() == [[0, 0, 1, 0]] and none_ignored == 0.0


def test_nnunets_loss_skips_the_ignore_label_the_pseudo_labels_carry():
    """The student is stock nnU-Net on the derived dataset: its Dice + CE takes no gradient from ignored voxels."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=2, dice_class=MemoryEfficientSoftDiceLoss)
    target = torch.randint(0, 2, (2, 1, 6, 6, 6)).float()
    target[:, :, :3] = 2  # half of every case ignored
    logits = torch.randn(2, 2, 6, 6, 6, requires_grad=True)
    loss(logits, target).backward()
    assert logits.grad[:, :, :3].abs().sum() == 0 and logits.grad[:, :, 3:].abs().sum() > 0


@pytest.mark.slow
def test_pseudolabel_writes_a_valid_dataset_without_the_validation_cases(semi_dataset, monkeypatch, capsys):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    monkeypatch.setenv("nnUNet_extTrainer", "")
    _train_stock_fold_0(semi_dataset)
    split = json.loads((semi_dataset.preprocessed_dataset / "splits_final.json").read_text())[0]

    pseudolabel_entry(["-d", str(DATASET_ID), "-tr", "nnUNetTrainer", "-o_id", "991", "-o_name", "Strict",
                       "--voxel_threshold", "0.99", "-device", "cpu", "-np", "1", "--disable_tta"])
    strict = semi_dataset.raw / "Dataset991_Strict"
    printed = capsys.readouterr().out
    assert "Dataset991_Strict" in printed and "pseudo-labeled cases added, 0 left out" in printed
    loose = pseudolabel_dataset(DATASET_ID, "nnUNetTrainer", "3d_fullres", 992, "Loose", voxel_threshold=0.0,
                                use_mirroring=False)
    verify_dataset_integrity(str(strict), num_processes=1)
    verify_dataset_integrity(loose["dataset"], num_processes=1)

    dataset_json = json.loads((strict / "dataset.json").read_text())
    ignore = dataset_json["labels"]["ignore"]
    assert ignore == 2 and LabelManager(dataset_json["labels"], None).ignore_label == 2
    rows = list(csv.DictReader(open(strict / "pseudolabel_cases.csv")))
    unlabeled = set(split["unlabeled"]) | {p.name.removesuffix("_0000.nii.gz")
                                           for p in (semi_dataset.raw_dataset / "imagesUnlabeled").iterdir()}
    assert {r["case"] for r in rows} == unlabeled and not unlabeled & set(split["val"])
    derived_split = json.loads((strict / "splits_pseudolabel.json").read_text())[0]
    assert derived_split["val"] == sorted(split["val"]) and set(split["train"]) < set(derived_split["train"])
    for case in split["train"] + split["val"]:  # labeled and validation cases unchanged
        np.testing.assert_array_equal(_label(strict / "labelsTr" / f"{case}.nii.gz"),
                                      _label(semi_dataset.raw_dataset / "labelsTr" / f"{case}.nii.gz"))
    for row in rows:  # the strict threshold ignores the uncertain voxels, where the loose one keeps the argmax
        strict_label = _label(strict / "labelsTr" / f"{row['case']}.nii.gz")
        loose_label = _label(f"{loose['dataset']}/labelsTr/{row['case']}.nii.gz")
        assert (loose_label != ignore).all()
        certain = strict_label != ignore
        np.testing.assert_array_equal(strict_label[certain], loose_label[certain])
        assert float(row["ignored_fraction"]) == pytest.approx(1 - certain.mean(), abs=1e-4)
    assert sum(float(r["ignored_fraction"]) for r in rows) > 0  # a barely trained model is uncertain somewhere

    # an id in use is refused before anything is written
    with pytest.raises(SemiInputError, match="Dataset991_Strict exists"):
        pseudolabel_dataset(DATASET_ID, "nnUNetTrainer", "3d_fullres", 991, "Again")
    assert not list(semi_dataset.raw.glob("*Again*"))
    # a case threshold no case reaches leaves no dataset behind
    with pytest.raises(SemiInputError, match="no case reaches it"):
        pseudolabel_dataset(DATASET_ID, "nnUNetTrainer", "3d_fullres", 993, "None", case_threshold=1.0,
                            use_mirroring=False)
    assert not list(semi_dataset.raw.glob("*Dataset993*"))


@pytest.mark.parametrize("argv, message", [
    (["--voxel_threshold", "1.5"], "--voxel_threshold 1.5: give a probability in \\[0, 1\\]"),
    (["--case_threshold", "-0.1"], "--case_threshold -0.1: give a probability in \\[0, 1\\]"),
    (["-o_name", "bad name"], "use letters, digits"),
    ([], "no trained model in .*nnUNetTrainer__nnUNetPlans__3d_fullres"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(semi_dataset, capsys, argv, message):
    import re

    before = sorted(p.name for p in semi_dataset.raw.iterdir())
    with pytest.raises(SystemExit) as info:
        pseudolabel_entry(["-d", str(DATASET_ID), "-tr", "nnUNetTrainer", "-o_id", "991", "-o_name", "X",
                           "-device", "cpu", *argv])
    error = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(error.splitlines()) == 1 and error.startswith("nnUNetv2_semi_pseudolabel")
    assert re.search(message, error), error
    assert sorted(p.name for p in semi_dataset.raw.iterdir()) == before
    assert DATASET_NAME in before


@pytest.mark.slow
def test_selftrain_runs_the_recipe_with_nnunets_commands_and_resumes_where_it_stopped(semi_dataset):
    import os
    import subprocess
    from pathlib import Path

    from nnunet_semi.trainer.discovery import trainer_dir

    support = Path(__file__).resolve().parents[1] / "support"
    env = dict(os.environ) | {"nnUNet_extTrainer": os.pathsep.join([trainer_dir(), str(support / "ext")]),
                              "PYTHONPATH": os.pathsep.join([str(support), os.environ.get("PYTHONPATH", "")]),
                              "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    command = ["nnUNetv2_semi_selftrain", "-d", str(DATASET_ID), "-tr", "nnUNetTrainerTiny", "--student",
               "nnUNetTrainerTiny", "-o_id", "995", "-o_name", "Self", "-device", "cpu", "-np", "1",
               "--disable_tta", "--voxel_threshold", "0.5"]
    first = subprocess.run(command, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    derived = "Dataset995_Self_round1"
    for step in (f"$ nnUNetv2_train {DATASET_NAME} 3d_fullres 0 -tr nnUNetTrainerTiny",
                 "$ nnUNetv2_extract_fingerprint -d 995",
                 "$ nnUNetv2_move_plans_between_datasets -s Dataset990_SemiSynthetic -t 995",
                 "$ nnUNetv2_preprocess -d 995", "$ nnUNetv2_train 995 3d_fullres 0 -tr nnUNetTrainerTiny"):
        assert step in first.stdout, step  # every step's command printed
    log = (semi_dataset.results / DATASET_NAME / "selftrain_Self.log").read_text()
    assert "$ nnUNetv2_preprocess -d 995" in log
    # the student has the teacher's plans (architecture and normalization) and trained on its split
    teacher_plans = json.loads((semi_dataset.preprocessed_dataset / "nnUNetPlans.json").read_text())
    student_plans = json.loads((semi_dataset.preprocessed / derived / "nnUNetPlans.json").read_text())
    assert student_plans["configurations"] == teacher_plans["configurations"]
    assert student_plans["foreground_intensity_properties_per_channel"] == \
        teacher_plans["foreground_intensity_properties_per_channel"]
    split = json.loads((semi_dataset.preprocessed / derived / "splits_final.json").read_text())
    assert split == json.loads((semi_dataset.raw / derived / "splits_pseudolabel.json").read_text())
    student = semi_dataset.results / derived / "nnUNetTrainerTiny__nnUNetPlans__3d_fullres" / "fold_0"
    assert (student / "checkpoint_final.pth").is_file()

    # interrupted before the student finished: the same command runs only the student's training again
    (student / "checkpoint_final.pth").unlink()
    again = subprocess.run(command, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    commands = [line for line in again.stdout.splitlines() if line.startswith("$ ")]
    assert len(commands) == 1 and commands[0].startswith("$ nnUNetv2_train 995 3d_fullres 0 -tr nnUNetTrainerTiny")
    assert "--c" in commands[0] and (student / "checkpoint_final.pth").is_file()
