"""nnUNetv2_semi_split: labeled subsets in splits_final.json, recoverable, and read by stock nnU-Net as the baseline."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import DATASET_ID
from nnunet_semi.cli import split_entry
from nnunet_semi.data.splits import make_labeled_split, restore_original_split
from nnunet_semi.errors import SemiInputError


def _read(path):
    return json.loads(path.read_text())


def _write_ten_case_split(env):
    """A split over 10 ids, as a user may have written it by hand (order within folds not sorted)."""
    ids = [f"case_{i:03d}" for i in range(10)]
    splits = [{"train": ids[:k] + ids[k + 2:][::-1], "val": ids[k:k + 2]} for k in range(0, 10, 2)]
    (env.preprocessed_dataset / "splits_final.json").write_text(json.dumps(splits))
    return splits


def test_first_order_keeps_val_and_moves_the_rest_to_unlabeled(planned_dataset):
    original = _write_ten_case_split(planned_dataset)
    splits = make_labeled_split(DATASET_ID, 3, order="first")
    written = _read(planned_dataset.preprocessed_dataset / "splits_final.json")
    assert written == splits and len(written) == 5
    for fold, before in zip(written, original):
        assert fold["val"] == before["val"]
        assert fold["train"] == sorted(before["train"])[:3]
        assert sorted(fold["train"] + fold["unlabeled"]) == sorted(before["train"])
        assert not set(fold["unlabeled"]) & set(fold["val"])
    assert written[0]["train"] == ["case_002", "case_003", "case_004"]
    # the full split is kept verbatim
    assert _read(planned_dataset.preprocessed_dataset / "splits_final.original.json") == original


def test_resplitting_starts_from_the_original_and_restore_undoes_it(planned_dataset):
    original = _write_ten_case_split(planned_dataset)
    make_labeled_split(DATASET_ID, 2)
    again = make_labeled_split(DATASET_ID, 6)
    assert all(len(f["train"]) == 6 and len(f["unlabeled"]) == 2 for f in again)
    restore_original_split(DATASET_ID)
    assert _read(planned_dataset.preprocessed_dataset / "splits_final.json") == original


def test_random_order_is_seeded(planned_dataset):
    _write_ten_case_split(planned_dataset)
    a = make_labeled_split(DATASET_ID, 3, order="random", seed=7)
    b = make_labeled_split(DATASET_ID, 3, order="random", seed=7)
    c = make_labeled_split(DATASET_ID, 3, order="random", seed=8)
    assert a == b and a != c
    assert all(f["train"] == sorted(f["train"]) for f in a)


def test_without_split_file_uses_nnunets_default_split(planned_dataset):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits = make_labeled_split(DATASET_ID, 2)
    default = generate_crossval_split([f"case_{i:03d}" for i in range(6)], seed=12345, n_splits=5)
    assert [f["val"] for f in splits] == [f["val"] for f in default]
    assert _read(planned_dataset.preprocessed_dataset / "splits_final.original.json") == default


def test_lost_original_is_rebuilt_from_the_unlabeled_key(planned_dataset):
    _write_ten_case_split(planned_dataset)
    make_labeled_split(DATASET_ID, 2)
    (planned_dataset.preprocessed_dataset / "splits_final.original.json").unlink()
    splits = make_labeled_split(DATASET_ID, 5)
    assert all(len(f["train"]) == 5 and len(f["unlabeled"]) == 3 for f in splits)


@pytest.mark.parametrize("num_labeled, message", [(0, "--num_labeled 0 is out of range"),
                                                  (9, "--num_labeled 9 is out of range: .* at most 8")])
def test_num_labeled_out_of_range(planned_dataset, num_labeled, message):
    _write_ten_case_split(planned_dataset)
    split_file = planned_dataset.preprocessed_dataset / "splits_final.json"
    before = split_file.read_text()
    with pytest.raises(SemiInputError, match=message):
        make_labeled_split(DATASET_ID, num_labeled)
    assert split_file.read_text() == before
    assert not (planned_dataset.preprocessed_dataset / "splits_final.original.json").exists()


def test_command_line(planned_dataset, capsys):
    _write_ten_case_split(planned_dataset)
    split_entry(["-d", str(DATASET_ID), "--num_labeled", "4"])
    assert "fold 0: 4 labeled, 4 unlabeled, 2 val" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        split_entry(["-d", str(DATASET_ID), "--num_labeled", "-1"])
    assert info.value.code == 2
    assert "error: --num_labeled -1 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        split_entry(["-d", "997", "--num_labeled", "1"])
    assert "dataset '997' was found neither" in capsys.readouterr().err


def test_stock_nnunet_trainer_trains_on_the_labeled_cases_only(planned_dataset):
    """The labeled-only baseline: stock nnUNetTrainer reads `train` and ignores `unlabeled`."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    splits = make_labeled_split(DATASET_ID, 2)
    plans = _read(planned_dataset.preprocessed_dataset / "nnUNetPlans.json") | {"continue_training": False}
    dataset_json = _read(planned_dataset.preprocessed_dataset / "dataset.json")
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    tr_keys, val_keys = trainer.do_split()
    assert list(tr_keys) == splits[0]["train"] and list(val_keys) == splits[0]["val"]
