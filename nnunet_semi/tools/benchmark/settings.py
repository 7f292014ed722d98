"""The settings of one quality command (``QualitySettings``) and one planned run (``Run``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from os.path import isdir

import torch

from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.benchmark.scoring import require_medpy


@dataclass
class QualitySettings:
    """Everything one quality command is told.

    Attributes:
        dataset: a planned and preprocessed dataset (its ``imagesUnlabeled``, if any, preprocessed too).
        num_labeled: labeled counts as strings: integers, or ``"all"`` (stock nnU-Net on the full split).
        trainers: semi-supervised trainer names; stock ``nnUNetTrainer`` is always the baseline. ``selftrain`` is
            offline self-training (``selftrain_run``), ``selftrain_rounds`` rounds.
        epochs, iterations: the schedule, identical for every trainer (``val_iterations``: default iterations / 5).
        out_dir: results, records and predictions; a run whose ``runs/<run>/scores.csv`` is there is done.
        test_labels: the labels of ``imagesTs``: its cases are then scored as the headline, the fold's validation
            cases (development cases) apart; None: the development cases alone.
        order, seed: how the labeled subset is drawn; ``seed`` also seeds every run (repeat k: seed + k).
        num_val: hold out the last ``num_val`` training cases as the one validation fold (``make_labeled_split``).
        repeats: runs of the baseline (stock; in the warm-start mode the control), seeds seed, seed + 1, ...
        method_repeats: runs of every other trainer: its own seed spread.
        rampup_iterations: one unsupervised ramp in steps for every method (None: each method's own); run_suffix:
            appended to the methods' run names for it (stock has no ramp).
        warm_start: every trainer and ``nnUNetTrainer_warmStart`` (the control, ``repeats`` seeds) continue stock's
            first run from scratch; a dual method's peer starts from the run its ``peer_labeled_only_trainer``
            names, a method with a ``warm_start_trainer`` from that trainer's run.
        predict_test: also predict ``imagesTs`` without labels, packed per run.
        score_members: also score every model a run's checkpoint holds (its trainer's ``member_weights``).
        checkpoint_every: epochs between ``checkpoint_latest.pth`` writes (None: nnU-Net's).
        extra_columns: constant columns added to every row (e.g. the coarse mode's spacing).
        jobs: runs of one labeled count trained side by side in worker processes on the device.
        stop_training_at: a ``time.time()`` after which runs still training are stopped (left to resume);
            stop_at: no prediction or scoring starts after it.
        verbose: nnU-Net's output on this console; else in ``out_dir/logs/<run>.txt`` and a progress display
            (``progress_stream``: where).
        stop_on_failure: a failed run stops the command; else it is reported, the others go on, and
            ``SemiRunsFailed`` lists the failures at the end.
        on_results_written: called after every rewrite of the tables (e.g. to copy them off the machine).
    """

    dataset: int | str
    num_labeled: list[str]
    trainers: list[str]
    epochs: int
    iterations: int
    out_dir: str
    configuration: str = "3d_fullres"
    fold: int = 0
    plans: str = "nnUNetPlans"
    test_labels: str | None = None
    order: str = "first"
    seed: int = 12345
    val_iterations: int | None = None
    device: torch.device | None = None
    num_val: int | None = None
    repeats: int = 1
    method_repeats: int = 1
    rampup_iterations: int | None = None
    run_suffix: str = ""
    warm_start: bool = False
    predict_test: bool = False
    score_members: bool = False
    checkpoint_every: int | None = None
    extra_columns: dict = field(default_factory=dict)
    jobs: int = 1
    stop_training_at: float | None = None
    stop_at: float | None = None
    selftrain_rounds: int = 1
    verbose: bool = False
    stop_on_failure: bool = False
    progress_stream: object = None
    on_results_written: Callable[[], None] | None = None

    def check(self) -> None:
        """The options that need no data, each a one-line ``SemiInputError``."""
        require_medpy()  # before hours of training, not at the first score
        if self.test_labels is not None and not isdir(self.test_labels):
            raise SemiInputError(f"--test_labels {self.test_labels} is not a folder.")
        if self.repeats < 1 or self.method_repeats < 1:
            raise SemiInputError(f"--repeats {self.repeats} --method_repeats {self.method_repeats}: give at least 1 "
                                 f"each.")
        if self.jobs < 1:
            raise SemiInputError(f"--jobs {self.jobs}: give at least 1 (1 trains one run after the other).")
        if self.selftrain_rounds < 1:
            raise SemiInputError(f"--selftrain_rounds {self.selftrain_rounds}: give at least 1.")
        if self.num_val is not None and self.fold != 0:
            raise SemiInputError(f"-f {self.fold} with --num_val: the held-out split has one fold, 0.")


@dataclass
class Run:
    """One planned run: a trainer, its repeat and its ``with_schedule`` arguments (the last: its warm start)."""

    trainer: str
    repeat: int
    schedule: tuple
    count: str

    @property
    def warm(self) -> tuple | None:
        return self.schedule[-1]
