"""nnUNetv2_semi_demo end to end on a tiny schedule: both trainers run through nnU-Net's commands and are scored."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from nnunet_semi.cli import demo_entry as main
from nnunet_semi.tools.demo import DEMO_DATASET, DEMO_PLANS, run_demo

SUPPORT = Path(__file__).resolve().parents[1] / "support"


@pytest.mark.slow
def test_demo_trains_predicts_and_scores_both_trainers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", str(SUPPORT / "ext"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # 0 breaks nnU-Net's planner (torch.set_num_threads(0))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    out = tmp_path / "demo"
    results = run_demo(str(out), baseline_trainer="nnUNetTrainerTiny", semi_trainer="nnUNetTrainerMeanTeacherTiny",
                       case_shape=(24, 24, 24), num_processes=1)
    assert set(results) == {"nnUNetTrainerTiny", "nnUNetTrainerMeanTeacherTiny"}
    for scores in results.values():
        assert len(scores) == 10 and all(0.0 <= s <= 1.0 and math.isfinite(s) for s in scores.values())
    saved = json.loads((out / "demo_results.json").read_text())
    assert saved["per_case"] == results
    summary = saved["summary"]
    difference = [results["nnUNetTrainerMeanTeacherTiny"][c] - results["nnUNetTrainerTiny"][c] for c in results[
        "nnUNetTrainerTiny"]]
    assert summary["difference"]["mean"] == pytest.approx(np.mean(difference))
    assert summary["difference"]["better"] + summary["difference"]["worse"] <= 10
    assert summary["nnUNetTrainerTiny"]["mean"] == pytest.approx(np.mean(list(results["nnUNetTrainerTiny"].values())))
    assert (out / "demo_results.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Test Dice (4 labeled cases" in printed and "nnUNetTrainerMeanTeacherTiny" in printed
    # the progress display, one plain line per epoch (stdout is no terminal here), nnU-Net's output in the logs
    for position, trainer in enumerate(results, start=1):
        assert f"run {position}/2 {trainer}, 4 labeled | epoch 2/2 | last epoch " in printed
        log = out / f"demo_log_{trainer}.txt"
        assert f"(nnU-Net's output: {log})" in printed and "Epoch time" in log.read_text()
    assert "Epoch time" not in printed and "\r" not in printed
    # both trained on the reduced demo plans, the same split
    for trainer in results:
        assert (out / "nnUNet_results" / DEMO_DATASET / f"{trainer}__{DEMO_PLANS}__3d_fullres" / "fold_0" /
                "checkpoint_final.pth").is_file()

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # one error line, as every command
        main(["--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert info.value.code == 2 and error.startswith("nnUNetv2_semi_demo: error: ")
    assert "exists from an earlier run" in error and len(error.splitlines()) == 1
