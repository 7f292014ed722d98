"""Labeled subsets as data: ``splits_final.json`` with an ``unlabeled`` key per fold (``nnUNetv2_semi_split``).

For each fold, ``train`` keeps the labeled cases only, ``val`` is unchanged, and ``unlabeled`` holds the fold's other
training cases, whose labels the semi-supervised trainers never read. Stock nnU-Net ignores the extra key, so
``nnUNetv2_train ... -tr nnUNetTrainer`` on the same file is the labeled-only baseline on the identical split.

The split the subset was drawn from is kept as ``splits_final.original.json`` (written once, never overwritten), so
re-running with another ``--num_labeled`` always starts from the full split and ``restore_original_split`` undoes it.
"""

from __future__ import annotations

import os
from os.path import isfile, join

import numpy as np
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_semi.data.dataset_io import (
    labeled_case_ids,
    load_json,
    require_env_folder,
    resolve_dataset_name,
    save_json_atomic,
)
from nnunet_semi.errors import SemiInputError

SPLITS_FILE = "splits_final.json"
ORIGINAL_SPLITS_FILE = "splits_final.original.json"
UNLABELED_KEY = "unlabeled"
ORDERS = ("first", "random")


def select_labeled(train_cases: list[str], num_labeled: int, order: str, rng: np.random.RandomState) -> list[str]:
    """The labeled subset of one fold's training cases, sorted.

    Args:
        train_cases: the fold's training case ids.
        num_labeled: how many to keep labeled (1 … len(train_cases)).
        order: ``"first"``: the first ``num_labeled`` in sorted order (the papers' protocol on LA);
            ``"random"``: a uniform draw from ``rng``.
        rng: random state used by ``"random"``.
    """
    ordered = sorted(train_cases)
    if order == "first":
        return ordered[:num_labeled]
    if order == "random":
        return sorted(ordered[i] for i in rng.choice(len(ordered), num_labeled, replace=False))
    raise SemiInputError(f"order {order!r} is not one of {ORDERS}.")


def full_splits(preprocessed_dataset_folder: str, raw_dataset_folder: str) -> list[dict]:
    """The split to draw labeled subsets from: the saved original, else the current file, else nnU-Net's default.

    A current file that already carries ``unlabeled`` keys (with the original lost) is folded back: train = train +
    unlabeled. Without any file, the split is the one nnU-Net's trainer would create (5-fold, seed 12345, sorted ids).
    """
    original = join(preprocessed_dataset_folder, ORIGINAL_SPLITS_FILE)
    current = join(preprocessed_dataset_folder, SPLITS_FILE)
    if isfile(original):
        return load_json(original)
    if isfile(current):
        return [_fold_back(fold) for fold in load_json(current)]
    dataset_json = load_json(join(raw_dataset_folder, "dataset.json"))
    cases = labeled_case_ids(raw_dataset_folder, dataset_json)
    if len(cases) < 5:
        raise SemiInputError(
            f"{len(cases)} training case(s) is too few for nnU-Net's 5-fold split. Write {current} yourself "
            f"(a list of {{'train': [...], 'val': [...]}}) and run the command again."
        )
    return generate_crossval_split(cases, seed=12345, n_splits=5)


def _fold_back(fold: dict) -> dict:
    """A fold as it was before a labeled subset was drawn from it (unchanged if none was)."""
    if UNLABELED_KEY not in fold:
        return fold
    rest = {k: v for k, v in fold.items() if k != UNLABELED_KEY}
    return rest | {"train": sorted(fold["train"] + fold[UNLABELED_KEY])}


def holdout_split(splits: list[dict], num_val: int) -> list[dict]:
    """One fold that validates on the last ``num_val`` cases in sorted order and trains on the others (LA: the
    papers' training list with its tail held out). ``splits``: a cross-validation, whose every fold covers all
    cases."""
    ordered = sorted(splits[0]["train"] + splits[0]["val"])
    return [{"train": ordered[:-num_val], "val": ordered[-num_val:]}]


def check_held_out_size(num_cases: int, num_labeled: int, num_val: int, dataset_name: str,
                        option: str | None = None) -> None:
    """A one-line error unless ``num_val`` cases can be held out with ``num_labeled`` labeled and at least one
    unlabeled training case left; ``option`` names the value in it (default ``--num_val N``)."""
    if not 1 <= num_val <= num_cases - num_labeled - 1:
        option = option or f"--num_val {num_val}"
        raise SemiInputError(
            f"{option} is out of range for {dataset_name}: with {num_cases} labeled cases and "
            f"--num_labeled {num_labeled} it must be at least 1 and at most {num_cases - num_labeled - 1} (at "
            f"least one training case must stay unlabeled).")


def make_labeled_split(dataset_name_or_id: int | str, num_labeled: int, order: str = "first",
                       seed: int = 12345, num_val: int | None = None, write_to: str | None = None) -> list[dict]:
    """Rewrite ``splits_final.json`` so that every fold trains on ``num_labeled`` labeled cases.

    Args:
        dataset_name_or_id: dataset id or name.
        num_labeled: labeled cases per fold, 1 … the smallest fold's training-case count.
        order: ``"first"`` or ``"random"`` (see ``select_labeled``).
        seed: seed of the ``"random"`` draw (fold k uses ``seed + k``).
        num_val: instead of the saved (or nnU-Net's 5-fold) split, one fold (fold 0) that holds out the last
            ``num_val`` training cases in sorted order for validation; the saved original split is kept as it is.
        write_to: a folder whose ``splits_final.json`` gets the split instead of the dataset's (the benchmark's own
            copy of the preprocessed folder): the dataset's files are then only read.

    Returns:
        The splits written: a list of ``{"train", "val", "unlabeled"}`` dicts.
    """
    if order not in ORDERS:
        raise SemiInputError(f"--order {order!r} is not one of {', '.join(ORDERS)}.")
    dataset_name = resolve_dataset_name(dataset_name_or_id)
    preprocessed = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    raw = join(require_env_folder("nnUNet_raw"), dataset_name)
    if not os.path.isdir(preprocessed):
        raise SemiInputError(
            f"{preprocessed} does not exist. Run nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} first.")
    source = full_splits(preprocessed, raw)
    original_source = source
    if num_val is not None:
        check_held_out_size(len(source[0]["train"]) + len(source[0]["val"]), num_labeled, num_val, dataset_name)
        source = holdout_split(source, num_val)
    smallest = min(len(fold["train"]) for fold in source)
    if not 1 <= num_labeled <= smallest:
        raise SemiInputError(
            f"--num_labeled {num_labeled} is out of range: it must be at least 1 and at most {smallest}, the number "
            f"of training cases in the smallest fold of {join(preprocessed, SPLITS_FILE)}."
        )
    splits = []
    for k, fold in enumerate(source):
        labeled = select_labeled(fold["train"], num_labeled, order, np.random.RandomState(seed + k))
        unlabeled = sorted(set(fold["train"]) - set(labeled))
        splits.append({**fold, "train": labeled, "val": list(fold["val"]), UNLABELED_KEY: unlabeled})
    if write_to is not None:
        save_json_atomic(splits, join(write_to, SPLITS_FILE))
        return splits
    original = join(preprocessed, ORIGINAL_SPLITS_FILE)
    if not isfile(original):
        save_json_atomic(original_source, original)
    save_json_atomic(splits, join(preprocessed, SPLITS_FILE))
    return splits


def restore_original_split(dataset_name_or_id: int | str) -> list[dict]:
    """Put the full split saved by ``make_labeled_split`` back into ``splits_final.json``."""
    dataset_name = resolve_dataset_name(dataset_name_or_id)
    preprocessed = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    original = join(preprocessed, ORIGINAL_SPLITS_FILE)
    if not isfile(original):
        raise SemiInputError(f"{original} not found: nnUNetv2_semi_split never rewrote this dataset's split.")
    splits = load_json(original)
    save_json_atomic(splits, join(preprocessed, SPLITS_FILE))
    return splits
