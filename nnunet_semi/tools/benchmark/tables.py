"""The tables of a quality result folder (``results.md``, ``results.csv``, ``ema_pair.csv``, ``dual_members.csv``):
mean ± std per trainer with its seeds, the paired comparison with the baseline, the seeds table, per class, the
members of a run; test and development cases apart."""

from __future__ import annotations

import math
from os.path import join

import numpy as np

from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.benchmark.common import CONTROL_TRAINER
from nnunet_semi.tools.benchmark.plots import plot_results
from nnunet_semi.tools.benchmark.records import write_csv
from nnunet_semi.tools.benchmark.scoring import METRICS
from nnunet_semi.tools.benchmark.statistics import (
    baseline_of,
    dice_by_case,
    first_runs,
    paired_comparison,
    repeat_of,
    seed_average,
    seed_verdict,
    table_group,
)


def where_and_when(rows: list[dict]) -> str:
    """The code, libraries, device and date of the runs behind ``rows``: every distinct value, because a result
    folder collects runs made at different commits (a method's cell re-run after a change, a resumed cell)."""
    def distinct(key: str) -> list[str]:
        return list(dict.fromkeys(str(row.get(key, "")) for row in rows))

    commits, dates = distinct("commit"), sorted(distinct("date"))
    parts = [f"commit {commits[0]}" if len(commits) == 1 else
             f"commits {', '.join(commits)} (each run's in results.csv)"]
    parts += [f"{name} {', '.join(distinct(key))}" for name, key in
              (("nnU-Net", "nnunetv2"), ("torch", "torch"), ("device", "device"))]
    parts.append(dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}")
    return ", ".join(parts)


def write_results(rows: list[dict], out_dir: str, member_rows: list[dict] | None = None) -> None:
    """results.csv (every row), results.md (mean ± std, gain and paired statistics against the baseline, and where
    ``member_rows`` are given (``score_members``) the teacher against the student, ema_pair.csv, and each network of
    a dual-network run against what it deploys, dual_members.csv) and results.png."""
    if not rows:
        raise SemiInputError("no results to write: no trainer produced predictions.")
    write_csv(rows, join(out_dir, "results.csv"))
    rows = [r | {"num_labeled": table_group(r)} for r in rows]
    member_rows = [r | {"num_labeled": table_group(r)} for r in member_rows or []]
    headline, development = split_case_sets(rows)
    info = headline[0]
    lines = [f"# Quality: {info['dataset']}, {info['configuration']}, fold {info['fold']}, evaluated on "
             f"{info['evaluated_on']}", "",
             f"Schedule {info['epochs']} epochs x {info['iterations_per_epoch']} iterations for every trainer; "
             f"{where_and_when(rows)}. Mean ± std over cases (and foreground classes); distances are NaN-excluded "
             f"means (a distance is undefined when a mask is empty). Gain: Dice points over nnUNetTrainer with the "
             f"same labeled cases (`warm`: runs warm-started from its first run, gains over {CONTROL_TRAINER}, "
             f"stock nnU-Net continued the same way). Training min: the run's epochs (selftrain: its teacher and "
             f"every student), as measured on this device (side by side with --jobs: while sharing it).", "",
             case_sets_statement(headline, development), ""]
    lines += summary_tables(headline, voxel_distances=True)
    if development:
        lines += ["", "## Development cases", ""] + summary_tables(development, voxel_distances=True)
    ema_pairs, dual_members = split_member_rows(member_rows)
    if ema_pairs:
        write_csv(ema_pairs, join(out_dir, "ema_pair.csv"))
    if dual_members:
        write_csv(dual_members, join(out_dir, "dual_members.csv"))
    lines += member_tables(member_rows)
    with open(join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_results(headline, join(out_dir, "results.png"))


def split_case_sets(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(headline rows, development rows): the test cases' rows and the development cases' apart where test cases
    were scored; else every row is a development case's (older rows without ``case_set`` too) and the second is
    empty."""
    test = [r for r in rows if r.get("case_set") == "test"]
    return (test, [r for r in rows if r.get("case_set") != "test"]) if test else (rows, [])


def case_sets_statement(headline: list[dict], development: list[dict]) -> str:
    """What the tables' cases are: test cases, or development cases (never called held-out)."""
    validation = ("the fold's validation cases, on which nnU-Net validates every epoch (pseudo Dice, "
                  "checkpoint_best) and on which defaults may have been chosen; no run selects on them (scores come "
                  "from checkpoint_final and the declared model)")
    cases = sorted({r["case"] for r in headline})
    if development:
        return (f"**Test cases** ({len(cases)}: {cases[0]} … {cases[-1]}, imagesTs scored against --test_labels) "
                f"are the headline; the development cases, {validation}, are tabulated below, apart.")
    return (f"**Development cases** ({len(cases)}: {cases[0]} … {cases[-1]}): {validation}. They are not a test set; "
            f"give --test_labels for one.")


def summary_tables(rows: list[dict], voxel_distances: bool) -> list[str]:
    """Markdown lines of one case set: mean ± std per trainer (with each one's seeds), the paired comparison with
    the baseline, the seeds table and, where there are several classes, the per-class table."""
    summary = summarize(rows)
    metrics = METRICS if voxel_distances else ("dice", "jaccard", "hd95_mm", "asd_mm")
    names = {"dice": "Dice %", "jaccard": "Jaccard %", "hd95_mm": "95HD mm", "asd_mm": "ASD mm",
             "hd95_vox": "95HD vox", "asd_vox": "ASD vox"}
    lines = [f"| labeled | trainer | deployed | Dice % | gain | seeds | "
             f"{' | '.join(names[m] for m in metrics[1:])} | training min |",
             "|" + "---|" * (len(metrics) + 6)]
    for (count, trainer), stats in summary.items():
        cells = [f"{stats[m][0]:.2f} ± {stats[m][1]:.2f}" for m in metrics]
        gain, seconds = stats.get("gain"), stats["train_seconds"]
        lines.append(f"| {count} | {trainer} | {stats['deployed']} | {cells[0]} | "
                     f"{'' if gain is None else f'{gain:+.2f}'} | {stats['seeds']} | {' | '.join(cells[1:])} | "
                     f"{'' if seconds is None else f'{seconds / 60:.1f}'} |")
    return lines + ["", *paired_table(rows)] + seed_table(rows) + per_class_table(rows)


def split_member_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``score_members`` rows split into EMA pairs' (a ``teacher`` scored) and dual networks' (a ``peer``), run by
    run."""
    runs = {}
    for r in rows:
        runs.setdefault((r["num_labeled"], r["trainer"], r.get("repeat", "")), []).append(r)
    ema, dual = [], []
    for run in runs.values():
        (ema if any(r["scored_model"] == "teacher" for r in run) else dual).extend(run)
    return ema, dual


def member_tables(rows: list[dict]) -> list[str]:
    """Markdown lines (each table after a blank line) for ``score_members`` rows: ``ema_pair_table`` and
    ``dual_member_table``, each where it has runs."""
    ema, dual = split_member_rows(rows)
    return ([""] + ema_pair_table(ema) if ema else []) + ([""] + dual_member_table(dual) if dual else [])


def dual_member_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each model of a dual-network run (network 1 ``student``, network 2 ``peer``, their
    ``ensemble``) against the model the run deploys, case by case."""
    lines = ["Each network of a dual-network run against the model it deploys (Dice %, paired on the same cases; "
             "positive: the network is better; network 1 is what `nnUNetv2_semi_export` writes for vanilla nnU-Net "
             "unless the peer is deployed).", "",
             "| labeled | trainer | deployed | deployed Dice % | scored | its Dice % | mean Δ | median Δ | wins | "
             "losses | 95 % CI of mean Δ | Wilcoxon p |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for count, trainer in dict.fromkeys((r["num_labeled"], r["trainer"]) for r in rows):
        run = [r for r in rows if r["num_labeled"] == count and r["trainer"] == trainer]
        deployed = run[0]["deployed"]
        member = {m: dice_by_case([r for r in run if r["scored_model"] == m])
                  for m in dict.fromkeys(r["scored_model"] for r in run)}
        if deployed not in member:
            continue
        for name, dice in member.items():
            if name == deployed:
                continue
            c = paired_comparison(dice, member[deployed])
            lines.append(f"| {count} | {trainer} | {deployed} | {np.mean(list(member[deployed].values())):.2f} | "
                         f"{name} | {np.mean(list(dice.values())):.2f} | {c['mean']:+.2f} | {c['median']:+.2f} | "
                         f"{c['wins']} | {c['losses']} | [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | "
                         f"{c['p_wilcoxon']:.3f} |")
    return lines


def ema_pair_table(rows: list[dict]) -> list[str]:
    """Markdown lines: the teacher against the student of the same run, case by case (deployed: which of the two
    the checkpoint deploys)."""
    lines = ["Teacher against student of the same run (Dice %, paired on the same cases; positive: the teacher is "
             "better).", "",
             "| labeled | trainer | deployed | student Dice % | teacher Dice % | mean Δ | median Δ | wins | losses | "
             "95 % CI of mean Δ | Wilcoxon p |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for count, trainer in dict.fromkeys((r["num_labeled"], r["trainer"]) for r in rows):
        run = [r for r in rows if r["num_labeled"] == count and r["trainer"] == trainer]
        member = {m: dice_by_case([r for r in run if r["scored_model"] == m]) for m in ("student", "teacher")}
        deployed = run[0]["deployed"]
        c = paired_comparison(member["teacher"], member["student"])
        means = {m: np.mean(list(v.values())) if v else math.nan for m, v in member.items()}
        lines.append(f"| {count} | {trainer} | {deployed} | {means['student']:.2f} | {means['teacher']:.2f} | "
                     f"{c['mean']:+.2f} | {c['median']:+.2f} | {c['wins']} | {c['losses']} | "
                     f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {c['p_wilcoxon']:.3f} |")
    return lines


def per_class_table(rows: list[dict]) -> list[str]:
    """Markdown lines (after a blank line) where any group has several foreground classes: each trainer's mean Dice
    per class (first runs) and its gain over the group's baseline in that class; nothing for one class."""
    rows = first_runs(rows)
    if len({r["class"] for r in rows}) < 2:
        return []
    lines = ["", "Per class (first runs): mean Dice % over cases, and the gain over the baseline in that class.", "",
             "| labeled | trainer | class | Dice % | gain |", "|---|---|---|---|---|"]
    for count in dict.fromkeys(r["num_labeled"] for r in rows):
        group = [r for r in rows if r["num_labeled"] == count]
        reference = baseline_of(group)
        for trainer in dict.fromkeys(r["trainer"] for r in group):
            for label in sorted({r["class"] for r in group}, key=str):
                def mean(name: str) -> float:
                    values = [100 * float(r["dice"]) for r in group if r["trainer"] == name and r["class"] == label]
                    return float(np.mean(values)) if values else math.nan
                gain = "" if trainer == reference else f"{mean(trainer) - mean(reference):+.2f}"
                lines.append(f"| {count} | {trainer} | {label} | {mean(trainer):.2f} | {gain} |")
    return lines


def paired_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each run's per-case Dice difference to the baseline's first run (stock nnU-Net, or in a warm
    group the control) with the same labeled cases; the baseline's own repeats give the run-to-run spread."""
    lines = ["Paired against the baseline's first run on the same cases (nnUNetTrainer, or in a `warm` group "
             f"{CONTROL_TRAINER}): Dice difference in points, mean and median, wins / losses out of N, a 95 % "
             "bootstrap interval of the mean and a two-sided Wilcoxon signed-rank p. `(repeat k)`: the run of seed "
             "seed + k; the baseline's repeats are the baseline against itself, the run-to-run spread.", "",
             "| labeled | trainer | N | mean Δ | median Δ | wins | losses | 95 % CI of mean Δ | Wilcoxon p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for count in dict.fromkeys(r["num_labeled"] for r in rows):
        group = [r for r in rows if r["num_labeled"] == count]
        runs = {}
        for r in group:
            runs.setdefault((r["trainer"], repeat_of(r)), []).append(r)
        reference = baseline_of(group)
        if (reference, 0) not in runs:
            continue
        baseline = dice_by_case(runs[(reference, 0)])
        for (trainer, repeat), run in runs.items():
            if (trainer, repeat) == (reference, 0):
                continue
            c = paired_comparison(dice_by_case(run), baseline)
            label = f"{trainer} (repeat {repeat})" if repeat else trainer
            lines.append(f"| {count} | {label} | {c['n']} | {c['mean']:+.2f} | {c['median']:+.2f} | {c['wins']} | "
                         f"{c['losses']} | [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {c['p_wilcoxon']:.3f} |")
    return lines


def seed_table(rows: list[dict]) -> list[str]:
    """Markdown lines (after a blank line): every trainer's seeds against the baseline's seeds, per group: the mean
    Dice of each seed, the gain of the seeds' mean over the baseline seeds' mean, each side's spread (max - min of
    the seed means), the case-paired comparison of the seed-averaged Dice, and ``seed_verdict``."""
    lines = ["", "Seeds: each trainer's runs (seed, seed + 1, ...) against the baseline's (nnUNetTrainer, or in a "
             f"`warm` group {CONTROL_TRAINER}). Gain: mean over the trainer's seeds minus mean over the baseline's; "
             "spread: max - min of the seeds' mean Dice; paired: the seed-averaged Dice per case against the "
             "baseline's. Verdict `beats` only where every seed scores above every baseline seed.", "",
             "| labeled | trainer | seeds | Dice % per seed | gain | own spread | baseline spread | paired mean Δ, "
             "wins/N, 95 % CI | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for count in dict.fromkeys(r["num_labeled"] for r in rows):
        group = [r for r in rows if r["num_labeled"] == count]
        reference = baseline_of(group)
        per_trainer = {}
        for r in group:
            per_trainer.setdefault(r["trainer"], {}).setdefault(repeat_of(r), []).append(r)
        if reference not in per_trainer:
            continue
        baseline = per_trainer[reference]
        baseline_means = [float(np.mean(list(dice_by_case(run).values()))) for run in baseline.values()]
        baseline_cases = seed_average(baseline.values())
        for trainer, seeds in per_trainer.items():
            means = [float(np.mean(list(dice_by_case(run).values()))) for run in seeds.values()]
            spread = f"{max(means) - min(means):.2f}" if len(means) > 1 else ""
            base_spread = f"{max(baseline_means) - min(baseline_means):.2f}" if len(baseline_means) > 1 else ""
            if trainer == reference:
                lines.append(f"| {count} | {trainer} (baseline) | {len(means)} | "
                             f"{', '.join(f'{m:.2f}' for m in means)} |  | {spread} |  |  |  |")
                continue
            c = paired_comparison(seed_average(seeds.values()), baseline_cases)
            lines.append(f"| {count} | {trainer} | {len(means)} | {', '.join(f'{m:.2f}' for m in means)} | "
                         f"{np.mean(means) - np.mean(baseline_means):+.2f} | {spread} | {base_spread} | "
                         f"{c['mean']:+.2f}, {c['wins']}/{c['n']}, [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | "
                         f"{seed_verdict(means, baseline_means)} |")
    return lines


def summarize(rows: list[dict]) -> dict:
    """(labeled count, trainer) -> metric -> (mean, std) with Dice and Jaccard in %, plus 'gain' in Dice points over
    the group's baseline (``baseline_of``) and 'deployed' (what the checkpoint deploys); first runs (repeat 0)
    only."""
    summary, all_rows = {}, rows
    rows = first_runs(rows)  # the repeats are in the paired and seed tables, their count and spread here
    for key in dict.fromkeys((r["num_labeled"], r["trainer"]) for r in rows):
        selected = [r for r in rows if (r["num_labeled"], r["trainer"]) == key]
        stats = {"deployed": "/".join(sorted({str(r.get("deployed", "")) for r in selected})),
                 # the run's epochs (selftrain: teacher and students); rows written before the column: None
                 "train_seconds": float(selected[0]["train_seconds"]) if selected[0].get("train_seconds") else None}
        for metric in METRICS:
            values = np.array([r[metric] for r in selected], dtype=float)
            values = values * 100 if metric in ("dice", "jaccard") else values
            values = values[np.isfinite(values)]
            stats[metric] = (float(values.mean()), float(values.std())) if len(values) else (math.nan, math.nan)
        summary[key] = stats
    for (count, trainer), stats in summary.items():  # every seed of the trainer: how many, and their spread
        seeds = {}
        for r in all_rows:
            if (r["num_labeled"], r["trainer"]) == (count, trainer):
                seeds.setdefault(repeat_of(r), []).append(100 * float(r["dice"]))
        means = [float(np.mean(v)) for v in seeds.values()]
        stats["seeds"] = f"{len(means)}, spread {max(means) - min(means):.2f}" if len(means) > 1 else "1 (single seed)"
    references = {count: baseline_of([r for r in rows if r["num_labeled"] == count])
                  for count in dict.fromkeys(r["num_labeled"] for r in rows)}
    for (count, trainer), stats in summary.items():
        baseline = summary.get((count, references[count]))
        if baseline is not None and trainer != references[count]:
            stats["gain"] = stats["dice"][0] - baseline["dice"][0]
    return summary
