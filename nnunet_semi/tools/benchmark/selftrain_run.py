"""``selftrain`` in the benchmark's trainer list: offline self-training scored like every trainer."""

from __future__ import annotations

import os
import time
from os.path import isfile, join

import torch

from nnunet_semi.data.dataset_io import require_env_folder
from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.benchmark.common import (
    BASELINE_TRAINER,
    CONTROL_TRAINER,
    SELFTRAIN,
    load_plans_and_dataset_json,
    resolve_trainer,
    with_schedule,
)
from nnunet_semi.tools.benchmark.records import as_written, keep_run_record, read_csv, warm_start_columns, write_csv
from nnunet_semi.tools.benchmark.scoring import announcer, pack_test_predictions, predict, score_run, training_seconds
from nnunet_semi.tools.benchmark.training import fold_folder, watched_train
from nnunet_semi.tools.progress import CommandProgress, captured_output


def _derived_dataset_id(name: str) -> int:
    """The id of ``Dataset<id>_<name>`` if an earlier run made or began it (resume), else the highest id that no
    dataset uses in nnUNet_raw, nnUNet_preprocessed or nnUNet_results."""
    import re

    roots = [require_env_folder(v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")]
    used = set()
    for root in roots:
        for entry in os.listdir(root):
            match = re.fullmatch(r"\.?Dataset(\d{3})_(.+?)(\.incomplete)?", entry)
            if match:
                if match.group(2) == name:  # made or begun earlier (a begun one is staged afresh)
                    return int(match.group(1))
                used.add(int(match.group(1)))
    free = [i for i in range(999, 0, -1) if i not in used]
    if not free:
        raise SemiInputError("selftrain: every nnU-Net dataset id 1-999 is in use; free one for the derived dataset.")
    return free[0]


def selftrain_run_name(tag: str, rounds: int, warm: bool = False) -> str:
    return f"{SELFTRAIN}__{tag}{'_warm' if warm else ''}_{rounds}round{'s' if rounds > 1 else ''}"


def self_training_run(dataset_name: str, count: str, teacher_schedule: tuple, rounds: int, plans: dict,
                       plans_identifier: str, configuration: str, fold: int, dataset_json: dict, cases: dict,
                       labels: list[int], out_dir: str, raw: str, device: torch.device, predict_test: bool,
                       stop_at: float | None, columns: dict, progress: CommandProgress, index: dict,
                       log: str | None, warm: bool = False, splits_file: str | None = None,
                       development_cases: dict | None = None) -> list[dict]:
    """``selftrain`` in the trainer list: offline self-training scored like every trainer.

    The teacher is this count's first stock run (trained here if its checkpoint is not on this machine). Each round
    pseudo-labels the fold's unlabeled cases with the previous model into a derived dataset (``pseudolabel_dataset``
    with its defaults: voxels below 0.9 ensemble probability ignored, every case kept), plans and preprocesses it
    with the source's plans (``prepare_student_dataset``) and trains stock nnU-Net on it with the same schedule and
    seed. The last student predicts the same held-out cases; ``train_seconds`` is the teacher's plus every
    student's. Resumable at every step; the derived datasets stay in nnUNet_raw/_preprocessed/_results (named
    ``<source>_selftrain_<count>lab_<epochs>x<iterations>_round<r>``, a free id chosen). Its output goes to ``log``
    (None: this console), its students' epochs to ``progress``. ``warm``: every student is
    ``nnUNetTrainer_warmStart`` started from the teacher's checkpoint (the warm-start mode's form)."""
    from nnunet_semi.tools.self_training import prepare_student_dataset, pseudolabel_dataset, run_logged

    epochs, iterations, val_iterations, tag, _, seed, checkpoint_every, _ = teacher_schedule
    run_name = selftrain_run_name(tag, rounds, warm)
    run_dir = join(out_dir, "runs", run_name)
    scores_file, archive = join(run_dir, "scores.csv"), join(run_dir, "test_predictions.tar.gz")
    if isfile(scores_file) and (not predict_test or isfile(archive)):
        print(f"{run_name}: scored earlier ({scores_file}), skipping")
        for r in range(1, rounds + 1):
            progress.skip(index[(SELFTRAIN, count, r)])
        return read_csv(scores_file)
    if stop_at is not None and time.time() >= stop_at:
        print(f"deadline: {run_name} not started; run the same command again to train it")
        return []
    if log:
        progress.message(f"{run_name}: nnU-Net's output goes to {log}")
    stock = resolve_trainer(BASELINE_TRAINER)
    teacher_cls = with_schedule(stock, *teacher_schedule)
    with captured_output(log):
        teacher_folder = fold_folder(teacher_cls, plans, configuration, fold)  # trained with the count's runs
        if not isfile(join(teacher_folder, "checkpoint_final.pth")):
            raise RuntimeError(f"its teacher, {teacher_cls.__name__} (stock nnU-Net's first run), did not finish "
                               f"training")
        seconds = training_seconds(teacher_folder)
        os.makedirs(run_dir, exist_ok=True)
        commands_log = join(run_dir, "selftrain_commands.log")
        source = dataset_name.split("_", 1)[1]
        model_folder, model_folds, model_cls = os.path.dirname(teacher_folder), (fold,), teacher_cls
        for round_index in range(1, rounds + 1):
            name = f"{source}_selftrain_{tag.removeprefix('bench_')}_round{round_index}"
            derived_id = _derived_dataset_id(name)
            derived = f"Dataset{derived_id:03d}_{name}"
            if not isfile(join(require_env_folder("nnUNet_raw"), derived, "dataset.json")):
                progress.message(f"{run_name}: round {round_index}, pseudo labels of {model_folder} -> {derived}")
                pseudolabel_dataset(dataset_name, BASELINE_TRAINER, configuration, derived_id, name,
                                    plans=plans_identifier, fold=fold, folds=model_folds, device=device.type,
                                    num_processes=1, model_folder=model_folder, trainer_class=model_cls,
                                    splits_file=splits_file)
            prepare_student_dataset(dataset_name, derived_id, plans_identifier, configuration, 1,
                                    lambda command: run_logged(command, commands_log))
            student_plans, student_json = load_plans_and_dataset_json(
                join(require_env_folder("nnUNet_preprocessed"), derived), plans_identifier)
            start = (join(teacher_folder, "checkpoint_final.pth"), None) if warm else None
            student_cls = with_schedule(resolve_trainer(CONTROL_TRAINER) if warm else stock, epochs, iterations,
                                        val_iterations, f"{tag}_selftrain_round{round_index}{'_warm' if warm else ''}",
                                        None, seed, checkpoint_every, start)
            student_folder = watched_train(student_cls, student_plans, configuration, 0, student_json, device,
                                            progress, index[(SELFTRAIN, count, round_index)])
            seconds += training_seconds(student_folder)
            model_folder, model_folds, model_cls = os.path.dirname(student_folder), (0,), student_cls
        predictions = join(out_dir, "predictions", run_name)
        predict(student_cls, student_folder, student_plans, configuration, student_json, cases, predictions,
                 device, announce=announcer(progress, index[(SELFTRAIN, count, rounds)], "scored cases"))
        common = {"trainer": SELFTRAIN, "num_labeled": count, "repeat": 0, "deployed": f"student of round {rounds}",
                  "dataset": dataset_name, "configuration": configuration, "plans": plans_identifier, "fold": fold,
                  "epochs": epochs, "iterations_per_epoch": iterations, "seed": seed, "selftrain_rounds": rounds,
                  **warm_start_columns((join(teacher_folder, "checkpoint_final.pth"), None) if warm else None),
                  **columns, "train_seconds": round(seconds, 1)}
        run_rows = as_written(score_run(cases, predictions, dataset_json, labels, common))
        if development_cases:
            development = f"{predictions}__development"
            predict(student_cls, student_folder, student_plans, configuration, student_json, development_cases,
                     development, device)
            run_rows += as_written(score_run(development_cases, development, dataset_json, labels,
                                               common | {"case_set": "development"}))
        keep_run_record(student_folder, run_dir)
        if predict_test:
            pack_test_predictions(student_cls, student_folder, student_plans, configuration, student_json, raw,
                                   join(out_dir, "test_predictions", run_name), archive, device, progress,
                                   index[(SELFTRAIN, count, rounds)])
        write_csv(run_rows, scores_file)  # last: its presence means the run is complete
    return run_rows
