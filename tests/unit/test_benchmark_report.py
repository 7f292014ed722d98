"""nnUNetv2_semi_benchmark report: merging result folders (issue #21 item 2), on hand-written scores."""

from __future__ import annotations

import csv

import pytest

from nnunet_semi.cli import benchmark_entry as main
from nnunet_semi.tools.benchmark.records import earlier_runs
from nnunet_semi.tools.benchmark.scoring import METRICS
from nnunet_semi.tools.benchmark.tables import write_results


def _rows(trainer, dice, commit, epochs=15, repeat=0, dataset="Dataset101_LA", ramp="600",
          date="2026-12-02 00:00 UTC", warm=""):
    rows = []
    for i, value in enumerate(dice):
        rows.append({"trainer": trainer, "num_labeled": "4", "case": f"LA_{64 + i:03d}", "class": 1,
                     **{m: value if m in ("dice", "jaccard") else 1.0 for m in METRICS}, "repeat": repeat,
                     "deployed": "network", "dataset": dataset, "configuration": "3d_fullres",
                     "plans": "nnUNetPlans_coarse", "fold": 0, "num_val": 4, "epochs": epochs,
                     "iterations_per_epoch": 100, "rampup_iterations": ramp, "seed": 12345 + repeat,
                     "evaluated_on": "fold 0 val", "commit": commit, "nnunetv2": "2.8.1", "torch": "2.14.1",
                     "device": "cpu (2 cores)", "date": date} | ({"warm_start_from": warm} if warm else {}))
    return rows


def _write_run(folder, run, trainer, dice, commit, **kwargs):
    rows = _rows(trainer, dice, commit, **kwargs)
    (folder / "runs" / run).mkdir(parents=True)
    with open(folder / "runs" / run / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_report_merges_folders_keeps_schedules_and_commits_apart_and_lists_missing_cells(tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "new"
    stock = [0.80, 0.82, 0.84, 0.86]
    for folder in (old, new):  # the same stock run copied into both folders counts once
        _write_run(folder, "nnUNetTrainer__bench_4lab_15x100", "nnUNetTrainer", stock, "aaaa")
    _write_run(old, "nnUNetTrainerMeanTeacher__bench_4lab_15x100", "nnUNetTrainerMeanTeacher",
               [0.78, 0.80, 0.82, 0.84], "aaaa")
    _write_run(new, "nnUNetTrainerMeanTeacher__bench_4lab_15x100", "nnUNetTrainerMeanTeacher",
               [0.82, 0.84, 0.86, 0.88], "bbbb")
    _write_run(new, "nnUNetTrainer__bench_4lab_15x100_r1", "nnUNetTrainer", [0.81, 0.82, 0.83, 0.87], "bbbb",
               repeat=1)
    _write_run(new, "nnUNetTrainer__bench_4lab_30x100", "nnUNetTrainer", stock, "bbbb", epochs=30)
    main(["report", str(old), str(new), "-o", str(tmp_path / "merged")])
    md = (tmp_path / "merged" / "results.md").read_text()
    assert capsys.readouterr().out.startswith("# Quality, merged: Dataset101_LA")
    # one stock row per schedule, the trainer at two commits as two rows, each paired against stock
    assert md.count("| 4 · 15x100 | nnUNetTrainer | network | 83.00 ± 2.24 |") == 1
    assert "| 4 · 15x100 | nnUNetTrainerMeanTeacher @aaaa | network | 81.00 ± 2.24 | -2.00 |" in md
    assert "| 4 · 15x100 | nnUNetTrainerMeanTeacher @bbbb | network | 85.00 ± 2.24 | +2.00 |" in md
    assert "| 4 · 15x100 | nnUNetTrainerMeanTeacher @bbbb | 4 | +2.00 | +2.00 | 4 | 0 |" in md
    assert "| 4 · 15x100 | nnUNetTrainer (repeat 1) | 4 |" in md  # stock's spread
    # the 30-epoch stock run is a schedule of its own: not averaged in, and its missing cells are listed
    assert "| 4 · 30x100 | nnUNetTrainer | network | 83.00 ± 2.24 |" in md
    missing = next(line for line in md.splitlines() if line.startswith("Cells still missing: "))
    assert "`nnUNetTrainerMeanTeacher` at 4 · 30x100" in missing
    assert "`nnUNetTrainerMeanTeacher` at 4 · 15x100" not in missing and "`nnUNetTrainer` at" not in missing
    # methods registered but never run are named too, at every count and schedule seen
    assert "`nnUNetTrainerSGRS` at 4 · 15x100" in missing and "`nnUNetTrainerDualCCE` at 4 · 30x100" in missing
    assert "single run (no spread measured) at: 4 · 30x100" in md
    assert "| aaaa | cpu (2 cores) |" in md and (tmp_path / "merged" / "results.png").stat().st_size > 0
    with open(tmp_path / "merged" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 5  # 5 distinct runs x 4 cases


def test_report_refuses_folders_of_different_datasets(tmp_path, capsys):
    _write_run(tmp_path / "la", "nnUNetTrainer__bench_4lab_15x100", "nnUNetTrainer", [0.8], "aaaa")
    _write_run(tmp_path / "acdc", "nnUNetTrainer__bench_4lab_15x100", "nnUNetTrainer", [0.8], "aaaa",
               dataset="Dataset027_ACDC")
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "la"), str(tmp_path / "acdc"), "-o", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert "different datasets or split protocols" in err and "Dataset027_ACDC" in err and "Dataset101_LA" in err
    assert not (tmp_path / "merged").exists()
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "merged")])
    assert "has no runs/ folder" in capsys.readouterr().err


def test_report_rewrites_the_marked_readme_block_only(tmp_path, capsys):
    from nnunet_semi.tools.benchmark.report import README_BEGIN, README_END

    folder = tmp_path / "cell"
    _write_run(folder, "nnUNetTrainer__bench_4lab_15x100", "nnUNetTrainer", [0.80, 0.82, 0.84, 0.86], "aaaa")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\nbefore\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    main(["report", str(folder), "-o", str(tmp_path / "merged"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# Project\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old table" not in text and "| 4 · 15x100 | nnUNetTrainer | network | 83.00 ± 2.24 |" in text
    assert "produced by: nnUNetv2_semi_benchmark report" in text and "# Quality, merged" not in text
    main(["report", str(folder), "-o", str(tmp_path / "merged"), "--readme", str(readme)])
    assert readme.read_text() == text  # a second run rewrites the same block in place


def test_report_refuses_a_readme_without_markers(tmp_path, capsys):
    folder = tmp_path / "cell"
    _write_run(folder, "nnUNetTrainer__bench_4lab_15x100", "nnUNetTrainer", [0.80, 0.82, 0.84, 0.86], "aaaa")
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(folder), "-o", str(tmp_path / "merged"), "--readme", str(readme)])
    assert exit_info.value.code == 2 and "needs exactly one" in capsys.readouterr().err
    assert readme.read_text() == "# Project\n"


def test_results_header_names_every_commit_and_the_date_range_of_its_runs(tmp_path):
    stock = _rows("nnUNetTrainer", [0.80, 0.82], "aaaa", date="2026-12-01 22:01 UTC")
    method = _rows("nnUNetTrainerMeanTeacher", [0.81, 0.84], "bbbb", date="2026-12-03 14:51 UTC")
    write_results(stock + method, str(tmp_path))
    header = (tmp_path / "results.md").read_text().splitlines()[2]
    assert "commits aaaa, bbbb (each run's in results.csv)" in header
    assert "nnU-Net 2.8.1, torch 2.14.1, device cpu (2 cores), 2026-12-01 22:01 UTC to 2026-12-03 14:51 UTC." in header
    (tmp_path / "one").mkdir()
    write_results(stock, str(tmp_path / "one"))  # one run: its commit and date, no range
    header = (tmp_path / "one" / "results.md").read_text().splitlines()[2]
    assert "; commit aaaa, nnU-Net 2.8.1," in header and header.count("UTC") == 1


def test_quality_keeps_earlier_comparable_runs_and_names_the_others(tmp_path):
    folder = tmp_path / "cell"
    _write_run(folder, "nnUNetTrainer__bench_4lab_15x100", "nnUNetTrainer", [0.80, 0.82], "aaaa")
    _write_run(folder, "nnUNetTrainerCPS__bench_4lab_15x100", "nnUNetTrainerCPS", [0.83, 0.84], "aaaa")
    _write_run(folder, "nnUNetTrainerSGRS__bench_4lab_15x100_ramp1500", "nnUNetTrainerSGRS", [0.7, 0.7], "aaaa",
               ramp="1500")
    _write_run(folder, "nnUNetTrainerCPS__bench_4lab_30x100", "nnUNetTrainerCPS", [0.9, 0.9], "aaaa", epochs=30)
    _write_run(folder, "nnUNetTrainer__bench_4lab_15x100_r1", "nnUNetTrainer", [0.81, 0.83], "aaaa", repeat=1,
               ramp="")  # stock has no ramp: kept whatever its column says
    pair = [{"trainer": "nnUNetTrainerCPS", "case": "LA_064", "scored_model": "teacher", "dice": "0.8"}]
    with open(folder / "runs" / "nnUNetTrainerCPS__bench_4lab_15x100" / "ema_pair_scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(pair[0]))
        writer.writeheader()
        writer.writerows(pair)
    (folder / "runs" / "nnUNetTrainerMeanTeacher__bench_4lab_15x100").mkdir()  # unfinished: no scores.csv
    this_command = _rows("nnUNetTrainerMeanTeacher", [0.81, 0.81], "bbbb")
    rows, pairs, left_out = earlier_runs(str(folder), {"nnUNetTrainer__bench_4lab_15x100"}, this_command[0], "600")
    assert {(r["trainer"], r["repeat"]) for r in rows} == {("nnUNetTrainerCPS", "0"), ("nnUNetTrainer", "1")}
    assert len(rows) == 4 and [p["scored_model"] for p in pairs] == ["teacher"]
    assert sorted(left_out) == ["nnUNetTrainerCPS__bench_4lab_30x100", "nnUNetTrainerSGRS__bench_4lab_15x100_ramp1500"]
    # the same folder seen from a command with a 1500-iteration ramp: the other way round for the methods
    rows, _, left_out = earlier_runs(str(folder), set(), this_command[0] | {"rampup_iterations": "1500"}, "1500")
    assert {r["trainer"] for r in rows} == {"nnUNetTrainer", "nnUNetTrainerSGRS"}
    assert "nnUNetTrainerCPS__bench_4lab_15x100" in left_out
    assert earlier_runs(str(tmp_path / "empty"), set(), this_command[0], "600") == ([], [], [])


def test_dual_members_are_tabulated_against_the_deployed_model(tmp_path):
    stock = _rows("nnUNetTrainer", [0.80, 0.82, 0.84], "aaaa")
    dual = _rows("nnUNetTrainerDualCCE", [0.85, 0.85, 0.85], "aaaa")
    members = [r | {"deployed": "ensemble", "scored_model": model, "dice": value}
               for model, values in (("ensemble", [0.85, 0.85, 0.85]), ("student", [0.86, 0.87, 0.84]),
                                     ("peer", [0.80, 0.81, 0.82]))
               for r, value in zip(_rows("nnUNetTrainerDualCCE", values, "aaaa"), values)]
    teacher = [r | {"deployed": "student", "scored_model": model}
               for model in ("student", "teacher") for r in _rows("nnUNetTrainerMeanTeacher", [0.8, 0.8, 0.8], "aaaa")]
    write_results(stock + dual, str(tmp_path), members + teacher)
    md = (tmp_path / "results.md").read_text()
    assert "| 4 | nnUNetTrainerDualCCE | ensemble | 85.00 | student | 85.67 | +0.67 | +1.00 | 2 | 1 |" in md
    assert "| 4 | nnUNetTrainerDualCCE | ensemble | 85.00 | peer | 81.00 | -4.00 | -4.00 | 0 | 3 |" in md
    assert "| 4 | nnUNetTrainerMeanTeacher | student | 80.00 | 80.00 |" in md  # the EMA pair keeps its own table
    with open(tmp_path / "dual_members.csv") as f:
        assert {r["scored_model"] for r in csv.DictReader(f)} == {"ensemble", "student", "peer"}
    with open(tmp_path / "ema_pair.csv") as f:
        assert {r["scored_model"] for r in csv.DictReader(f)} == {"student", "teacher"}


@pytest.mark.parametrize("seeds, baseline, verdict", [
    ([84.0, 85.0], [82.0, 83.5, 82.9], "beats"),  # every seed above every baseline seed
    ([84.0, 83.0], [82.0, 83.5, 82.9], "within the spread"),  # one seed inside the baseline's spread
    ([80.0, 81.0], [82.0, 83.5], "loses"),
    ([90.0], [82.0, 83.5], "single seed"),  # no spread of its own: no claim
    ([90.0, 91.0], [82.0], "baseline single seed"),
])
def test_seed_verdict_says_beats_only_where_every_seed_beats_the_baselines_spread(seeds, baseline, verdict):
    from nnunet_semi.tools.benchmark.statistics import seed_verdict

    assert seed_verdict(seeds, baseline) == verdict


def test_report_pairs_warm_runs_against_the_control_apart_from_the_runs_from_scratch(tmp_path):
    """Warm-started runs (``warm_start_from``) form a group of their own whose baseline is the control; rows of
    older folders without the column are runs from scratch."""
    folder, start = tmp_path / "cell", "nnUNetTrainer__bench_4lab_15x100"
    _write_run(folder, start, "nnUNetTrainer", [0.80, 0.82, 0.84, 0.86], "aaaa")
    for repeat, dice in enumerate(([0.84, 0.85, 0.86, 0.87], [0.83, 0.85, 0.86, 0.86], [0.84, 0.84, 0.87, 0.87])):
        _write_run(folder, f"nnUNetTrainer_warmStart__bench_4lab_15x100_warm_r{repeat}", "nnUNetTrainer_warmStart",
                   dice, "bbbb", repeat=repeat, warm=start)
    for repeat, dice in enumerate(([0.88, 0.89, 0.90, 0.91], [0.87, 0.89, 0.90, 0.90])):
        _write_run(folder, f"nnUNetTrainerCPS__bench_4lab_15x100_warm_r{repeat}", "nnUNetTrainerCPS", dice, "bbbb",
                   repeat=repeat, warm=start)
    # a start trainer (from scratch only) and a warm-only variant: never missing in the other mode
    _write_run(folder, "nnUNetTrainer_BCPPretrain__bench_4lab_15x100", "nnUNetTrainer_BCPPretrain",
               [0.81, 0.83, 0.85, 0.87], "bbbb")
    _write_run(folder, "nnUNetTrainerBCP_stepLR__bench_4lab_15x100_warm", "nnUNetTrainerBCP_stepLR",
               [0.85, 0.86, 0.87, 0.88], "bbbb", warm=start)
    main(["report", str(folder), "-o", str(tmp_path / "merged")])
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "| 4 · 15x100 · warm | nnUNetTrainerCPS | network | 89.50 ± 1.12 | +4.00 |" in md  # over the control
    assert "| 4 · 15x100 · warm | nnUNetTrainer_warmStart (repeat 2) | 4 |" in md  # the control's spread
    seeds = next(line for line in md.splitlines() if line.startswith("| 4 · 15x100 · warm | nnUNetTrainerCPS | 2 |"))
    assert "| 89.50, 89.00 |" in seeds and seeds.endswith("| beats |")
    missing = next(line for line in md.splitlines() if line.startswith("Cells still missing: "))
    assert "`nnUNetTrainerSGRS` at 4 · 15x100 · warm" in missing and "`nnUNetTrainer` at" not in missing
    assert "`nnUNetTrainerCPS` at 4 · 15x100," in missing  # a registered method: listed in every group
    assert "`selftrain` at 4 · 15x100 · warm" in missing  # self-training too
    assert "`nnUNetTrainer_BCPPretrain` at" not in missing and "`nnUNetTrainerBCP_stepLR` at" not in missing


def test_multi_class_runs_are_paired_per_case_with_per_class_tables_beside(tmp_path):
    """Two foreground classes: one paired sample per case (the mean over its classes), not per case and class, and
    a per-class table; the seeds column marks a single run as such."""
    rows = []
    for trainer, dice in (("nnUNetTrainer", {1: [0.8, 0.8, 0.8], 2: [0.6, 0.6, 0.6]}),
                          ("nnUNetTrainerCPS", {1: [0.9, 0.9, 0.9], 2: [0.6, 0.6, 0.6]})):
        for label, values in dice.items():
            for row in _rows(trainer, values, "aaaa"):
                rows.append(row | {"class": label})
    write_results(rows, str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "| 4 | nnUNetTrainerCPS | 3 | +5.00 | +5.00 | 3 | 0 |" in md  # N = 3 cases, Δ = (10 + 0) / 2
    assert "| 4 | nnUNetTrainerCPS | 1 | 90.00 | +10.00 |" in md
    assert "| 4 | nnUNetTrainerCPS | 2 | 60.00 | +0.00 |" in md
    assert "| 4 | nnUNetTrainerCPS | network | 75.00 ± 15.00 | +5.00 | 1 (single seed) |" in md
