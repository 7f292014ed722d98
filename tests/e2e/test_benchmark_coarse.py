"""The coarse real-data mode of the quality benchmark: spacing choice, held-out split, paired statistics, and one
tiny end-to-end run through ``nnUNetv2_semi_benchmark quality --coarse`` with stock repeats and packed test
predictions."""

from __future__ import annotations

import csv
import json
import math
import shutil
import tarfile

import numpy as np
import pytest
from scipy.stats import wilcoxon

from helpers import DATASET_ID, bench_run
from nnunet_semi.cli import benchmark_entry as main
from nnunet_semi.data.splits import make_labeled_split
from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.benchmark.coarse import (
    COARSE_PLANS,
    check_spacing_leaves_a_patch,
    coarse_features,
    coarse_spacing_factor,
    median_shape_at,
)
from nnunet_semi.tools.benchmark.statistics import paired_comparison


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_paired_comparison_by_hand():
    baseline = {"a": 80.0, "b": 70.0, "c": 90.0, "d": 60.0, "e": 75.0, "only_baseline": 10.0}
    method = {"a": 82.0, "b": 69.0, "c": 95.0, "d": 63.0, "e": math.nan, "only_method": 99.0}
    result = paired_comparison(method, baseline)
    diffs = np.array([2.0, -1.0, 5.0, 3.0])  # e is NaN, the unpaired keys are ignored
    assert result["n"] == 4 and result["wins"] == 3 and result["losses"] == 1 and result["ties"] == 0
    assert result["mean"] == pytest.approx(2.25) and result["median"] == pytest.approx(2.5)
    assert result["p_wilcoxon"] == pytest.approx(wilcoxon(diffs).pvalue)
    assert diffs.min() <= result["ci_low"] < result["mean"] < result["ci_high"] <= diffs.max()
    assert paired_comparison(method, baseline) == result  # the bootstrap is seeded
    same = paired_comparison(baseline, baseline)
    assert same["mean"] == 0 and same["ties"] == 6 and same["p_wilcoxon"] == 1.0
    assert paired_comparison({"a": 1.0}, {"b": 1.0})["n"] == 0


def test_coarse_spacing_keeps_the_median_case_within_the_voxel_budget():
    # three 100 x 200 x 200 cases at 3 x 1 x 1 mm (anisotropic): 8 M voxels at the planner's spacing
    fingerprint = {"spacings": [[3.0, 1.0, 1.0]] * 3, "shapes_after_crop": [[100, 200, 200]] * 3}
    fullres = np.array([3.0, 1.0, 1.0])
    factor = coarse_spacing_factor(fullres, fingerprint, 50_000)
    assert factor % 0.25 == 0 and factor > 1
    assert np.prod(median_shape_at(fullres * factor, fingerprint)) <= 50_000
    assert np.prod(median_shape_at(fullres * (factor - 0.25), fingerprint)) > 50_000  # the smallest such step
    # a dataset already small enough is not coarsened
    assert coarse_spacing_factor(fullres, {"spacings": [[3.0, 1, 1]], "shapes_after_crop": [[20, 40, 40]]},
                                 50_000) == 1.0
    assert coarse_features(4) == (16, 32, 64, 128) and coarse_features(6) == (16, 32, 64, 128, 128, 128)


def test_a_spacing_that_leaves_no_patch_is_refused():
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]], "shapes_after_crop": [[40, 40, 40]]}
    with pytest.raises(SemiInputError, match=r"--coarse_spacing 8 leaves no patch: the median case would be 5x5x5"):
        check_spacing_leaves_a_patch(np.array([8.0] * 3), fingerprint, "--coarse_spacing 8")


def test_held_out_split_validates_on_the_last_cases(planned_dataset):
    split = make_labeled_split(DATASET_ID, 2, num_val=2)
    cases = [f"case_{i:03d}" for i in range(6)]
    assert len(split) == 1
    assert split[0]["val"] == cases[4:] and split[0]["train"] == cases[:2] and split[0]["unlabeled"] == cases[2:4]
    # the 5-fold split it replaced is kept as the original
    original = json.loads((planned_dataset.preprocessed_dataset / "splits_final.original.json").read_text())
    assert len(original) == 5
    with pytest.raises(SemiInputError, match=r"--num_val 4 is out of range .* at most 3"):
        make_labeled_split(DATASET_ID, 2, num_val=4)


@pytest.mark.parametrize("option, message", [
    (["--num_val", "5"], "--num_val 5 is out of range for Dataset990_SemiSynthetic: with 6 labeled cases"),
    ([], "--num_val 16 (the --coarse default) is out of range"),
    (["--num_val", "2", "--coarse_voxels", "100"], "--coarse_voxels 100 leaves no patch"),
    (["--num_val", "2", "--coarse_spacing", "5"], "--coarse_spacing 5 leaves no patch"),
    (["--num_val", "2", "--repeats", "0"], "--repeats 0"),
])
def test_bad_coarse_options_get_one_line_errors(planned_dataset, capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["quality", "-d", str(DATASET_ID), "--coarse", "--num_labeled", "2", "-o",
              str(planned_dataset.results / "bench"), *option])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after nnU-Net's own progress bars, if it planned
    assert error.startswith("nnUNetv2_semi_benchmark: error: ") and message in error


@pytest.mark.slow
def test_coarse_quality_end_to_end(planned_dataset, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    out = planned_dataset.results / "bench"
    argv = ["quality", "-d", str(DATASET_ID), "--coarse", "--coarse_voxels", "4096", "--num_labeled", "2",
            "--num_val", "2", "--epochs", "2", "--iterations", "2", "--repeats", "2",
            "-tr", "nnUNetTrainerMeanTeacher", "-o", str(out)]
    main(argv)
    printed = capsys.readouterr().out
    assert "unsupervised ramp over 2 iterations" in printed  # 40 % of 2 x 2
    assert "  nnUNetTrainerMeanTeacher: sigmoid ramp over 2 iterations for consistency\n" in printed

    plans = json.loads((planned_dataset.preprocessed_dataset / f"{COARSE_PLANS}.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    assert list(plans["configurations"]) == ["3d_fullres"]
    assert np.prod(configuration["patch_size"]) <= 4096 and min(configuration["spacing"]) > 1.0
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"][0] == 16
    native = json.loads((planned_dataset.preprocessed_dataset / "nnUNetPlans.json").read_text())
    assert native["configurations"]["3d_fullres"]["spacing"] == [1.0, 1.0, 1.0]  # the dataset's plans untouched

    rows = _rows(out / "results.csv")
    runs = {(r["trainer"], r["repeat"]) for r in rows}
    assert runs == {("nnUNetTrainer", "0"), ("nnUNetTrainer", "1"), ("nnUNetTrainerMeanTeacher", "0")}
    assert len(rows) == 3 * 2 and {r["case"] for r in rows} == {"case_004", "case_005"}
    assert {r["deployed"] for r in rows if r["trainer"] == "nnUNetTrainer"} == {"network"}
    assert {r["deployed"] for r in rows if r["trainer"] != "nnUNetTrainer"} == {"student"}  # declared, not chosen
    assert {r["rampup_iterations"] for r in rows} == {"2"} and {r["seed"] for r in rows} == {"12345", "12346"}
    assert {r["plans"] for r in rows} == {COARSE_PLANS} and rows[0]["patch_size"] and rows[0]["spacing_mm"]
    md = (out / "results.md").read_text()
    assert "| 2 | nnUNetTrainer (repeat 1) | 2 |" in md and "| 2 | nnUNetTrainerMeanTeacher | 2 |" in md

    run = out / "runs" / bench_run(out, "nnUNetTrainerMeanTeacher__bench_2lab_2x2")
    log = next(run.glob("training_log*.txt")).read_text()
    assert "sigmoid ramp over 2 iterations for" in log and (run / "progress.png").is_file()
    curves = _rows(run / "curves.csv")
    assert [c["epoch"] for c in curves] == ["0", "1"]
    assert all(math.isfinite(float(c[k])) for c in curves for k in ("train_losses", "mean_fg_dice", "lrs"))
    assert "semi_loss_consistency" in curves[0] and "semi_teacher_dice" in curves[0]
    with tarfile.open(run / "test_predictions.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["test_000.nii.gz", "test_001.nii.gz"]

    # finished runs come from their scores, even without the trained models
    shutil.rmtree(planned_dataset.results / "Dataset990_SemiSynthetic")
    main(argv)
    assert capsys.readouterr().out.count("scored earlier") == 3
    assert _rows(out / "results.csv") == rows


@pytest.mark.slow
def test_ema_pair_scores_student_and_teacher(semi_dataset, monkeypatch):
    """--score_members scores both members of a mean-teacher checkpoint: the deployed one from the run's own
    predictions (not predicted twice), the other predicted with its weights; both members' rows are written and
    tabulated."""
    from nnunet_semi.methods import nnUNetTrainerMeanTeacher
    from nnunet_semi.tools.benchmark.quality import QualitySettings, run_quality_benchmark
    from nnunet_semi.tools.benchmark.scoring import final_checkpoint

    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    out = semi_dataset.results / "bench"
    rows = run_quality_benchmark(QualitySettings(DATASET_ID, ["2"], ["nnUNetTrainerMeanTeacher"], 2, 3, str(out),
                                 score_members=True))
    pair = _rows(out / "ema_pair.csv")
    assert {r["scored_model"] for r in pair} == {"student", "teacher"} and len(pair) == 2 * len(
        [r for r in rows if r["trainer"] == "nnUNetTrainerMeanTeacher"])
    deployed = pair[0]["deployed"]
    main_dice = {r["case"]: r["dice"] for r in rows if r["trainer"] == "nnUNetTrainerMeanTeacher"}
    assert {r["case"]: r["dice"] for r in pair if r["scored_model"] == deployed} == main_dice
    other = "teacher" if deployed == "student" else "student"
    predicted = {p.name for p in (out / "predictions").iterdir()}
    run = bench_run(out, "nnUNetTrainerMeanTeacher__bench_2lab_2x3")
    assert f"{run}__{other}" in predicted and f"{run}__{deployed}" not in predicted
    assert {r["case"]: r["dice"] for r in pair if r["scored_model"] == other} != main_dice
    folder = next((semi_dataset.results / "Dataset990_SemiSynthetic").glob("nnUNetTrainerMeanTeacher__*")) / "fold_0"
    weights = nnUNetTrainerMeanTeacher.member_weights(final_checkpoint(str(folder)))
    assert set(weights) == {"student", "teacher"}
    assert any(not (weights["student"][k] == weights["teacher"][k]).all() for k in weights["student"])
    assert "Teacher against student of the same run" in (out / "results.md").read_text()


@pytest.mark.slow
def test_score_members_scores_each_network_of_a_dual_run(semi_dataset, monkeypatch):
    """--score_members on DualCCE: network 1, the peer and their ensemble predicted through the run's deployable
    model and scored; the deployed one is the run's own predictions; a table against the deployed model."""
    from nnunet_semi.tools.benchmark.quality import QualitySettings, run_quality_benchmark

    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    out = semi_dataset.results / "bench_dual"
    rows = run_quality_benchmark(QualitySettings(DATASET_ID, ["2"], ["nnUNetTrainerDualCCE"], 2, 3, str(out),
                                                 score_members=True))
    members = _rows(out / "dual_members.csv")
    dual = [r for r in rows if r["trainer"] == "nnUNetTrainerDualCCE"]
    assert {r["scored_model"] for r in members} == {"student", "peer", "ensemble"}
    assert len(members) == 3 * len(dual) and not (out / "ema_pair.csv").exists()
    deployed = dual[0]["deployed"]
    assert {r["case"]: r["dice"] for r in members if r["scored_model"] == deployed} == \
        {r["case"]: r["dice"] for r in dual}
    predicted = {p.name for p in (out / "predictions").iterdir()}
    run = bench_run(out, "nnUNetTrainerDualCCE__bench_2lab_2x3")
    for model in {"student", "peer", "ensemble"} - {deployed}:  # predicted with that model alone, every case
        assert f"{run}__{model}" in predicted
        assert len(list((out / "predictions" / f"{run}__{model}").glob("*.nii.gz"))) == len(dual)
    member_scores = out / "runs" / run / "member_scores.csv"
    assert member_scores.is_file()
    assert "Each network of a dual-network run against the model it deploys" in (out / "results.md").read_text()
    # a run scored before --score_members existed: the same command scores its members from the checkpoint
    member_scores.unlink()
    shutil.rmtree(out / "predictions" / f"{run}__peer")
    run_quality_benchmark(QualitySettings(DATASET_ID, ["2"], ["nnUNetTrainerDualCCE"], 2, 3, str(out),
                                          score_members=True))
    assert _rows(member_scores) == [r for r in members if r["trainer"] == "nnUNetTrainerDualCCE"]

    # the peer's labeled-only baseline: a stock trainer, paired against stock like a method, no members to score
    rows = run_quality_benchmark(QualitySettings(DATASET_ID, ["2"], ["nnUNetTrainer_DualCCEPeer"], 2, 3, str(out),
                                 score_members=True))
    control = [r for r in rows if r["trainer"] == "nnUNetTrainer_DualCCEPeer"]
    assert control and {r["deployed"] for r in control} == {"network"}
    peer_run = bench_run(out, "nnUNetTrainer_DualCCEPeer__bench_2lab_2x3")
    assert not any(p.name.startswith("nnUNetTrainer_DualCCEPeer") for p in (out / "predictions").iterdir()
                   if p.name != peer_run)
    assert not (out / "runs" / peer_run / "member_scores.csv").exists()
    md = (out / "results.md").read_text()
    assert "| 2 | nnUNetTrainer_DualCCEPeer | network |" in md and "| 2 | nnUNetTrainer_DualCCEPeer | 2 |" in md
    assert "| 2 | nnUNetTrainerDualCCE |" in md  # the earlier command's run is kept in the tables


@pytest.mark.slow
def test_progress_lines_per_epoch_logs_per_run_and_a_failed_run_reported_while_the_others_go_on(semi_dataset):
    """The command as a user runs it, stdout not a terminal: one plain line per epoch, nnU-Net's output in a log per
    run, a failed run's error and log path reported, the other runs scored, the failures listed, exit code 1."""
    import os
    import re
    import subprocess
    from pathlib import Path

    from nnunet_semi.trainer.discovery import trainer_dir

    support = Path(__file__).resolve().parents[1] / "support"
    env = dict(os.environ) | {"nnUNet_extTrainer": os.pathsep.join([trainer_dir(), str(support / "ext")]),
                              "PYTHONPATH": os.pathsep.join([str(support), os.environ.get("PYTHONPATH", "")]),
                              "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    out = semi_dataset.results.parent / "bench"
    completed = subprocess.run(
        ["nnUNetv2_semi_benchmark", "quality", "-d", str(DATASET_ID), "--num_labeled", "2", "--epochs", "2",
         "--iterations", "3", "-o", str(out), "-tr", "nnUNetTrainerBroken", "nnUNetTrainerMeanTeacher"],
        env=env, capture_output=True, text=True)
    printed = completed.stdout
    assert completed.returncode == 1, printed[-3000:] + completed.stderr[-3000:]
    assert not re.search(r"[\r\x1b]", printed)
    for run, label in ((1, "nnUNetTrainer"), (3, "nnUNetTrainerMeanTeacher")):
        for epoch in (1, 2):
            assert f"run {run}/3 {label}, 2 labeled | epoch {epoch}/2 | last epoch " in printed, (run, epoch)
    assert "all runs' training left" in printed
    assert "run 3/3 nnUNetTrainerMeanTeacher, 2 labeled | predicting 2 development cases, about " in printed
    logs = out / "logs"
    stock = bench_run(out, "nnUNetTrainer__bench_2lab_2x3")
    broken = stock.replace("nnUNetTrainer__", "nnUNetTrainerBroken__")  # the same data, the same hash
    stock_log = (logs / f"{stock}.txt").read_text()
    assert f"{stock}: nnU-Net's output goes to {logs / f'{stock}.txt'}" in printed
    assert "Epoch 1" in stock_log and "Epoch time" in stock_log and "Epoch time" not in printed
    broken_log = logs / f"{broken}.txt"
    assert "broken on purpose" in broken_log.read_text()  # its traceback
    # trained in a worker process (it reads the benchmark's own split): its exit reported with its log's last lines
    report = printed.split(f"{broken}: FAILED: RuntimeError: training exited with code 1")[1]
    assert report.split("\n")[1] == f"last lines of {broken_log}:" and "broken on purpose" in report
    assert "1 run(s) failed:" in completed.stderr and str(broken_log) in completed.stderr
    # the others went on and were scored
    assert {r["trainer"] for r in _rows(out / "results.csv")} == {"nnUNetTrainer", "nnUNetTrainerMeanTeacher"}
