"""Benchmark cells: named, self-contained benchmark commands sized for one sitting on a machine.

A cell fixes the dataset, trainers, labeled count, fold, held-out protocol and schedule, so that results from
different machines and sessions merge in one ``nnUNetv2_semi_benchmark report``. ``run_cell`` does everything in
one call: copies and preprocesses the dataset into a work folder, trains the cell's runs side by side, predicts,
scores, packs the test predictions, and copies the results into the output folder after every finished run. With a
deadline it stops training early enough to predict and score what finished, so a command cut at its limit still
returns every finished run and the logs of the others (``unfinished/``).

Every LA cell holds out LA_064-LA_079 (the last 16 of the 80 training cases) as fold 0's validation set and takes
the first N cases as labeled (the papers' order), CPU and GPU alike, so their rows share one protocol; the schedules
differ and ``report`` keeps them apart.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass, field
from os.path import abspath, basename, dirname, isdir, isfile, join

import nnunet_semi
from nnunet_semi.errors import SemiInputError

METHODS = ("SGRS", "MeanTeacher", "CPS", "NPCal", "CIFP", "DualCCE", "BCP")
LA_NUM_VAL = 16
# GPU quality cells: one schedule for every trainer and cell. 1 000 iterations is what the heaviest methods reach
# beside two stock runs in the ~6 minutes of training a 9-minute command leaves (stock alone: ~15 it/s per run with
# three side by side on an H100); the papers' 6 000 do not fit. Provisional until the speed cell measures it.
GPU_EPOCHS, GPU_ITERATIONS = 4, 250
# CPU cells: the coarse mode's schedule (15 x 100 at 2.5 mm, a 16-128-feature U-Net), as in the committed CPU cells
CPU_EPOCHS, CPU_ITERATIONS = 15, 100
GPU_DEADLINE_S = 540  # a 10-minute command with a minute to copy the results back
SETUP_ESTIMATE_S = 60  # installing the wheels, copying and preprocessing LA (about 17 s with 16 processes), start-up


@dataclass(frozen=True)
class Cell:
    """One row of the cell table."""

    name: str
    kind: str  # "quality" or "speed"
    trainers: tuple[str, ...]  # besides stock nnUNetTrainer, always included
    dataset: str = "Dataset101_LA"  # a raw dataset folder name, or "tiny" (generated, no data needed)
    num_labeled: str = "4"
    fold: int = 0
    num_val: int | None = LA_NUM_VAL
    epochs: int = GPU_EPOCHS
    iterations: int = GPU_ITERATIONS
    coarse: bool = False
    repeats: int = 2  # stock is trained this many times: its run-to-run spread
    jobs: int = 3  # runs side by side on the device
    deadline_s: int | None = GPU_DEADLINE_S  # default --deadline; None: none
    reserve_s: int = 120  # held back from training for prediction, scoring and packing
    speed_steps: int = 20
    device: str = "gpu"  # what it is sized for
    note: str = field(default="", compare=False)


def _table() -> dict[str, Cell]:
    cells = [Cell("speed", "speed", tuple(f"nnUNetTrainer{m}" for m in METHODS), reserve_s=15,
                  note="every trainer on LA's own plans: step time with and without loading, peak memory, ratios")]
    for count in ("4", "8"):
        for method in METHODS:
            cells.append(Cell(f"la{count}-{method.lower()}", "quality", (f"nnUNetTrainer{method}",),
                              num_labeled=count, note=f"stock x2 and {method}, {count} labeled, LA's own plans"))
    for method in METHODS:
        cells.append(Cell(f"cpu-la4-{method.lower()}", "quality", (f"nnUNetTrainer{method}",), epochs=CPU_EPOCHS,
                          iterations=CPU_ITERATIONS, coarse=True, jobs=1, deadline_s=None, reserve_s=600,
                          device="cpu", note=f"stock x2 and {method} on the coarse mode (2.5 mm), 4 labeled; an "
                                             f"hour per stock run on 2 cores"))
    cells += [
        Cell("cpu-dryrun", "quality", ("nnUNetTrainerSGRS",), epochs=1, iterations=5, coarse=True, repeats=1,
             jobs=2, deadline_s=None, reserve_s=300, device="cpu",
             note="the whole sequence on LA in minutes on a CPU: one 5-iteration epoch, stock and SGRS, coarse"),
        Cell("tiny", "quality", ("nnUNetTrainerMeanTeacher",), dataset="tiny", num_labeled="2", num_val=None,
             epochs=1, iterations=4, repeats=1, jobs=2, deadline_s=None, reserve_s=60, device="cpu",
             note="a generated dataset and a 4-16-feature U-Net: the runner's test"),
    ]
    return {c.name: c for c in cells}


CELLS = _table()


def get_cell(name: str) -> Cell:
    if name not in CELLS:
        raise SemiInputError(f"unknown cell {name!r}; known cells: {', '.join(CELLS)}.")
    return CELLS[name]


def cell_table_markdown() -> str:
    """The table for the README."""
    lines = ["| cell | kind | trainers (with stock) | labeled | schedule | stock runs | side by side | deadline |",
             "|---|---|---|---|---|---|---|---|"]
    for c in CELLS.values():
        schedule = f"{c.speed_steps} steps" if c.kind == "speed" else \
            f"{c.epochs} x {c.iterations}{' coarse' if c.coarse else ''}"
        quality = c.kind == "quality"
        lines.append(f"| `{c.name}` | {c.kind} | {', '.join(t.removeprefix('nnUNetTrainer') for t in c.trainers)} | "
                     f"{c.num_labeled if quality else ''} | {schedule} | {c.repeats if quality else ''} | "
                     f"{c.jobs if quality else ''} | {'' if c.deadline_s is None else f'{c.deadline_s} s'} |")
    return "\n".join(lines)


def run_cell(name: str, out_dir: str, deadline_s: float | None = None, data: str | None = None,
             work_dir: str | None = None, started: float | None = None) -> str:
    """Run cell ``name``; returns the archive of its results in ``out_dir``.

    Args:
        deadline_s: seconds from ``started`` by which everything is in ``out_dir`` (None: the cell's default;
            0: none).
        data: the raw dataset folder (default ``data/<dataset>`` in the checkout); not for the tiny cell.
        work_dir: nnU-Net's raw, preprocessed and results folders and the predictions (default
            ``$TMPDIR/nnunet_semi_cells/<cell>``); kept, so that the same command again skips finished runs and
            resumes interrupted ones where the work folder survived.
        started: ``time.time()`` when the command started (the install before this call counts; default now).
    """
    cell = get_cell(name)
    started = time.time() if started is None else started
    deadline_s = cell.deadline_s if deadline_s is None else (deadline_s or None)
    stop_at = None if deadline_s is None else started + deadline_s
    if deadline_s is not None and deadline_s < cell.reserve_s + SETUP_ESTIMATE_S + 30:
        raise SemiInputError(f"--deadline {deadline_s:g}: too short to train anything in cell {name}, which holds "
                             f"{cell.reserve_s} s back for prediction and scoring and needs about "
                             f"{SETUP_ESTIMATE_S} s to set up; give at least {cell.reserve_s + SETUP_ESTIMATE_S + 30}.")
    work_dir = abspath(work_dir or join(os.environ.get("TMPDIR", "/tmp"), "nnunet_semi_cells", name))
    out_dir = abspath(out_dir)
    results = join(work_dir, "results")  # the benchmark's output folder; out_dir gets copies and the archive
    os.makedirs(results, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    _write_cell_json(cell, results, deadline_s)
    archive = join(out_dir, f"{name}.tar.gz")

    def publish() -> None:
        _publish(results, out_dir, archive)

    from nnunet_semi.data.dataset_io import use_nnunet_folders

    os.environ.setdefault("nnUNet_compile", "false")  # compiling costs minutes of a 9-minute command
    if cell.dataset == "tiny":
        from nnunet_semi.tools.benchmark.common import TINY_DATASET_ID, make_tiny_dataset

        raw = make_tiny_dataset(join(work_dir, "tiny_dataset"))
        dataset, plans, test_labels = TINY_DATASET_ID, "nnUNetDemoPlans", join(raw, "labelsTs")
    else:
        use_nnunet_folders(work_dir)
        dataset, plans, test_labels = _copy_dataset(cell.dataset, data), "nnUNetPlans", None
    # a checkpoint every epoch: a run stopped at the deadline resumes from its last epoch where the work folder stays
    configuration, extra, rampup, checkpoint_every = "3d_fullres", {}, None, 1
    if cell.coarse:
        from nnunet_semi.tools.benchmark.coarse import COARSE_RAMPUP_FRACTION, plan_coarse

        coarse = plan_coarse(dataset, num_processes=_processes())
        plans = coarse["plans"]
        rampup = round(COARSE_RAMPUP_FRACTION * cell.epochs * cell.iterations)
        extra = {"spacing_mm": "x".join(f"{s:g}" for s in coarse["spacing"]),
                 "patch_size": "x".join(map(str, coarse["patch_size"])), "batch_size": coarse["batch_size"],
                 "features": "-".join(map(str, coarse["features"]))}
    elif cell.dataset != "tiny":
        _plan_fullres(dataset, plans)
    extra["cell"] = name
    setup_done = time.time()
    print(f"cell {name}: set up in {setup_done - started:.0f} s" + ("" if stop_at is None else
          f"; {stop_at - setup_done:.0f} s left, training stops {cell.reserve_s} s before the deadline"))
    if stop_at is not None and stop_at - cell.reserve_s - setup_done < 30:
        raise SemiInputError(f"--deadline {deadline_s:g}: setting up took {setup_done - started:.0f} s, which leaves "
                             f"no time to train in cell {name}; give a longer deadline.")
    if cell.kind == "speed":
        from nnunet_semi.data.splits import make_labeled_split
        from nnunet_semi.tools.benchmark.speed import run_speed_benchmark

        make_labeled_split(dataset, int(cell.num_labeled), num_val=cell.num_val)
        run_speed_benchmark(dataset, list(cell.trainers), results, configuration, plans, steps=cell.speed_steps,
                            stop_at=None if stop_at is None else stop_at - cell.reserve_s)
    else:
        from nnunet_semi.tools.benchmark.quality import QualitySettings, run_quality_benchmark

        run_quality_benchmark(QualitySettings(
            dataset, [cell.num_labeled], list(cell.trainers), cell.epochs, cell.iterations, results, configuration,
            cell.fold, plans, test_labels, num_val=cell.num_val, repeats=cell.repeats, rampup_iterations=rampup,
            predict_test=test_labels is None, checkpoint_every=checkpoint_every, extra_columns=extra,
            score_members=True, jobs=cell.jobs, stop_training_at=None if stop_at is None else stop_at - cell.reserve_s,
            stop_at=stop_at, on_results_written=publish))
    publish()
    print(f"cell {name}: done in {time.time() - started:.0f} s; results in {out_dir}, all of them in {archive}")
    return archive


def _processes() -> int:
    return int(os.environ.get("nnUNet_def_n_proc", min(16, os.cpu_count() or 1)))


def _copy_dataset(dataset_name: str, data: str | None) -> str:
    """Copy the raw dataset into nnUNet_raw (once); images are read with nibabel where SimpleITK is missing (an
    offline GPU machine: see semi_lab.offline). Returns the dataset name."""
    from nnunet_semi.data.dataset_io import load_json, require_env_folder, save_json_atomic

    source = abspath(data or join(dirname(dirname(nnunet_semi.__file__)), "data", dataset_name))  # the checkout's
    if not isfile(join(source, "dataset.json")):
        raise SemiInputError(f"dataset folder {source} has no dataset.json: copy {dataset_name} there (nnU-Net raw "
                             f"format) or pass --data.")
    if basename(source.rstrip("/")) != dataset_name:
        raise SemiInputError(f"--data {source}: the cell trains {dataset_name}; give that dataset's folder.")
    target = join(require_env_folder("nnUNet_raw"), dataset_name)
    if not isdir(target):
        shutil.copytree(source, target + ".tmp", dirs_exist_ok=True)
        os.replace(target + ".tmp", target)
    if not _simpleitk_works():
        dataset_json = load_json(join(target, "dataset.json"))
        if dataset_json.get("overwrite_image_reader_writer") != "NibabelIO":
            save_json_atomic(dataset_json | {"overwrite_image_reader_writer": "NibabelIO"},
                             join(target, "dataset.json"))
            print(f"{dataset_name}: SimpleITK is missing here; images are read and written with NibabelIO")
    return dataset_name


def _simpleitk_works() -> bool:
    import SimpleITK

    return hasattr(SimpleITK, "ReadImage")  # the offline install's placeholder is empty


def _plan_fullres(dataset_name: str, plans: str) -> None:
    """nnU-Net's own planning and preprocessing of 3d_fullres (skipped when done)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    from nnunet_semi.data.dataset_io import require_env_folder

    preprocessed = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    dataset_id = int(dataset_name[len("Dataset"):].split("_")[0])
    if isdir(join(preprocessed, f"{plans}_3d_fullres")) and isfile(join(preprocessed, f"{plans}.json")):
        return
    extract_fingerprints([dataset_id], num_processes=_processes(), check_dataset_integrity=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], plans, configurations=("3d_fullres",), num_processes=(_processes(),))


def _write_cell_json(cell: Cell, results: str, deadline_s: float | None) -> None:
    from nnunet_semi.data.dataset_io import save_json_atomic

    save_json_atomic(asdict(cell) | {"deadline_s_used": deadline_s}, join(results, "cell.json"))


def _publish(results: str, out_dir: str, archive: str) -> None:
    """Copy the small top-level results into ``out_dir`` and pack the whole results folder (runs, unfinished runs'
    logs, tables; not the predictions' work folders) into ``archive``, each through a temporary file."""
    for name in sorted(os.listdir(results)):
        path = join(results, name)
        if isfile(path) and not name.endswith(".tmp"):
            shutil.copy2(path, join(out_dir, name + ".tmp"))
            os.replace(join(out_dir, name + ".tmp"), join(out_dir, name))
    tmp = archive + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(os.listdir(results)):
            if name not in ("predictions", "test_predictions", "tiny_dataset"):
                tar.add(join(results, name), arcname=name)
    os.replace(tmp, archive)


def describe(name: str) -> str:
    return json.dumps(asdict(get_cell(name)), indent=1)
