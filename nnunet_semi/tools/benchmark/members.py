"""Every model a run's checkpoint holds, scored on the same cases (``--score_members``); what the models are, the
run's trainer says (``member_weights``)."""

from __future__ import annotations

from os.path import isfile, join

import torch

from nnunet_semi.tools.benchmark.records import (
    DUAL_MEMBER_SCORES,
    EMA_PAIR_SCORES,
    as_written,
    read_member_scores,
    write_csv,
)
from nnunet_semi.tools.benchmark.scoring import METRICS, announcer, final_checkpoint, predict, score_run
from nnunet_semi.tools.benchmark.training import fold_folder
from nnunet_semi.tools.progress import CommandProgress


def score_members(trainer_cls: type, run_row: dict, run_dir: str, cases: dict, out_dir: str, plans: dict,
                   configuration: str, dataset_json: dict, labels: list[int], device: torch.device,
                   progress: CommandProgress | None = None, position: int | None = None) -> list[dict]:
    """Every model one run's checkpoint holds, each scored on the held-out cases (rows with ``scored_model``): the
    student and the EMA teacher (``runs/<run>/ema_pair_scores.csv``), or a dual network's two networks and, where
    it deploys one, their ensemble (``member_scores.csv``). From the file when it exists, else from the run's
    checkpoint if it is still there; the deployed model's predictions are the run's own, not predicted twice."""
    scored = read_member_scores(run_dir)
    if scored:
        return scored
    output_folder = fold_folder(trainer_cls, plans, configuration, int(run_row["fold"]))
    if not isfile(join(output_folder, "checkpoint_final.pth")):
        return []
    members = trainer_cls.member_weights(final_checkpoint(output_folder)) \
        if hasattr(trainer_cls, "member_weights") else {}  # the trainer says what it holds; stock: one network
    scores_file = join(run_dir, EMA_PAIR_SCORES if "teacher" in members else DUAL_MEMBER_SCORES)
    rows = []
    deployed_predictions = join(out_dir, "predictions", trainer_cls.__name__)
    for member, weights in members.items():
        predictions = join(out_dir, "predictions", f"{trainer_cls.__name__}__{member}")
        if member == run_row["deployed"] and all(
                isfile(join(deployed_predictions, case + dataset_json["file_ending"])) for case in cases):
            predictions = deployed_predictions  # the run's own predictions are this member's: not predicted twice
        else:
            predict(trainer_cls, output_folder, plans, configuration, dataset_json, cases, predictions, device,
                     weights, announce=announcer(progress, position, f"scored cases with the run's {member}"))
        common = {k: v for k, v in run_row.items() if k not in ("case", "class", *METRICS)} | {"scored_model": member}
        rows += as_written(score_run(cases, predictions, dataset_json, labels, common))
    if rows:
        write_csv(rows, scores_file)
    return rows
