"""CPU smoke tests of nnUNetv2_semi_benchmark quality and speed (--tiny): files, columns, finite numbers."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from helpers import bench_run
from nnunet_semi.cli import benchmark_entry as main
from nnunet_semi.tools.benchmark.common import semi_trainers
from nnunet_semi.tools.benchmark.scoring import case_metrics


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_case_metrics_by_hand():
    reference = np.zeros((10, 10, 10), np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    prediction = np.zeros_like(reference)
    prediction[3:7, 2:6, 2:6] = 1  # shifted by one voxel along the first axis
    metrics = case_metrics(prediction, reference, (2.0, 1.0, 1.0), 1)
    assert metrics["dice"] == pytest.approx(0.75) and metrics["jaccard"] == pytest.approx(0.6)
    # the shift is 1 voxel = 2 mm along the first axis
    assert metrics["hd95_vox"] == pytest.approx(1.0) and metrics["hd95_mm"] == pytest.approx(2.0)
    empty = case_metrics(np.zeros_like(reference), reference, (1.0, 1.0, 1.0), 1)
    assert empty["dice"] == 0.0 and math.isnan(empty["hd95_mm"])
    assert case_metrics(np.zeros_like(reference), np.zeros_like(reference), (1, 1, 1), 1)["dice"] == 1.0


def test_default_trainers_are_every_registered_method():
    assert set(semi_trainers()) == {"nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS", "nnUNetTrainerSGRS",
                                    "nnUNetTrainerDualCCE", "nnUNetTrainerCIFP", "nnUNetTrainerNPCal",
                                    "nnUNetTrainerBCP"}


@pytest.mark.slow
def test_quality_tiny(tmp_path, monkeypatch, capsys):
    import json

    from nnunet_semi.tools.benchmark.common import make_tiny_dataset

    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    # the user's own split of the dataset: the benchmark trains on its own copy and leaves this file as it is
    raw = make_tiny_dataset(str(tmp_path / "tiny_dataset"))
    user_split = tmp_path / "tiny_dataset" / "nnUNet_preprocessed" / "Dataset994_SemiTiny" / "splits_final.json"
    cases = sorted(p.name[:-len(".nii.gz")] for p in (tmp_path / "tiny_dataset" / "nnUNet_raw" /
                                                      "Dataset994_SemiTiny" / "labelsTr").iterdir())
    user_split.write_text(json.dumps([{"train": cases[:6], "val": cases[6:]}]) + "\n")
    before = user_split.read_bytes()
    main(["quality", "--tiny", "-o", str(tmp_path), "-tr", "nnUNetTrainerMeanTeacher"])
    assert user_split.read_bytes() == before and raw
    assert not (user_split.parent / "splits_final.original.json").exists()
    every_row = _rows(tmp_path / "results.csv")
    rows = [r for r in every_row if r["case_set"] == "test"]  # --tiny scores imagesTs with its labels
    assert {(r["trainer"], r["num_labeled"]) for r in rows} == {
        ("nnUNetTrainer", "2"), ("nnUNetTrainerMeanTeacher", "2"), ("nnUNetTrainer", "all")}
    assert len(rows) == 3 * 4  # 4 test cases x 1 foreground class
    # the fold's validation cases are scored too, apart, as development cases
    development = [r for r in every_row if r["case_set"] == "development"]
    assert development and not {r["case"] for r in development} & {r["case"] for r in rows}
    assert {r["trainer"] for r in development} == {"nnUNetTrainer", "nnUNetTrainerMeanTeacher"}
    for column in ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox", "commit", "device", "seed",
                   "epochs", "iterations_per_epoch", "case", "class"):
        assert column in rows[0]
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert all(math.isfinite(float(r["hd95_mm"])) for r in rows if float(r["dice"]) > 0)
    # a run's identity: in its name (the data's hash), its rows and a recorded file
    split_hash = {r["split"] for r in rows if r["num_labeled"] == "2"}
    assert len(split_hash) == 1 and {r["order"] for r in rows} == {"first"} and all(r["test_labels"] for r in rows)
    mean_teacher_run, = (tmp_path / "runs").glob("nnUNetTrainerMeanTeacher__bench_2lab_2x4_*")
    stock_run, = (tmp_path / "runs").glob("nnUNetTrainer__bench_2lab_2x4_*")
    assert mean_teacher_run.name.rsplit("_", 1)[1] == stock_run.name.rsplit("_", 1)[1]  # the same data's hash
    identity = json.loads((mean_teacher_run / "semi_benchmark_identity.json").read_text())
    assert identity["split"]["train"] == ["case_000", "case_001"] and identity["seed"] == 12345
    md = (tmp_path / "results.md").read_text()
    assert "| 2 | nnUNetTrainerMeanTeacher |" in md and "| all | nnUNetTrainer |" in md
    headline, development_section = md.split("## Development cases")
    assert "**Test cases** (4: test_000 … test_003" in headline and "| 2 | nnUNetTrainerMeanTeacher |" in \
        development_section
    assert (tmp_path / "results.png").stat().st_size > 0
    # finished runs are skipped on a second call
    main(["quality", "--tiny", "-o", str(tmp_path), "-tr", "nnUNetTrainerMeanTeacher"])
    assert capsys.readouterr().out.count("scored earlier") == 3
    # a cell run one trainer at a time: a later command's tables keep the earlier command's runs
    main(["quality", "--tiny", "-o", str(tmp_path), "-tr", "nnUNetTrainer"])
    assert "| 2 | nnUNetTrainerMeanTeacher |" in (tmp_path / "results.md").read_text()
    assert len(_rows(tmp_path / "results.csv")) == len(every_row)
    # one run left to train (Mean Teacher's second seed): the time left counts no run an earlier command trained
    main(["quality", "--tiny", "-o", str(tmp_path), "-tr", "nnUNetTrainerMeanTeacher", "--method_repeats", "2"])
    estimates = [line.split(" | ")[-1] for line in capsys.readouterr().out.splitlines()
                 if "all runs' training left" in line]
    assert estimates and all(estimate.startswith("run left ") for estimate in estimates)
    for estimate in estimates:  # "run left 0m02s, all runs' training left 0m02s"
        run_left, command_left = estimate.removeprefix("run left ").split(", all runs' training left ")
        assert run_left == command_left, estimate
    # a folder whose recorded identity differs is refused, never reused
    identity["epochs"] = 7
    (mean_teacher_run / "semi_benchmark_identity.json").write_text(json.dumps(identity))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["quality", "--tiny", "-o", str(tmp_path), "-tr", "nnUNetTrainerMeanTeacher"])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1 and "epochs: 7 there, 2 now" in error[0]
    assert str(mean_teacher_run) in error[0] and "is not reused" in error[0]
    assert user_split.read_bytes() == before


@pytest.mark.slow
def test_a_quality_run_killed_mid_training_leaves_the_datasets_split_byte_identical(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from nnunet_semi.tools.benchmark.common import make_tiny_dataset

    make_tiny_dataset(str(tmp_path / "tiny_dataset"))
    user_split = tmp_path / "tiny_dataset" / "nnUNet_preprocessed" / "Dataset994_SemiTiny" / "splits_final.json"
    user_split.write_text(json.dumps([{"train": [f"case_{i:03d}" for i in range(6)],
                                       "val": ["case_006", "case_007"]}]))
    before = user_split.read_bytes()
    env = dict(os.environ) | {"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"}
    process = subprocess.Popen([sys.executable, "-m", "nnunet_semi.cli", "benchmark", "quality", "--tiny", "-o",
                                str(tmp_path), "-tr", "nnUNetTrainerMeanTeacher", "-v"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    for line in process.stdout:  # nnU-Net's output (-v): kill inside the first training
        if "Epoch 0" in line or time.time() > deadline:
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for _ in range(50):  # the worker's own process group dies with it: wait until nothing holds the file
        if not subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout:
            break
        time.sleep(0.2)
    subprocess.run(["pkill", "-9", "-f", str(tmp_path)])
    assert (tmp_path / "nnunet_preprocessed" / "Dataset994_SemiTiny" / "splits_final.json").is_file()  # its own
    assert user_split.read_bytes() == before
    assert not (user_split.parent / "splits_final.original.json").exists()


@pytest.mark.slow
def test_speed_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    main(["speed", "--tiny", "-o", str(tmp_path), "-tr", "nnUNetTrainerCPS"])
    printed = capsys.readouterr().out  # which trainer, where its output went, the time left
    assert f"trainer 2/2 nnUNetTrainerCPS: 1 + 3 steps (its output: {tmp_path / 'logs' / 'nnUNetTrainerCPS.txt'})" \
        in printed and printed.count("time left") == 2
    rows = _rows(tmp_path / "speed.csv")
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer", "nnUNetTrainerCPS"]
    for r in rows:
        for key in ("step_s_with_loading", "step_s_without_loading", "peak_memory_mb"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0
    assert float(rows[0]["step_s_with_loading_ratio"]) == 1.0
    assert (tmp_path / "speed.md").read_text().count("| nnUNetTrainer") == 2
    assert (tmp_path / "speed.png").stat().st_size > 0


@pytest.mark.slow
def test_speed_compute_only(tmp_path, monkeypatch):
    """--compute_only times only the held-batch steps (the CPU stand-in for a GPU's compute ratio)."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    main(["speed", "--tiny", "-o", str(tmp_path), "-tr", "nnUNetTrainerMeanTeacher", "--compute_only",
          "--steps", "2", "--warmup", "0"])
    rows = _rows(tmp_path / "speed.csv")
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer", "nnUNetTrainerMeanTeacher"]
    for r in rows:
        assert math.isnan(float(r["step_s_with_loading"]))
        assert float(r["step_s_without_loading"]) > 0 and r["warmup"] == "0" and r["steps"] == "2"
    md = (tmp_path / "speed.md").read_text()
    assert md.count("not timed") == 4 and "after 0 warm-up steps" in md


def test_speed_refuses_zero_steps(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["speed", "--tiny", "-o", str(tmp_path), "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before the tiny dataset is written


def _log_span(log_file):
    """(first, last) timestamp of an nnU-Net training log, in seconds."""
    from datetime import datetime

    stamps = [datetime.strptime(line[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
              for line in open(log_file) if line[:4].isdigit() and line[26:28] == ": "]
    return stamps[0], stamps[-1]


@pytest.mark.slow
def test_quality_jobs_trains_runs_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    main(["quality", "--tiny", "-o", str(tmp_path), "-tr", "nnUNetTrainerMeanTeacher", "--jobs", "2"])
    printed = capsys.readouterr().out
    for run, label in ((1, "nnUNetTrainer, 2 labeled"), (2, "nnUNetTrainerMeanTeacher, 2 labeled"),
                       (3, "nnUNetTrainer, all labeled")):  # both workers' epochs followed
        assert f"run {run}/3 {label} | epoch 2/2 | last epoch " in printed, run
    mean_teacher_run = bench_run(tmp_path, "nnUNetTrainerMeanTeacher__bench_2lab_2x4")
    assert (tmp_path / "logs" / f"{mean_teacher_run}.txt").is_file()
    rows = _rows(tmp_path / "results.csv")
    assert {(r["trainer"], r["num_labeled"]) for r in rows} == {
        ("nnUNetTrainer", "2"), ("nnUNetTrainerMeanTeacher", "2"), ("nnUNetTrainer", "all")}
    def training_log(run):  # one log: finding a finished run later opens no trainer (and no new log file)
        logs = list((tmp_path / "runs" / run).glob("training_log_*.txt"))
        assert len(logs) == 1 and "Epoch 0" in logs[0].read_text(), logs
        return logs[0]

    stock, mean_teacher = (training_log(r) for r in (bench_run(tmp_path, "nnUNetTrainer__bench_2lab_2x4"),
                                                     mean_teacher_run))
    (a0, a1), (b0, b1) = _log_span(stock), _log_span(mean_teacher)
    assert a0 < b1 and b0 < a1  # the two runs of 2 labeled trained at the same time
    assert "Unlabeled cases" in mean_teacher.read_text()


def test_quality_refuses_zero_jobs_before_writing_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quality", "--tiny", "-o", str(tmp_path / "out"), "--jobs", "0"])
    assert "--jobs 0: give at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["quality", "--selftrain_rounds", "0", "-tr", "selftrain"], "--selftrain_rounds 0: give at least 1"),
    (["speed", "-tr", "selftrain"], "-tr selftrain: offline self-training is several stock trainings"),
])
def test_selftrain_refusals_before_writing_anything(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv[:1] + ["--tiny", "-o", str(tmp_path / "out")] + argv[1:])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quality_without_medpy_stops_before_anything(tmp_path, monkeypatch):
    """medpy is the optional `benchmark` extra: without it the quality benchmark refuses at once, naming the fix."""
    import importlib.util

    from nnunet_semi.errors import SemiInputError
    from nnunet_semi.tools.benchmark.quality import QualitySettings, run_quality_benchmark

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "medpy" else
                        real_find_spec(name, *a))
    with pytest.raises(SemiInputError, match=r"nnunet-semi\[benchmark\]"):
        run_quality_benchmark(QualitySettings("Dataset999_Nothing", ["2"], [], 1, 1, str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quality_warm_start_pairs_every_trainer_against_the_control_continued_the_same_way(tmp_path, monkeypatch):
    """--warm_start: stock trains from scratch (its second seed too: CPS's peer starts from it), then the control
    (--repeats seeds), CPS (--method_repeats seeds) and self-training's student continue from stock's checkpoint;
    gains are over the control, and the seed table gives every side's spread and a verdict."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    main(["quality", "--tiny", "-o", str(tmp_path), "-tr", "nnUNetTrainerCPS", "selftrain", "--warm_start",
          "--repeats", "2", "--method_repeats", "2"])
    rows = _rows(tmp_path / "results.csv")
    start = bench_run(tmp_path, "nnUNetTrainer__bench_2lab_2x4")
    peer, data = f"{start}_r1", start.rsplit("_", 1)[1]
    runs = {(r["trainer"], r["repeat"], r["num_labeled"], r["warm_start_from"], r["peer_warm_start_from"])
            for r in rows}
    assert runs == {("nnUNetTrainer", "0", "2", "", ""), ("nnUNetTrainer", "1", "2", "", ""),
                    ("nnUNetTrainer_warmStart", "0", "2", start, ""), ("nnUNetTrainer_warmStart", "1", "2", start, ""),
                    ("nnUNetTrainerCPS", "0", "2", start, peer), ("nnUNetTrainerCPS", "1", "2", start, peer),
                    ("selftrain", "0", "2", start, ""),
                    ("nnUNetTrainer", "0", "all", "", ""), ("nnUNetTrainer", "1", "all", "", "")}
    assert {r["seed"] for r in rows if r["trainer"] == "nnUNetTrainerCPS"} == {"12345", "12346"}
    # every warm run loaded the start whole, CPS's peer its own checkpoint
    logs = tmp_path / "logs"
    checkpoint = f"{start}__nnUNetDemoPlans__3d_fullres/fold_0/checkpoint_final.pth"
    for run in (f"nnUNetTrainer_warmStart__bench_2lab_2x4_warm_{data}_r1",
                f"nnUNetTrainerCPS__bench_2lab_2x4_warm_{data}", f"selftrain__bench_2lab_2x4_{data}_warm_1round"):
        assert f"{checkpoint} loaded into the network, output layers included" in (logs / f"{run}.txt").read_text()
    assert f"{peer}__nnUNetDemoPlans__3d_fullres/fold_0/checkpoint_final.pth loaded into the peer network" in \
        (logs / f"nnUNetTrainerCPS__bench_2lab_2x4_warm_{data}_r1.txt").read_text()
    md = (tmp_path / "results.md").read_text()
    control = _mean_dice(rows, "nnUNetTrainer_warmStart", "0")
    cps = _mean_dice(rows, "nnUNetTrainerCPS", "0")
    assert f"| 2 · warm | nnUNetTrainerCPS | student | {cps:.2f} ± " in md  # gain over the control, not over stock
    assert f"| {cps - control:+.2f} |" in md.split("| 2 · warm | nnUNetTrainerCPS | student |")[1].split("\n")[0]
    seed_line = next(line for line in md.splitlines() if line.startswith("| 2 · warm | nnUNetTrainerCPS | 2 |"))
    assert "## Development cases" in md
    assert seed_line.endswith(("| beats |", "| loses |", "| within the spread |"))
    headline = md.split("## Development cases")[0]  # the test cases; the development cases tabulated below
    assert "| 2 · warm | selftrain | 1 |" in headline and headline.count("single seed |") == 1


def _mean_dice(rows, trainer, repeat):
    return 100 * np.mean([float(r["dice"]) for r in rows if r["trainer"] == trainer and r["repeat"] == repeat
                          and r["warm_start_from"] and r["case_set"] == "test"])


@pytest.mark.parametrize("argv, message", [
    (["quality", "-tr", "nnUNetTrainerNoSuch"], "-tr nnUNetTrainerNoSuch: no such trainer"),
    (["speed", "-tr", "nnUNetTrainerNoSuch"], "-tr nnUNetTrainerNoSuch: no such trainer"),
    (["quality", "--num_labeled", "abc"], "--num_labeled abc: neither a positive number of labeled cases nor 'all'"),
    (["quality", "--num_labeled", "4", "0"], "--num_labeled 0: neither a positive number"),
    (["quality", "-f", "-1"], "-f -1: give a fold index"),
    (["quality", "-f", "1", "--num_val", "4"], "-f 1 with --num_val: the held-out split has one fold, 0"),
    (["quality", "--test_labels", "/nonexistent/labelsTs"], "--test_labels /nonexistent/labelsTs is not a folder"),
    (["quality", "--epochs", "0"], "--epochs 0: give at least 1"),
    (["quality", "--method_repeats", "0"], "--method_repeats 0: give at least 1 each"),
])
def test_benchmark_input_is_checked_before_anything_is_written(tmp_path, capsys, argv, message):
    """With --tiny, an unchecked option would first generate, plan and preprocess a dataset into -o."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv[:1] + ["--tiny", "-o", str(tmp_path / "out")] + argv[1:])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and error == [f"nnUNetv2_semi_benchmark: error: {error[0].split(': ', 2)[2]}"]
    assert message in error[0]
    assert not (tmp_path / "out").exists()


def test_benchmark_without_medpy_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "medpy" else
                        real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        main(["quality", "--tiny", "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "pip install 'nnunet-semi[benchmark]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
