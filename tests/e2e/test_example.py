"""nnUNetv2_semi_example: the generated example goes through planning, unlabeled preprocessing and the split."""

from __future__ import annotations

import json

import pytest

from nnunet_semi.cli import example_entry as main
from nnunet_semi.tools.example import EXAMPLE_DATASET_ID


@pytest.mark.slow
def test_example_sets_up_a_trainable_dataset(tmp_path, monkeypatch, capsys):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    main(["--out", str(tmp_path / "demo"), "-np", "1"])
    preprocessed = tmp_path / "demo" / "nnUNet_preprocessed" / f"Dataset{EXAMPLE_DATASET_ID}_SemiExample"
    assert len(list((preprocessed / "nnUNetPlans_3d_fullres").glob("*.pkl"))) == 12
    assert len(list((preprocessed / "nnUNetPlans_3d_fullres_unlabeled").glob("*.pkl"))) == 12
    fold0 = json.loads((preprocessed / "splits_final.json").read_text())[0]
    assert len(fold0["train"]) == 4 and len(fold0["unlabeled"]) == 12 - 4 - len(fold0["val"])
    out = capsys.readouterr().out
    assert f"nnUNetv2_train {EXAMPLE_DATASET_ID} 3d_fullres 0 -tr nnUNetTrainerMeanTeacher" in out
    assert "export nnUNet_extTrainer=" in out
