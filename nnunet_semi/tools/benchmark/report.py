"""``nnUNetv2_semi_benchmark report``: merge quality-benchmark result folders of one dataset and split protocol into
one table and one plot, schedules kept apart, every run with its provenance, and the cells still missing listed."""

from __future__ import annotations

import os
from os.path import isdir, join

from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.benchmark.common import BASELINE_TRAINER, CONTROL_TRAINER, SELFTRAIN, semi_trainers
from nnunet_semi.tools.benchmark.plots import plot_results
from nnunet_semi.tools.benchmark.records import PROTOCOL, SCHEDULE, scored_runs, write_csv
from nnunet_semi.tools.benchmark.statistics import WARM_GROUP_SUFFIX, repeat_of, table_group
from nnunet_semi.tools.benchmark.tables import case_sets_statement, member_tables, split_case_sets, summary_tables


def _runs_of(folder: str) -> list[dict]:
    if not isdir(join(folder, "runs")):
        raise SemiInputError(f"{folder} has no runs/ folder: give result folders of nnUNetv2_semi_benchmark quality.")
    return [run | {"folder": folder} for run in scored_runs(folder)]


def merge_results(folders: list[str], out_dir: str) -> list[dict]:
    """Merge the runs of ``folders`` into ``out_dir`` (results.csv, results.md, results.png); returns the rows.

    Runs are identified by run name and commit: the same run copied into two folders counts once, while the same
    trainer at two commits is kept as two rows, labeled ``<trainer> @<commit>``. Labeled counts are shown with
    their schedule (``4 · 15x100``) so that runs of different schedules are never averaged or paired together;
    within a schedule every trainer is paired against stock nnU-Net's repeat 0 and stock's repeats show its
    run-to-run spread.
    """
    runs = [run for folder in folders for run in _runs_of(folder)]
    if not runs:
        raise SemiInputError(f"no finished runs (runs/*/scores.csv) in {', '.join(folders)}.")
    protocols = {tuple(str(run["rows"][0].get(k, "")) for k in PROTOCOL): run["folder"] for run in runs}
    if len(protocols) > 1:
        described = "; ".join(f"{folder}: " + ", ".join(f"{k} {v}" for k, v in zip(PROTOCOL, protocol))
                              for protocol, folder in protocols.items())
        raise SemiInputError(f"the folders hold different datasets or split protocols and cannot be merged: "
                             f"{described}.")
    unique = {}
    for run in runs:
        unique.setdefault((run["run"], run["rows"][0].get("commit", "")), run)
    runs = list(unique.values())

    variants = {}  # (trainer, count, schedule) -> the (commit, ramp) pairs present
    for run in runs:
        first = run["rows"][0]
        variants.setdefault((first["trainer"], table_group(first), _schedule(first)), set()).add(_variant(first))
    rows, pairs, provenance = [], [], []
    for run in runs:
        first = run["rows"][0]
        present = variants[(first["trainer"], table_group(first), _schedule(first))]
        suffix = ""
        if first["trainer"] not in (BASELINE_TRAINER, CONTROL_TRAINER):  # stock: no ramp, commits train the same
            commit, ramp = _variant(first)
            if len({c for c, _ in present}) > 1:
                suffix += f" @{commit}"
            if len({r for _, r in present}) > 1:
                suffix += f" ramp {ramp or 'own'}"
        label = {"num_labeled": table_group(first, f"{first['num_labeled']} · {first['epochs']}x"
                                                   f"{first['iterations_per_epoch']}"),
                 "trainer": first["trainer"] + suffix, "source": run["folder"]}
        rows += [r | label for r in run["rows"]]
        pairs += [r | label for r in run["pairs"]]
        provenance.append((label["num_labeled"], label["trainer"], repeat_of(first), first.get("commit", ""),
                           first.get("device", ""), first.get("date", ""), first.get("seed", ""),
                           first.get("rampup_iterations", ""), _known(first, "order"), _known(first, "split"),
                           first.get("warm_start_from", "") or "scratch", run["run"], run["folder"]))
    _check_one_split_per_group(rows)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, join(out_dir, "results.csv"))
    headline, development = split_case_sets(rows)
    info = headline[0]
    lines = [f"# Quality, merged: {info['dataset']}, fold {info['fold']}, evaluated on {info['evaluated_on']}", "",
             f"From {', '.join(f'`{f}`' for f in folders)}. Labeled counts carry their schedule (epochs x iterations "
             f"per epoch): rows of different schedules are never averaged or paired. A trainer run at several "
             f"commits or unsupervised ramps is one row each (`@commit`, `ramp N`). Mean ± std over cases; gain: "
             f"Dice points over {BASELINE_TRAINER} of the same labeled count and schedule (`warm`: runs warm-started "
             f"from its first run, over {CONTROL_TRAINER}, stock nnU-Net continued the same way); training min: the "
             f"run's epochs (selftrain: teacher and students), blank for runs scored before it was recorded.", "",
             case_sets_statement(headline, development), ""]
    lines += summary_tables(headline, voxel_distances=False)
    if development:
        lines += ["", "## Development cases", ""] + summary_tables(development, voxel_distances=False)
    lines += member_tables(pairs)
    lines += ["", "Provenance of every run.", "",
              "| labeled · schedule | trainer | repeat | commit | device | date | seed | ramp | order | split | "
              "start | "
              "run | folder |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(str(v) for v in entry)} |" for entry in sorted(provenance, key=str)]
    lines += ["", *_missing_cells(rows)]
    with open(join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_results(headline, join(out_dir, "results.png"))
    return rows


def _known(row: dict, key: str) -> str:
    """A run's identity field, or "unknown" where its folder predates the field (never guessed)."""
    return str(row.get(key) or "unknown")


def _check_one_split_per_group(rows: list[dict]) -> None:
    """Runs paired in one table group must share their split: a one-line error naming the two splits where the
    known split hashes of a group differ (older runs, whose split is unknown, are not refused)."""
    splits = {}
    for r in rows:
        if r.get("split"):
            splits.setdefault(r["num_labeled"], {}).setdefault(r["split"], r["source"])
    for group, found in splits.items():
        if len(found) > 1:
            raise SemiInputError(f"the runs of {group} were trained on different splits ("
                                 + ", ".join(f"{split} in {folder}" for split, folder in found.items())
                                 + "): they cannot be paired; report them from separate folders.")


def _variant(row: dict) -> tuple[str, str]:
    """(commit, unsupervised ramp) of a run: what may differ between runs of one trainer and schedule."""
    return str(row.get("commit", "")), str(row.get("rampup_iterations", ""))


def _schedule(row: dict) -> tuple:
    return tuple(str(row.get(k, "")) for k in SCHEDULE)


def _missing_cells(rows: list[dict]) -> list[str]:
    """Markdown lines: the (labeled · schedule, trainer) cells without a run, over every count seen and every
    trainer registered (stock, each method and self-training, so a method never run is named too) or seen (a
    variant or a start trainer: only in the mode, warm or from scratch, it ran in), and the counts where stock has
    no second run (its spread unmeasured)."""
    counts = list(dict.fromkeys(r["num_labeled"] for r in rows))

    def warm(count: str) -> bool:
        return count.endswith(WARM_GROUP_SUFFIX)

    def baseline(count: str) -> str:  # a warm group's baseline is the control, never stock from scratch
        return CONTROL_TRAINER if warm(count) else BASELINE_TRAINER

    modes: dict[str, set[bool]] = {}  # a trainer seen -> the modes it ran in
    for row in rows:
        modes.setdefault(row["trainer"].split(" @")[0], set()).add(warm(row["num_labeled"]))
    registered = [*semi_trainers(), SELFTRAIN]
    present = {(r["num_labeled"], r["trainer"].split(" @")[0]) for r in rows}
    missing = [f"`{trainer}` at {count}" for count in counts
               for trainer in dict.fromkeys([baseline(count), *registered, *modes])
               if (count, trainer) not in present and not count.startswith("all")
               and (trainer in registered or trainer == baseline(count) or warm(count) in modes.get(trainer, ()))]
    unrepeated = [count for count in counts
                  if not any(r["num_labeled"] == count and r["trainer"] == baseline(count) and repeat_of(r) > 0
                             for r in rows)]
    lines = ["Cells still missing: " + (", ".join(missing) if missing else "none") + "."]
    if unrepeated:
        lines.append(f"The baseline has a single run (no spread measured) at: {', '.join(unrepeated)}.")
    return lines


README_BEGIN = "<!-- nnUNetv2_semi_benchmark report: begin -->"
README_END = "<!-- nnUNetv2_semi_benchmark report: end -->"


def write_into_readme(results_md: str, readme: str, command: str) -> None:
    """Replace the block between ``README_BEGIN`` and ``README_END`` in ``readme`` with the merged
    ``results_md`` (its title dropped) and the command that produced it; one atomic write."""
    text = open(readme).read()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or \
            text.index(README_BEGIN) > text.index(README_END):
        raise SemiInputError(f"{readme} needs exactly one '{README_BEGIN}' line followed by one '{README_END}' "
                             f"line around the block that report may rewrite.")
    body = open(results_md).read().split("\n", 1)[1].strip()
    block = f"{README_BEGIN}\n<!-- produced by: {command}; edits here are overwritten -->\n\n{body}\n\n{README_END}"
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    tmp = f"{readme}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text[:start] + block + text[end:])
    os.replace(tmp, readme)
