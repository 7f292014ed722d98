"""Offline self-training: nnUNetv2_semi_pseudolabel (pseudo labels of a fold's unlabeled cases as a new nnU-Net
dataset, uncertain voxels as the ignore label, validation cases kept out, bad input refused without writing),
nnUNetv2_semi_selftrain (the recipe with nnU-Net's commands, resumed at every step) and selftrain in the benchmark."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import DATASET_ID, DATASET_NAME, bench_run
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
    derived_split, finetune_split = json.loads((strict / "splits_pseudolabel.json").read_text())
    assert derived_split["val"] == sorted(split["val"]) and set(split["train"]) < set(derived_split["train"])
    assert finetune_split == {"train": sorted(split["train"]), "val": sorted(split["val"])}  # labeled cases alone
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
    # a run killed while it wrote leaves its staging folder; the next run starts afresh and completes
    stale = semi_dataset.raw / ".Dataset994_Killed.incomplete"
    stale.mkdir()
    (stale / "half_written.nii.gz").write_bytes(b"")
    again = pseudolabel_dataset(DATASET_ID, "nnUNetTrainer", "3d_fullres", 994, "Killed", use_mirroring=False)
    assert not stale.exists() and not list((semi_dataset.raw / "Dataset994_Killed").rglob("half_written*"))
    verify_dataset_integrity(again["dataset"], num_processes=1)


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


def _commands(completed) -> list[str]:
    return [line for line in completed.stdout.splitlines() if line.startswith("$ ")]


@pytest.mark.slow
def test_selftrain_runs_the_recipe_with_nnunets_commands_and_resumes_at_every_step(semi_dataset):
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from nnunet_semi.trainer.discovery import trainer_dir

    support = Path(__file__).resolve().parents[1] / "support"
    env = dict(os.environ) | {"nnUNet_extTrainer": os.pathsep.join([trainer_dir(), str(support / "ext")]),
                              "PYTHONPATH": os.pathsep.join([str(support), os.environ.get("PYTHONPATH", "")]),
                              "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    command = ["nnUNetv2_semi_selftrain", "-d", str(DATASET_ID), "-tr", "nnUNetTrainerTiny", "--student",
               "nnUNetTrainerTiny", "--finetune", "nnUNetTrainerTinyFinetune", "--rounds", "2", "-o_id", "995",
               "-o_name", "Self", "-device", "cpu", "-np", "1", "--disable_tta", "--voxel_threshold", "0.5"]

    def run():
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        return completed

    first = run()
    rounds = ["Dataset995_Self_round1", "Dataset996_Self_round2"]
    tiny, finetuned = "nnUNetTrainerTiny__nnUNetPlans__3d_fullres", "nnUNetTrainerTinyFinetune__nnUNetPlans__3d_fullres"
    student_checkpoint = semi_dataset.results / rounds[0] / tiny / "fold_0" / "checkpoint_final.pth"
    warm_train = f"{sys.executable} -m nnunet_semi.tools.warm_train"  # nnUNetv2_train loading every layer
    steps = [f"$ nnUNetv2_train {DATASET_NAME} 3d_fullres 0 -tr nnUNetTrainerTiny",
             "$ nnUNetv2_extract_fingerprint -d 995",
             f"$ nnUNetv2_move_plans_between_datasets -s {DATASET_NAME} -t 995",
             "$ nnUNetv2_preprocess -d 995", "$ nnUNetv2_train 995 3d_fullres 0 -tr nnUNetTrainerTiny",
             f"$ {warm_train} 995 3d_fullres 1 -tr nnUNetTrainerTinyFinetune -p nnUNetPlans -device cpu "
             f"-pretrained_weights {student_checkpoint}",
             "$ nnUNetv2_extract_fingerprint -d 996", "$ nnUNetv2_preprocess -d 996",
             "$ nnUNetv2_train 996 3d_fullres 0 -tr nnUNetTrainerTiny",
             f"$ {warm_train} 996 3d_fullres 1 -tr nnUNetTrainerTinyFinetune"]
    printed = _commands(first)
    assert len(printed) == len(steps) + 1  # and round 2's plans move
    for step in steps:  # every step's command printed, in the recipe's order
        assert any(line.startswith(step) for line in printed), step
    positions = [next(i for i, line in enumerate(printed) if line.startswith(step)) for step in steps]
    assert positions == sorted(positions)
    log = (semi_dataset.results / DATASET_NAME / "selftrain_Self.log").read_text()
    assert "$ nnUNetv2_preprocess -d 996" in log
    # each fine-tuning began from its student, output layers included (nnU-Net's own loading skips them)
    assert log.count("Warm start: every layer of") == 2 and "Loading pretrained weights" not in log
    # the students have the teacher's plans (architecture and normalization) and trained on their split
    teacher_plans = json.loads((semi_dataset.preprocessed_dataset / "nnUNetPlans.json").read_text())
    for derived in rounds:
        verify_dataset_integrity(str(semi_dataset.raw / derived), num_processes=1)
        student_plans = json.loads((semi_dataset.preprocessed / derived / "nnUNetPlans.json").read_text())
        assert student_plans["configurations"] == teacher_plans["configurations"]
        assert student_plans["foreground_intensity_properties_per_channel"] == \
            teacher_plans["foreground_intensity_properties_per_channel"]
        split = json.loads((semi_dataset.preprocessed / derived / "splits_final.json").read_text())
        assert split == json.loads((semi_dataset.raw / derived / "splits_pseudolabel.json").read_text())
        for model, fold in ((tiny, 0), (finetuned, 1)):
            assert (semi_dataset.results / derived / model / f"fold_{fold}" / "checkpoint_final.pth").is_file()
    # round 2 pseudo-labeled with round 1's fine-tuned model
    provenance = json.loads((semi_dataset.raw / rounds[1] / "dataset.json").read_text())["semi_pseudolabel"]
    assert provenance["model"] == str(semi_dataset.results / rounds[0] / finetuned) and provenance["folds"] == [1]
    assert f"models of the rounds: {semi_dataset.results / rounds[0] / finetuned}, " \
           f"{semi_dataset.results / rounds[1] / finetuned}" in first.stdout

    # interrupted in round 2's student training: the same command resumes only that training
    student = semi_dataset.results / rounds[1] / tiny / "fold_0"
    (student / "checkpoint_final.pth").unlink()
    commands = _commands(run())
    assert len(commands) == 1 and commands[0].startswith("$ nnUNetv2_train 996 3d_fullres 0 -tr nnUNetTrainerTiny")
    assert "--c" in commands[0] and (student / "checkpoint_final.pth").is_file()
    # interrupted in round 2's preprocessing (the split file is written last): planning and preprocessing again
    (semi_dataset.preprocessed / rounds[1] / "splits_final.json").unlink()
    commands = _commands(run())
    assert [c.split()[1] for c in commands] == ["nnUNetv2_move_plans_between_datasets", "nnUNetv2_preprocess"]
    assert (semi_dataset.preprocessed / rounds[1] / "splits_final.json").is_file()
    # killed while pseudo-labeling round 2 (only its staging folder existed): round 2 is done again, round 1 kept
    for root in (semi_dataset.raw, semi_dataset.preprocessed, semi_dataset.results):
        shutil.rmtree(root / rounds[1])
    (semi_dataset.raw / f".{rounds[1]}.incomplete").mkdir()
    again = run()
    assert f"round 2: pseudo labels of {semi_dataset.results / rounds[0] / finetuned}" in again.stdout
    assert [c.split()[1:3] for c in _commands(again)] == [
        ["nnUNetv2_extract_fingerprint", "-d"], ["nnUNetv2_move_plans_between_datasets", "-s"],
        ["nnUNetv2_preprocess", "-d"], ["nnUNetv2_train", "996"], [sys.executable, "-m"]]
    verify_dataset_integrity(str(semi_dataset.raw / rounds[1]), num_processes=1)
    assert not (semi_dataset.raw / f".{rounds[1]}.incomplete").exists()


def test_selftrain_refuses_a_finetune_trainer_equal_to_the_student_before_running_anything(semi_dataset, capsys):
    from nnunet_semi.cli import selftrain_entry

    before = sorted(p.name for p in semi_dataset.results.iterdir())
    with pytest.raises(SystemExit) as info:
        selftrain_entry(["-d", str(DATASET_ID), "-tr", "nnUNetTrainer", "--finetune", "nnUNetTrainer", "-o_id", "995",
                         "-o_name", "Self", "-device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "--finetune nnUNetTrainer: the student's trainer" in error
    assert sorted(p.name for p in semi_dataset.results.iterdir()) == before


@pytest.mark.slow
def test_the_benchmark_scores_selftrain_like_a_trainer_and_counts_all_its_trainings(semi_dataset, monkeypatch,
                                                                                  capsys):
    import shutil

    from nnunet_semi.tools.benchmark.quality import QualitySettings, run_quality_benchmark
    from nnunet_semi.tools.benchmark.scoring import training_seconds

    monkeypatch.setenv("nnUNet_extTrainer", "")
    out = semi_dataset.results.parent / "bench"
    rows = run_quality_benchmark(QualitySettings(DATASET_ID, ["2"], ["selftrain"], 2, 3, str(out), selftrain_rounds=2))
    printed = capsys.readouterr().out
    by_trainer = {t: [r for r in rows if r["trainer"] == t] for t in ("nnUNetTrainer", "selftrain")}
    # scored on the same held-out cases as stock
    assert sorted(r["case"] for r in by_trainer["selftrain"]) == sorted(r["case"] for r in by_trainer["nnUNetTrainer"])
    assert by_trainer["selftrain"][0]["deployed"] == "student of round 2"
    # the teacher is the stock run; round 2 pseudo-labeled with round 1's student
    stock_run = bench_run(out, "nnUNetTrainer__bench_2lab_2x3")
    data = stock_run.rsplit("_", 1)[1]  # the hash of the run's data identity
    teacher = semi_dataset.results / DATASET_NAME / f"{stock_run}__nnUNetPlans__3d_fullres"
    derived = sorted(p.name for p in semi_dataset.raw.iterdir() if f"_selftrain_2lab_2x3_{data}_round" in p.name)
    assert [d.split("_", 1)[1] for d in derived] == [f"SemiSynthetic_selftrain_2lab_2x3_{data}_round{r}"
                                                     for r in (2, 1)]
    round1, round2 = sorted(derived, key=lambda d: d[-1])
    assert f"round 1, pseudo labels of {teacher} -> {round1}" in printed
    students = [semi_dataset.results / d / f"{stock_run}_selftrain_round{r}__nnUNetPlans__3d_fullres"
                for r, d in ((1, round1), (2, round2))]
    assert f"round 2, pseudo labels of {students[0]} -> {round2}" in printed
    # its cost: the teacher's and both students' epochs
    total = sum(training_seconds(str(folder / "fold_0")) for folder in (teacher, *students))
    assert float(by_trainer["selftrain"][0]["train_seconds"]) == pytest.approx(total, abs=0.2)
    assert float(by_trainer["nnUNetTrainer"][0]["train_seconds"]) < total
    md = (out / "results.md").read_text()
    assert "| 2 | selftrain | student of round 2 |" in md and "training min" in md

    # interrupted in round 2's student: the rerun finds the derived datasets and trains only that student again
    shutil.rmtree(out / "runs" / f"selftrain__bench_2lab_2x3_{data}_2rounds")
    (students[1] / "fold_0" / "checkpoint_final.pth").unlink()
    again = run_quality_benchmark(QualitySettings(DATASET_ID, ["2"], ["selftrain"], 2, 3, str(out), selftrain_rounds=2))
    printed = capsys.readouterr().out
    assert "pseudo labels of" not in printed and f"{stock_run}: scored earlier" in printed
    assert (students[1] / "fold_0" / "checkpoint_final.pth").is_file()
    assert sorted(p.name for p in semi_dataset.raw.iterdir() if "_selftrain_" in p.name) == derived
    assert len(again) == len(rows)


@pytest.mark.parametrize("option", ["-tr", "--student", "--finetune"])
def test_selftrain_refuses_a_trainer_nnunet_cannot_find_before_writing_anything(semi_dataset, capsys, option,
                                                                                monkeypatch):
    from nnunet_semi.cli import selftrain_entry

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    trainers = {"-tr": "nnUNetTrainer", "--student": "nnUNetTrainer", "--finetune": "nnUNetTrainer_50epochs"}
    trainers[option] = "nnUNetTrainerMeanTeacher"  # a plugin trainer, but nnUNet_extTrainer is not set
    before = sorted(p.name for p in semi_dataset.results.iterdir())
    with pytest.raises(SystemExit) as info:
        selftrain_entry(["-d", str(DATASET_ID), *[a for o, t in trainers.items() for a in (o, t)], "-o_id", "995",
                         "-o_name", "Self", "-device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert info.value.code == 2 and error.startswith(f"nnUNetv2_semi_selftrain: error: {option} "
                                                     f"nnUNetTrainerMeanTeacher: nnUNetv2_train finds no such trainer")
    assert sorted(p.name for p in semi_dataset.results.iterdir()) == before
