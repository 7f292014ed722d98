"""Paired statistics of two runs scored on the same cases: does a method beat stock nnU-Net case by case?

A mean over a handful of held-out cases hides whether a method wins on most cases or on a few; differences between
two runs on the *same* cases cancel the case difficulty that dominates the per-case spread, so they are compared
pairwise: mean and median difference, wins out of N, a percentile-bootstrap interval of the mean difference and a
two-sided Wilcoxon signed-rank test.
"""

from __future__ import annotations

import math

import numpy as np

from nnunet_semi.tools.benchmark.common import BASELINE_TRAINER, CONTROL_TRAINER

BOOTSTRAP_RESAMPLES = 10_000


def paired_comparison(method: dict, baseline: dict, seed: int = 0, confidence: float = 0.95) -> dict:
    """Compare two runs on the keys (cases, or case x class) that both scored.

    Args:
        method, baseline: key -> score (higher is better, e.g. Dice in %); keys present in only one are ignored,
            non-finite scores too.
        seed: seed of the bootstrap resampling (fixed, so that a report is reproducible).
        confidence: coverage of the bootstrap interval.

    Returns:
        ``n``, ``mean``, ``median`` (of method - baseline), ``wins`` / ``losses`` / ``ties`` (cases where the method
        is higher / lower / equal), ``ci_low``, ``ci_high`` (percentile bootstrap of the mean difference) and
        ``p_wilcoxon`` (two-sided; 1.0 when every difference is zero, NaN with fewer than 2 cases).
    """
    keys = [k for k in method if k in baseline and math.isfinite(method[k]) and math.isfinite(baseline[k])]
    diffs = np.array([method[k] - baseline[k] for k in keys], dtype=np.float64)
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": math.nan, "median": math.nan, "wins": 0, "losses": 0, "ties": 0,
                "ci_low": math.nan, "ci_high": math.nan, "p_wilcoxon": math.nan}
    rng = np.random.default_rng(seed)
    boot = diffs[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(1)
    alpha = (1 - confidence) / 2
    return {"n": n, "mean": float(diffs.mean()), "median": float(np.median(diffs)),
            "wins": int((diffs > 0).sum()), "losses": int((diffs < 0).sum()), "ties": int((diffs == 0).sum()),
            "ci_low": float(np.quantile(boot, alpha)), "ci_high": float(np.quantile(boot, 1 - alpha)),
            "p_wilcoxon": wilcoxon_p(diffs)}


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zeros dropped, scipy's default)."""
    from scipy.stats import wilcoxon

    if len(diffs) < 2:
        return math.nan
    if not np.any(diffs != 0):
        return 1.0
    return float(wilcoxon(diffs).pvalue)


def repeat_of(row: dict) -> int:
    return int(row.get("repeat") or 0)  # results written before repeats existed have no column


def first_runs(rows: list[dict]) -> list[dict]:
    """The rows of every trainer's first run (stock's repeats left out)."""
    return [r for r in rows if repeat_of(r) == 0]


def dice_by_case(rows: list[dict]) -> dict:
    """case -> Dice in % of one run's rows, the mean over the case's foreground classes: the paired statistics take
    one sample per case (a case's classes are not independent samples)."""
    per_case = {}
    for r in rows:
        per_case.setdefault(r["case"], []).append(100 * float(r["dice"]))
    return {case: float(np.mean(values)) for case, values in per_case.items()}


def seed_average(runs) -> dict:
    """(case, class) -> Dice in %, averaged over several runs (seeds) of one trainer; the cases all share."""
    per_run = [dice_by_case(run) for run in runs]
    shared = set.intersection(*(set(d) for d in per_run))
    return {key: float(np.mean([d[key] for d in per_run])) for key in sorted(shared)}


WARM_GROUP_SUFFIX = " · warm"


def table_group(row: dict, label: str | None = None) -> str:
    """The group a row is tabulated and paired in: its labeled count (or ``label``), marked ``· warm`` for a run
    warm-started from a checkpoint: warm runs are never averaged or paired with runs from scratch."""
    return (label or str(row["num_labeled"])) + (WARM_GROUP_SUFFIX if row.get("warm_start_from") else "")


def baseline_of(group_rows: list[dict]) -> str:
    """The trainer a group's runs are paired against: the warm-start control where the group has it, else stock."""
    return CONTROL_TRAINER if any(r["trainer"] == CONTROL_TRAINER for r in group_rows) else BASELINE_TRAINER


def seed_verdict(seeds: list[float], baseline_seeds: list[float]) -> str:
    """"beats" where every seed's mean Dice is above every baseline seed's (it beats the baseline's own spread),
    "loses" where every one is below, "within the spread" otherwise; "single seed" / "baseline single seed" where
    a side has one run (no spread measured: no claim)."""
    if len(seeds) < 2:
        return "single seed"
    if len(baseline_seeds) < 2:
        return "baseline single seed"
    if min(seeds) > max(baseline_seeds):
        return "beats"
    if max(seeds) < min(baseline_seeds):
        return "loses"
    return "within the spread"
