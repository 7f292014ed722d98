"""What a benchmark run leaves in its result folder (``runs/<run>/``: scores, member scores, logs, curves) and
reading it back: the finished runs of a folder, the earlier runs a command's tables keep."""

from __future__ import annotations

import csv
import glob
import os
import shutil
from os.path import basename, dirname, isdir, isfile, join

import numpy as np

from nnunet_semi.tools.benchmark.common import BASELINE_TRAINER, CONTROL_TRAINER, SELFTRAIN
from nnunet_semi.tools.benchmark.scoring import final_checkpoint
from nnunet_semi.tools.benchmark.training import fold_folder

# what must agree for two runs' numbers to be compared at all
PROTOCOL = ("dataset", "fold", "evaluated_on", "num_val")


# what makes two runs of the same trainer different experiments, never averaged together
SCHEDULE = ("plans", "configuration", "epochs", "iterations_per_epoch")


# in runs/<run>/: the scores of every model the run holds (--score_members), EMA pairs' and dual networks'
EMA_PAIR_SCORES, DUAL_MEMBER_SCORES = "ema_pair_scores.csv", "member_scores.csv"


def write_csv(rows: list[dict], filename: str) -> None:
    """All rows, columns in first-seen order; through a temporary file, so a killed run leaves no partial file."""
    fieldnames = list(dict.fromkeys(k for r in rows for k in r))
    tmp = f"{filename}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, filename)


def read_csv(filename: str) -> list[dict]:
    with open(filename, newline="") as f:
        return list(csv.DictReader(f))


def as_written(rows: list[dict]) -> list[dict]:
    """Rows as ``read_csv`` gives them back (every value a string), so fresh and earlier runs compare alike."""
    return [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]


def scored_runs(out_dir: str) -> list[dict]:
    """The finished runs of a quality result folder, by run name: ``{"run", "rows", "pairs"}`` with the rows of
    ``runs/<run>/scores.csv`` and its ``score_members`` rows; runs without scores (unfinished) are left out."""
    runs = []
    for scores_file in sorted(glob.glob(join(out_dir, "runs", "*", "scores.csv"))):
        rows = read_csv(scores_file)
        if rows:
            runs.append({"run": basename(dirname(scores_file)), "rows": rows,
                         "pairs": read_member_scores(dirname(scores_file))})
    return runs


def earlier_runs(out_dir: str, own_runs: set[str], like: dict, ramp: str) -> tuple[list[dict], list[dict], list[str]]:
    """The scored runs in ``out_dir/runs`` that this command did not plan (``own_runs``: run names), so that its
    tables keep the rows of earlier commands, e.g. of a cell run one trainer at a time.

    Only runs comparable with ``like`` (a row of this command) are merged: the same split protocol (``PROTOCOL``)
    and schedule (``SCHEDULE``), and for the semi-supervised trainers the command's unsupervised ramp ``ramp`` (the
    ``rampup_iterations`` column: "" for each method's own). Returns their rows, their ``score_members`` rows and
    the names of the runs left out, which ``nnUNetv2_semi_benchmark report`` merges with their schedule or ramp
    shown."""
    rows, pairs, left_out = [], [], []
    for run in scored_runs(out_dir):
        if run["run"] in own_runs:
            continue
        first = run["rows"][0]
        has_ramp = first["trainer"] not in (BASELINE_TRAINER, CONTROL_TRAINER, SELFTRAIN)
        if any(str(first.get(k, "")) != str(like.get(k, "")) for k in PROTOCOL + SCHEDULE) or \
                (has_ramp and str(first.get("rampup_iterations", "")) != ramp):
            left_out.append(run["run"])
            continue
        rows += run["rows"]
        pairs += run["pairs"]
    return rows, pairs, left_out


def read_member_scores(run_dir: str) -> list[dict]:
    """The ``score_members`` rows a finished run left in ``run_dir`` (none if it was not scored so)."""
    return [row for name in (EMA_PAIR_SCORES, DUAL_MEMBER_SCORES) if isfile(join(run_dir, name))
            for row in read_csv(join(run_dir, name))]


def _copy_logs(output_folder: str, destination: str) -> None:
    """The run's training logs, progress plots and debug.json (small)."""
    for name in sorted(os.listdir(output_folder)):
        if name.startswith("training_log") or name in ("progress.png", "progress_semi.png", "debug.json"):
            shutil.copy2(join(output_folder, name), join(destination, name))


def keep_run_record(output_folder: str, run_dir: str) -> None:
    """Copy the run's training logs and progress plots (small) next to its scores, and write ``curves.csv``: every
    per-epoch value nnU-Net's logger kept (losses, pseudo Dice, learning rate, the semi-supervised terms and
    statistics), one row per epoch, from the final checkpoint."""
    _copy_logs(output_folder, run_dir)
    logged = final_checkpoint(output_folder)["logging"]
    scalars = {k: v for k, v in logged.items() if v and all(np.isscalar(x) for x in v)}
    epochs = min(len(v) for v in scalars.values())
    write_csv([{"epoch": e} | {k: float(v[e]) for k, v in scalars.items()} for e in range(epochs)],
               join(run_dir, "curves.csv"))


def keep_unfinished_record(trainer_cls: type, plans: dict, configuration: str, fold: int, dataset_json: dict,
                            out_dir: str) -> None:
    """A run stopped by the deadline: its training logs and progress plots so far, in ``unfinished/<run>/``."""
    output_folder = fold_folder(trainer_cls, plans, configuration, fold)
    record = join(out_dir, "unfinished", trainer_cls.__name__)
    os.makedirs(record, exist_ok=True)
    if isdir(output_folder):
        _copy_logs(output_folder, record)
    print(f"{trainer_cls.__name__}: unfinished; its logs so far are in {record}")


def _run_of_checkpoint(checkpoint: str | None) -> str:
    """The run name (``<Trainer>__<tag>``) of a run's ``.../<run>__<plans>__<configuration>/fold_k/checkpoint``."""
    return "" if checkpoint is None else basename(dirname(dirname(checkpoint))).rsplit("__", 2)[0]


def warm_start_columns(warm: tuple | None) -> dict:
    """A row's start: the runs whose checkpoints it warm-started from (empty: from scratch)."""
    start, peer = warm if warm is not None else (None, None)
    return {"warm_start_from": _run_of_checkpoint(start), "peer_warm_start_from": _run_of_checkpoint(peer)}
