"""nnUNetv2_semi_export refuses what it cannot export, without writing anything."""

from __future__ import annotations

import pytest

from nnunet_semi.cli import export_entry
from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.export import export_vanilla


def test_export_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(SemiInputError, match="not a trained nnU-Net model folder"):
        export_vanilla(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "plans.json").write_text("{}")
    (tmp_path / "fold_0").mkdir()
    with pytest.raises(SemiInputError, match="no checkpoint_final.pth or checkpoint_best.pth"):
        export_vanilla(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_command_names_the_missing_model(nnunet_env, capsys):
    with pytest.raises(SystemExit) as info:
        export_entry(["-d", "Dataset990_X", "-c", "3d_fullres", "-tr", "nnUNetTrainerMeanTeacher", "-o", "x"])
    assert info.value.code == 2
    assert "nnUNetTrainerMeanTeacher__nnUNetPlans__3d_fullres is not a trained" in capsys.readouterr().err
