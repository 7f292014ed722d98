"""``results.png``: which trainer helps, by how much, how sure."""

from __future__ import annotations

import math
import textwrap

import numpy as np

from nnunet_semi.tools.benchmark.statistics import baseline_of, dice_by_case, paired_comparison, repeat_of, seed_average
from nnunet_semi.trainer.plotting import isolated_style


@isolated_style
def plot_results(rows: list[dict], filename: str) -> None:
    """Which trainer helps, by how much, how sure: left, each trainer's paired Dice gain over its group's baseline
    (one row per trainer and group, sorted), the seed-averaged gain with its 95 % bootstrap interval, each seed as a
    mark of its own, and the baseline's own seed spread as a band at zero; right, the per-case pairs (the
    baseline's Dice against the trainer's, one point per case, the diagonal: no change)."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    entries = []  # (group, trainer, seed gains, paired comparison, baseline spread (low, high), case pairs)
    for count in dict.fromkeys(r["num_labeled"] for r in rows):
        group = [r for r in rows if r["num_labeled"] == count]
        reference = baseline_of(group)
        runs = {}
        for r in group:
            runs.setdefault(r["trainer"], {}).setdefault(repeat_of(r), []).append(r)
        if reference not in runs:
            continue
        base = seed_average(runs[reference].values())
        base_mean = np.mean(list(base.values()))
        base_seeds = [np.mean([v for k, v in dice_by_case(run).items() if k in base]) - base_mean
                      for run in runs[reference].values()]
        for trainer, seeds in runs.items():
            if trainer == reference:
                continue
            averaged = seed_average(seeds.values())
            shared = [k for k in averaged if k in base]
            gains = [np.mean([dice_by_case(run)[k] - base[k] for k in shared if k in dice_by_case(run)])
                     for run in seeds.values()]
            entries.append((count, trainer, gains, paired_comparison(averaged, base), (min(base_seeds),
                            max(base_seeds)), [(base[k], averaged[k]) for k in shared]))
    entries.sort(key=lambda e: e[3]["mean"])
    columns = min(3, max(1, len(entries)))
    pair_rows = max(1, math.ceil(len(entries) / columns))
    fig = plt.figure(figsize=(7 + 3.2 * columns, max(4.0, 0.45 * len(entries) + 1.5, 3.0 * pair_rows)))
    grid = fig.add_gridspec(pair_rows, columns + 2)
    forest = fig.add_subplot(grid[:, :2])
    markers, labeled = "osD^v<>", set()
    for y, (count, trainer, gains, c, band, _) in enumerate(entries):
        forest.fill_between([band[0], band[1]], y - 0.4, y + 0.4, color="grey", alpha=0.25, linewidth=0)
        forest.plot([c["ci_low"], c["ci_high"]], [y, y], color="black", linewidth=1.5)
        for k, gain in enumerate(gains):  # seed k + 1: one colour and mark in every row
            forest.plot(gain, y, markers[k % len(markers)], color=f"C{k}", markersize=6,
                        label=None if k in labeled else f"seed {k + 1}")
            labeled.add(k)
    forest.set_yticks(range(len(entries)), [f"{e[1]} ({e[0]})" for e in entries], fontsize="small")
    if entries:
        forest.legend(fontsize="small", loc="lower right")
    forest.axvline(0, color="grey", linewidth=1)
    forest.set_xlabel("Dice gain over the baseline, its seeds averaged (points); line: 95 % CI of the\n"
                      "seed-averaged gain; marks: each seed; grey band: the baseline's own seed spread")
    forest.set_title("Which trainer helps, by how much, how sure", fontsize="medium")
    forest.grid(axis="x", alpha=0.3)
    for i, (count, trainer, _, c, _, pairs) in enumerate(reversed(entries)):
        ax = fig.add_subplot(grid[i // columns, 2 + i % columns])
        x, y = np.array(pairs).T
        low, high = min(x.min(), y.min()) - 2, max(x.max(), y.max()) + 2
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.scatter(x, y, s=14, color=np.where(y > x, "tab:green", "tab:red"), alpha=0.8)
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        name = "\n".join(textwrap.wrap(f"{trainer} ({count})", 34))
        ax.set_title(f"{name}\n{c['mean']:+.2f}, better on {c['wins']}/{c['n']}", fontsize="x-small")
        ax.tick_params(labelsize="x-small")
        if i % columns == 0:
            ax.set_ylabel("trainer's Dice %", fontsize="x-small")
        ax.set_xlabel("baseline's Dice %", fontsize="x-small")
    fig.tight_layout()
    fig.savefig(filename, dpi=110)
    plt.close(fig)
