"""``nnUNetv2_semi_benchmark quality``: segmentation quality of each trainer against labeled-only nnU-Net.

For every labeled count N: rewrite the split (``--order first`` by default), train every trainer on the same split
and schedule (stock ``nnUNetTrainer`` always included; ``all`` trains it alone on the full split, the supervised
upper bound), predict the held-out cases with nnU-Net's predictor and score them per foreground class with medpy:
Dice, Jaccard, 95 % Hausdorff distance and average surface distance, in mm (image spacing) and in voxels (the
papers' convention). Finished runs are skipped and interrupted ones resume from ``checkpoint_latest.pth``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import math
import os
import shutil
import sys
import tarfile
import textwrap
import time
from os.path import basename, dirname, isdir, isfile, join

import numpy as np
import torch

from nnunet_semi.data.dataset_io import require_env_folder, resolve_dataset_name
from nnunet_semi.errors import SemiInputError, SemiRunsFailed
from nnunet_semi.tools.benchmark.common import (
    BASELINE_TRAINER,
    CONTROL_TRAINER,
    load_plans_and_dataset_json,
    provenance,
    resolve_trainer,
    with_schedule,
)
from nnunet_semi.tools.benchmark.statistics import paired_comparison
from nnunet_semi.tools.benchmark.workspace import (
    check_identity,
    data_identity,
    files_digest,
    link_preprocessed_copy,
    short_hash,
)
from nnunet_semi.tools.progress import CommandProgress, captured_output, console_stream, log_tail
from nnunet_semi.trainer.plotting import isolated_style

METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")
SELFTRAIN = "selftrain"  # offline self-training in the trainer list: stock teacher, pseudo labels, stock student
# what must agree for two runs' numbers to be compared at all
PROTOCOL = ("dataset", "fold", "evaluated_on", "num_val")
# what makes two runs of the same trainer different experiments, never averaged together
SCHEDULE = ("plans", "configuration", "epochs", "iterations_per_epoch")
# in runs/<run>/: the scores of every model the run holds (--score_members), EMA pairs' and dual networks'
EMA_PAIR_SCORES, DUAL_MEMBER_SCORES = "ema_pair_scores.csv", "member_scores.csv"


def require_medpy() -> None:
    """The quality benchmark scores with medpy, an optional dependency (the ``benchmark`` extra)."""
    import importlib.util

    if importlib.util.find_spec("medpy") is None:
        raise SemiInputError("the quality benchmark scores with medpy, which is not installed: "
                             "pip install 'nnunet-semi[benchmark]' (or pip install medpy).")


def case_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...], label: int) -> dict:
    """medpy's binary metrics of one class; distances NaN when either mask is empty (undefined)."""
    from medpy.metric import binary

    pred, ref = prediction == label, reference == label
    both_empty = not pred.any() and not ref.any()
    result = {"dice": 1.0 if both_empty else float(binary.dc(pred, ref)),
              "jaccard": 1.0 if both_empty else float(binary.jc(pred, ref))}
    for unit, voxelspacing in (("mm", spacing), ("vox", None)):
        defined = pred.any() and ref.any()
        result[f"hd95_{unit}"] = float(binary.hd95(pred, ref, voxelspacing)) if defined else math.nan
        result[f"asd_{unit}"] = float(binary.asd(pred, ref, voxelspacing)) if defined else math.nan
    return result


def _held_out_cases(raw: str, dataset_json: dict, split: dict, test_labels: str | None) -> dict[str, tuple]:
    """case id -> (image files, reference label file)."""
    ending = dataset_json["file_ending"]
    channels = len(dataset_json["channel_names"])
    if test_labels is not None:
        ids = sorted(f[:-len(ending)] for f in os.listdir(test_labels) if f.endswith(ending))
        folder, label_folder = join(raw, "imagesTs"), test_labels
    else:
        ids, folder, label_folder = sorted(split["val"]), join(raw, "imagesTr"), join(raw, "labelsTr")
    cases = {}
    for case in ids:
        images = [join(folder, f"{case}_{c:04d}{ending}") for c in range(channels)]
        missing = [f for f in images + [join(label_folder, case + ending)] if not isfile(f)]
        if missing:
            raise SemiInputError(f"held-out case {case}: missing {missing}. Check --test_labels and imagesTs.")
        cases[case] = (images, join(label_folder, case + ending))
    return cases


def _fold_folder(trainer_cls: type, plans: dict, configuration: str, fold: int) -> str:
    """The run's nnU-Net output folder, by nnU-Net's own rule (``nnUNet_results/<dataset>/<trainer>__<plans>__<c>``)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return get_output_folder(plans["dataset_name"], trainer_cls.__name__, plans["plans_name"], configuration, fold)


def _train(trainer_cls: type, plans: dict, configuration: str, fold: int, dataset_json: dict,
           device: torch.device) -> str:
    """Train (or resume, or skip when finished); returns the fold's output folder."""
    output_folder = _fold_folder(trainer_cls, plans, configuration, fold)  # no trainer (it would open a log file)
    if isfile(join(output_folder, "checkpoint_final.pth")):
        print(f"{trainer_cls.__name__}: finished earlier, skipping training")
        return output_folder
    trainer = trainer_cls(plans | {"continue_training": True}, configuration, fold, dataset_json, device=device)
    trainer.initialize()
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth"):  # nnUNetv2_train --c's order after final
        if isfile(join(trainer.output_folder, name)):
            trainer.load_checkpoint(join(trainer.output_folder, name))
            break
    trainer.run_training()
    return trainer.output_folder


def _train_side_by_side(runs: list[tuple[str, tuple]], jobs: int, plans: dict, configuration: str, fold: int,
                        dataset_json: dict, device: torch.device, stop_at: float | None = None,
                        progress: CommandProgress | None = None, index: dict | None = None,
                        run_log=lambda run_name: None, environment: dict | None = None
                        ) -> tuple[list[str], list[tuple[str, Exception]]]:
    """Train ``runs`` ((trainer name, ``with_schedule`` arguments)) in up to ``jobs`` worker processes at once.

    Each worker leads a process group of its own (its data-loading workers inside), so that a run stopped at
    ``stop_at`` (a ``time.time()`` value) is killed whole; its last checkpoint is complete (every write is atomic),
    so the run resumes later. A worker's output goes to ``run_log(run name)`` (None: this console), and its epochs
    to ``progress`` (``index``: run name -> position there). Returns the run names stopped or never started by
    then, and the failed runs with their errors (the others went on)."""
    if not runs:
        return [], []
    import contextlib
    import multiprocessing
    from multiprocessing.connection import wait

    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    workers = min(jobs, len(runs))
    loaders_per_run = get_allowed_n_proc_DA() // workers
    threads_per_run = max(1, (os.cpu_count() or 1) // workers)
    print(f"training {len(runs)} run(s), {workers} side by side on {device}: {loaders_per_run} data-loading "
          f"worker(s) and {threads_per_run} CPU thread(s) each"
          + ("" if stop_at is None else f"; stopping at {time.strftime('%H:%M:%S', time.localtime(stop_at))}"))
    context = multiprocessing.get_context("spawn")
    pending, active, watches, failed = list(runs), {}, {}, []
    try:
        while pending or active:
            while pending and len(active) < workers:
                name, schedule = pending.pop(0)
                trainer_cls = with_schedule(resolve_trainer(name), *schedule)
                run_name = trainer_cls.__name__
                log = run_log(run_name)
                process = context.Process(target=_train_worker, name=run_name, args=(
                    name, schedule, plans, configuration, fold, dataset_json, str(device), loaders_per_run,
                    threads_per_run, log))
                if progress is not None:
                    if log:
                        progress.message(f"{run_name}: nnU-Net's output goes to {log}")
                    watches[process.name] = contextlib.ExitStack()
                    watches[process.name].enter_context(progress.watch(
                        index[run_name], _fold_folder(trainer_cls, plans, configuration, fold)))
                with _environment(environment or {}):  # spawn copies it: nnU-Net reads its paths at import
                    process.start()
                active[process.sentinel] = process
            timeout = None if stop_at is None else max(0.0, stop_at - time.time())
            for sentinel in wait(list(active), timeout):
                process = active.pop(sentinel)
                process.join()
                if process.name in watches:
                    watches.pop(process.name).close()
                if process.exitcode != 0:
                    log = run_log(process.name)
                    failed.append((process.name, RuntimeError(
                        f"training exited with code {process.exitcode}; its traceback is "
                        + (f"in {log}" if log else "above") + ", its nnU-Net log in the run's nnUNet_results folder")))
            if stop_at is not None and time.time() >= stop_at:
                stopped = [p.name for p in active.values()] + [_run_name(n, s) for n, s in pending]
                print(f"deadline: stopped {', '.join(stopped) or 'nothing'} (each resumes from its last checkpoint)")
                return stopped, failed
    finally:
        for process in active.values():  # the deadline, an error or Ctrl-C: no run outlives this call
            _kill_process_group(process)
        for watch in watches.values():
            watch.close()
    return [], failed


@contextlib.contextmanager
def _environment(variables: dict):
    """``os.environ`` with ``variables`` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_name(name: str, schedule: tuple, classes: dict | None = None) -> str:
    return with_schedule(classes[name] if classes else resolve_trainer(name), *schedule).__name__


def _kill_process_group(process) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.join()


def _train_worker(name: str, schedule: tuple, plans: dict, configuration: str, fold: int, dataset_json: dict,
                  device: str, data_loaders: int, threads: int, log_file: str | None = None) -> str:
    """One run in a worker process (the scheduled class is rebuilt here: dynamic classes do not pickle)."""
    os.setpgrp()  # its own process group: a deadline kills the run with its data-loading workers
    os.environ["nnUNet_n_proc_DA"] = str(data_loaders)
    torch.set_num_threads(threads)
    import traceback

    trainer_cls = with_schedule(resolve_trainer(name), *schedule)
    with captured_output(log_file):
        try:
            return _train(trainer_cls, plans, configuration, fold, dataset_json, torch.device(device))
        except BaseException:
            traceback.print_exc()  # into the run's log, which the failure report quotes
            sys.stderr.flush()
            raise


def _predict(trainer_cls: type, output_folder: str, plans: dict, configuration: str, dataset_json: dict,
             cases: dict, prediction_folder: str, device: torch.device, weights: dict | None = None,
             announce=None) -> None:
    """Predict ``cases`` (id -> (image files, ...)) into ``prediction_folder`` with nnU-Net's predictor, from the
    checkpoint's ``network_weights`` or from ``weights``; cases predicted earlier are kept. ``announce``: called
    with the number of cases left to predict, a context manager around their prediction (the progress line)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    checkpoint = final_checkpoint(output_folder)  # memory-mapped: a member given as weights reads none
    network = trainer_cls.build_network_architecture(
        plans_manager, cm, determine_num_input_channels(plans_manager, cm, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda",
                                allow_tqdm=False)
    weights = checkpoint["network_weights"] if weights is None else weights
    predictor.manual_initialization(network, plans_manager, cm, [weights], dataset_json,
                                    trainer_cls.__name__, checkpoint["inference_allowed_mirroring_axes"])
    os.makedirs(prediction_folder, exist_ok=True)
    todo = [c for c in cases if not isfile(join(prediction_folder, c + dataset_json["file_ending"]))]
    if todo:
        with announce(len(todo)) if announce is not None else contextlib.nullcontext():
            predictor.predict_from_files([cases[c][0] for c in todo], [join(prediction_folder, c) for c in todo],
                                         num_processes_preprocessing=1, num_processes_segmentation_export=1)


def final_checkpoint(output_folder: str) -> dict:
    """The run's ``checkpoint_final.pth``, memory-mapped: reading its logs or state touches no tensor data."""
    return torch.load(join(output_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False, mmap=True)


def _deployed_model(output_folder: str) -> str:
    """What ``checkpoint_final.pth`` deploys: the semi-supervised trainers' choice, or ``network`` (stock)."""
    checkpoint = final_checkpoint(output_folder)
    return checkpoint.get("semi_state", {}).get("deployed_weights", "network")


def training_seconds(output_folder: str) -> float:
    """Seconds the run spent in its epochs (nnU-Net's logged epoch start and end times; a resumed run's epochs
    counted once each), from ``checkpoint_final.pth``."""
    logged = final_checkpoint(output_folder)["logging"]
    return float(sum(end - start for start, end in zip(logged["epoch_start_timestamps"],
                                                        logged["epoch_end_timestamps"])))


def _score_run(cases: dict, prediction_folder: str, dataset_json: dict, labels: list[int], common: dict) -> list[dict]:
    """Rows of per-case, per-class metrics; images read with the dataset's own nnU-Net reader (e.g. NibabelIO where
    SimpleITK is missing), whose spacing follows its array axes."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    rows, reader = [], None
    for case, (_, label_file) in cases.items():
        reader = reader or determine_reader_writer_from_dataset_json(dataset_json, label_file, verbose=False)()
        reference, properties = reader.read_seg(label_file)
        prediction, _ = reader.read_seg(join(prediction_folder, case + dataset_json["file_ending"]))
        # (1, *spatial) -> spatial; a 2D image's added axis of size 1 is dropped, as medpy's surfaces need
        axes = [i for i, n in enumerate(reference.shape[1:]) if n > 1]
        reference, prediction = reference[0].squeeze(), prediction[0].squeeze()
        spacing = tuple(float(properties["spacing"][i]) for i in axes)
        for label in labels:
            rows.append({"trainer": common["trainer"], "num_labeled": common["num_labeled"], "case": case,
                         "class": label, **case_metrics(prediction, reference, spacing, label), **common})
    return rows


def _write_csv(rows: list[dict], filename: str) -> None:
    """All rows, columns in first-seen order; through a temporary file, so a killed run leaves no partial file."""
    fieldnames = list(dict.fromkeys(k for r in rows for k in r))
    tmp = f"{filename}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, filename)


def _read_csv(filename: str) -> list[dict]:
    with open(filename, newline="") as f:
        return list(csv.DictReader(f))


def _as_written(rows: list[dict]) -> list[dict]:
    """Rows as ``_read_csv`` gives them back (every value a string), so fresh and earlier runs compare alike."""
    return [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]


def scored_runs(out_dir: str) -> list[dict]:
    """The finished runs of a quality result folder, by run name: ``{"run", "rows", "pairs"}`` with the rows of
    ``runs/<run>/scores.csv`` and its ``_score_members`` rows; runs without scores (unfinished) are left out."""
    runs = []
    for scores_file in sorted(glob.glob(join(out_dir, "runs", "*", "scores.csv"))):
        rows = _read_csv(scores_file)
        if rows:
            runs.append({"run": basename(dirname(scores_file)), "rows": rows,
                         "pairs": read_member_scores(dirname(scores_file))})
    return runs


def earlier_runs(out_dir: str, own_runs: set[str], like: dict, ramp: str) -> tuple[list[dict], list[dict], list[str]]:
    """The scored runs in ``out_dir/runs`` that this command did not plan (``own_runs``: run names), so that its
    tables keep the rows of earlier commands, e.g. of a cell run one trainer at a time.

    Only runs comparable with ``like`` (a row of this command) are merged: the same split protocol (``PROTOCOL``)
    and schedule (``SCHEDULE``), and for the semi-supervised trainers the command's unsupervised ramp ``ramp`` (the
    ``rampup_iterations`` column: "" for each method's own). Returns their rows, their ``_score_members`` rows and
    the names of the runs left out, which ``nnUNetv2_semi_benchmark report`` merges with their schedule or ramp
    shown."""
    rows, pairs, left_out = [], [], []
    for run in scored_runs(out_dir):
        if run["run"] in own_runs:
            continue
        first = run["rows"][0]
        has_ramp = first["trainer"] not in (BASELINE_TRAINER, CONTROL_TRAINER, SELFTRAIN)
        if any(str(first.get(k, "")) != str(like.get(k, "")) for k in PROTOCOL + SCHEDULE) or \
                (has_ramp and str(first.get("rampup_iterations", "")) != ramp):
            left_out.append(run["run"])
            continue
        rows += run["rows"]
        pairs += run["pairs"]
    return rows, pairs, left_out


def read_member_scores(run_dir: str) -> list[dict]:
    """The ``_score_members`` rows a finished run left in ``run_dir`` (none if it was not scored so)."""
    return [row for name in (EMA_PAIR_SCORES, DUAL_MEMBER_SCORES) if isfile(join(run_dir, name))
            for row in _read_csv(join(run_dir, name))]


def _copy_logs(output_folder: str, destination: str) -> None:
    """The run's training logs, progress plots and debug.json (small)."""
    for name in sorted(os.listdir(output_folder)):
        if name.startswith("training_log") or name in ("progress.png", "progress_semi.png", "debug.json"):
            shutil.copy2(join(output_folder, name), join(destination, name))


def _keep_run_record(output_folder: str, run_dir: str) -> None:
    """Copy the run's training logs and progress plots (small) next to its scores, and write ``curves.csv``: every
    per-epoch value nnU-Net's logger kept (losses, pseudo Dice, learning rate, the semi-supervised terms and
    statistics), one row per epoch, from the final checkpoint."""
    _copy_logs(output_folder, run_dir)
    logged = final_checkpoint(output_folder)["logging"]
    scalars = {k: v for k, v in logged.items() if v and all(np.isscalar(x) for x in v)}
    epochs = min(len(v) for v in scalars.values())
    _write_csv([{"epoch": e} | {k: float(v[e]) for k, v in scalars.items()} for e in range(epochs)],
               join(run_dir, "curves.csv"))


def _keep_unfinished_record(trainer_cls: type, plans: dict, configuration: str, fold: int, dataset_json: dict,
                            out_dir: str) -> None:
    """A run stopped by the deadline: its training logs and progress plots so far, in ``unfinished/<run>/``."""
    output_folder = _fold_folder(trainer_cls, plans, configuration, fold)
    record = join(out_dir, "unfinished", trainer_cls.__name__)
    os.makedirs(record, exist_ok=True)
    if isdir(output_folder):
        _copy_logs(output_folder, record)
    print(f"{trainer_cls.__name__}: unfinished; its logs so far are in {record}")


def _announcer(progress: CommandProgress | None, position: int | None, what: str):
    """``_predict``'s ``announce`` for run ``position`` of ``progress`` (None: nothing announced)."""
    return None if progress is None else functools.partial(progress.predicting, position, what=what)


def _pack_test_predictions(trainer_cls: type, output_folder: str, plans: dict, configuration: str,
                           dataset_json: dict, raw: str, work_dir: str, archive: str, device: torch.device,
                           progress: CommandProgress | None = None, position: int | None = None) -> None:
    """Predict every ``imagesTs`` case (no labels needed) and pack the segmentations into ``archive`` (.tar.gz);
    the prediction announced on ``progress`` as run ``position``'s."""
    ending, channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    folder = join(raw, "imagesTs")
    if not isdir(folder):
        raise SemiInputError(f"--predict_test: {folder} does not exist; drop the option or add the test images.")
    ids = sorted({f[:-len(ending) - 5] for f in os.listdir(folder) if f.endswith(ending)})
    cases = {c: ([join(folder, f"{c}_{k:04d}{ending}") for k in range(channels)], None) for c in ids}
    _predict(trainer_cls, output_folder, plans, configuration, dataset_json, cases, work_dir, device,
             announce=_announcer(progress, position, "test images"))
    tmp = f"{archive}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w:gz") as tar:
        for c in ids:
            tar.add(join(work_dir, c + ending), arcname=c + ending)
    os.replace(tmp, archive)


def run_quality_benchmark(dataset_name_or_id: int | str, num_labeled: list[str], trainers: list[str], epochs: int,
                          iterations: int, out_dir: str, configuration: str = "3d_fullres", fold: int = 0,
                          plans_identifier: str = "nnUNetPlans", test_labels: str | None = None,
                          order: str = "first", seed: int = 12345, val_iterations: int | None = None,
                          device: torch.device | None = None, num_val: int | None = None, repeats: int = 1,
                          rampup_iterations: int | None = None, predict_test: bool = False,
                          checkpoint_every: int | None = None, extra_columns: dict | None = None,
                          score_members: bool = False, run_suffix: str = "", jobs: int = 1,
                          stop_training_at: float | None = None, stop_at: float | None = None,
                          on_results_written=None, selftrain_rounds: int = 1, verbose: bool = False,
                          stop_on_failure: bool = False, progress_stream=None, warm_start: bool = False,
                          method_repeats: int = 1) -> list[dict]:
    """Train, predict and score; writes ``results.csv``, ``results.md`` and ``results.png`` into ``out_dir``, with
    the runs of earlier commands into ``out_dir`` that share this one's split, schedule and ramp (``earlier_runs``).

    Args:
        dataset_name_or_id: a planned and preprocessed dataset (its ``imagesUnlabeled``, if any, preprocessed too).
        num_labeled: labeled counts as strings: integers, or ``"all"`` (stock nnU-Net on the full split).
        trainers: semi-supervised trainer names; ``nnUNetTrainer`` is always added as the baseline. ``selftrain``
            is offline self-training (``_self_training_run``), ``selftrain_rounds`` rounds.
        epochs, iterations: the schedule, identical for every trainer.
        out_dir: where results and predictions go. Each finished run leaves ``runs/<run>/scores.csv`` (and its
            training log); a run whose scores are there is not trained, predicted or scored again, so committing
            ``out_dir`` keeps finished runs across machines.
        test_labels: folder with the labels of ``imagesTs``; None: evaluate on the fold's validation cases.
        seed: seed of ``--order random`` and of every run (stock's repeat k: seed + k).
        num_val: hold out the last ``num_val`` training cases as the one validation fold (see ``make_labeled_split``).
        repeats: stock nnU-Net is trained this many times (seeds seed, seed + 1, ...): its run-to-run spread.
        rampup_iterations: one unsupervised ramp length in steps for every method (None: each method's own).
        predict_test: also predict ``imagesTs`` without labels and pack it as ``runs/<run>/test_predictions.tar.gz``.
        checkpoint_every: epochs between ``checkpoint_latest.pth`` writes (None: nnU-Net's).
        extra_columns: constant columns added to every row (e.g. the coarse mode's spacing).
        score_members: also score every model a run's checkpoint holds, whichever is deployed: the student and the
            EMA teacher (``ema_pair.csv`` and a table in ``results.md``), or a dual network's two networks and their
            ensemble (``dual_members.csv`` and a table) (``_score_members``).
        run_suffix: appended to the run names of the semi-supervised trainers (e.g. ``_ramp1500`` for a non-default
            ramp); stock nnU-Net has no ramp, so its runs keep their names and are shared.
        jobs: runs of one labeled count trained side by side as separate processes on the same device, the
            data-loading workers (``nnUNet_n_proc_DA``) and CPU threads split between them; prediction and scoring
            follow one run at a time. 1: one run after the other in this process.
        stop_training_at: a ``time.time()`` value; runs still training then are killed (in worker processes, also
            with ``jobs`` 1) and left to resume, their logs so far copied to ``unfinished/<run>/``.
        stop_at: no prediction or scoring is started after this time.
        on_results_written: called with no arguments each time the results files have been rewritten (after every
            scored run), e.g. to copy them off the machine.
        verbose: nnU-Net's output of every run on this console; else in ``out_dir/logs/<run>.txt`` (its path
            printed once) and the progress display alone here (``tools.progress``; ``progress_stream``: where).
        stop_on_failure: a failed run stops the command; else it is reported (its log's last lines and path), the
            other runs go on, and ``SemiRunsFailed`` lists the failures at the end, after the tables are written.
        warm_start: the warm-start mode. Stock nnU-Net trains from scratch on the labeled cases (the first run, seed
            ``seed``, is the start); every trainer then continues from its ``checkpoint_final.pth`` for the same
            schedule (``WarmStart``: every layer loaded, as ``-pretrained_weights``), and so does the control,
            ``nnUNetTrainer_warmStart`` (stock nnU-Net loaded the same way), ``repeats`` times: the baseline every
            trainer is paired against. A dual-network method's peer starts from the labeled-only run its
            ``peer_labeled_only_trainer`` names (stock nnU-Net: its second seed), trained here from scratch too.
            Self-training's student starts from the same checkpoint. Warm runs are named ``..._warm``.
        method_repeats: every trainer other than the baseline is trained this many times (seeds seed, seed + 1,
            ...): its own seed spread, shown next to its gain.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_semi.data.dataset_io import save_json_atomic
    from nnunet_semi.data.splits import SPLITS_FILE, full_splits, holdout_split, make_labeled_split

    require_medpy()  # before hours of training, not at the first score
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dataset_name = resolve_dataset_name(dataset_name_or_id)
    raw = join(require_env_folder("nnUNet_raw"), dataset_name)
    preprocessed = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    if not isfile(join(preprocessed, plans_identifier + ".json")):
        raise SemiInputError(f"{dataset_name} is not planned: run nnUNetv2_plan_and_preprocess -d "
                             f"{dataset_name_or_id} -c {configuration} (and nnUNetv2_semi_preprocess) first.")
    if test_labels is not None and not isdir(test_labels):
        raise SemiInputError(f"--test_labels {test_labels} is not a folder.")
    if repeats < 1 or method_repeats < 1:
        raise SemiInputError(f"--repeats {repeats} --method_repeats {method_repeats}: give at least 1 each.")
    if jobs < 1:
        raise SemiInputError(f"--jobs {jobs}: give at least 1 (1 trains one run after the other).")
    if num_val is not None and fold != 0:
        raise SemiInputError(f"-f {fold} with --num_val: the held-out split has one fold, 0.")
    plans, dataset_json = load_plans_and_dataset_json(preprocessed, plans_identifier)
    labels = PlansManager(plans).get_label_manager(dataset_json).foreground_labels
    methods = [t for t in trainers if t not in (BASELINE_TRAINER, CONTROL_TRAINER, SELFTRAIN)]
    all_trainers = [BASELINE_TRAINER] + methods
    classes = {t: resolve_trainer(t) for t in all_trainers}
    # warm-start mode: the labeled-only runs the methods' peers start from (stock: its second seed)
    peer_sources = {t: getattr(classes[t], "peer_labeled_only_trainer", None) for t in methods} if warm_start else {}
    # the labeled-only runs a method starts from instead of stock's (BCP's copy-paste pre-training)
    start_sources = {t: getattr(classes[t], "warm_start_trainer", None) for t in methods} if warm_start else {}
    for source in (set(peer_sources.values()) | set(start_sources.values())) - {None}:
        classes[source] = resolve_trainer(source)
    if warm_start:
        classes[CONTROL_TRAINER] = resolve_trainer(CONTROL_TRAINER)
    if selftrain_rounds < 1:
        raise SemiInputError(f"--selftrain_rounds {selftrain_rounds}: give at least 1.")
    info = provenance(device)
    val_iterations = val_iterations if val_iterations is not None else max(1, iterations // 5)
    os.makedirs(join(out_dir, "runs"), exist_ok=True)
    # the benchmark's own copy of the preprocessed folder: its trainings read the split from there, the dataset's
    # splits_final.json is never written (workspace.py)
    workspace_root = join(out_dir, "nnunet_preprocessed")
    workspace = link_preprocessed_copy(preprocessed, workspace_root)
    count_splits = {}
    for count in num_labeled:
        if count == "all":  # the full split: stock nnU-Net on every label, the upper bound
            full = full_splits(preprocessed, raw)
            count_splits[count] = holdout_split(full, num_val) if num_val is not None else full  # same held-out
        else:
            count_splits[count] = make_labeled_split(dataset_name, int(count), order, seed, num_val=num_val,
                                                     write_to=workspace)
        if fold >= len(count_splits[count]):
            raise SemiInputError(f"-f {fold}: the split of {count} labeled has folds 0 to "
                                 f"{len(count_splits[count]) - 1}.")
    test_digest = files_digest(test_labels, dataset_json["file_ending"])
    data_identities = {count: data_identity(splits[fold], order, seed, num_val, test_digest)
                       for count, splits in count_splits.items()}
    # in every row: what of the data identity a table needs (the split's hash stands for its cases)
    data_columns = {count: {"order": order, "split": short_hash(identity["split"]), "test_labels": test_digest}
                    for count, identity in data_identities.items()}
    if rampup_iterations is not None:
        print(f"unsupervised ramp for every method: sigmoid over {rampup_iterations} iterations "
              f"(of {epochs * iterations})")

    def schedule_of(repeat: int, tag: str, warm: tuple | None = None) -> tuple:
        """The arguments of ``with_schedule`` after the class: one run's schedule, seed and start."""
        return (epochs, iterations, val_iterations, tag + (f"_r{repeat}" if repeat else ""), rampup_iterations,
                seed + repeat, checkpoint_every, warm)

    def checkpoint_of(name: str, schedule: tuple) -> str:
        return join(_fold_folder(with_schedule(classes[name], *schedule), plans, configuration, fold),
                    "checkpoint_final.pth")

    def count_runs(count: str) -> list[tuple[str, int, tuple]]:
        """(name, repeat, schedule arguments of with_schedule) of one labeled count's runs, every run after the runs
        it starts from. Names: ``bench_<N>lab_<E>x<I>[_ramp<R>][_warm]_<hash of the data identity>[_r<k>]``."""
        data = short_hash(data_identities[count])

        def tag(extra: str = "") -> str:
            return f"bench_{count}lab_{epochs}x{iterations}{extra}_{data}"

        def ramped(name: str) -> str:  # stock has no ramp: its runs keep their names and are shared
            return run_suffix if hasattr(classes[name], "unsup_rampup_iterations") else ""

        if count == "all":
            return [(BASELINE_TRAINER, r, schedule_of(r, tag())) for r in range(repeats)]
        if not warm_start:
            return [(name, r, schedule_of(r, tag(ramped(name)))) for name in all_trainers
                    for r in range(repeats if name == BASELINE_TRAINER else method_repeats)]
        stock_seeds = 2 if BASELINE_TRAINER in peer_sources.values() else 1
        runs = [(BASELINE_TRAINER, r, schedule_of(r, tag())) for r in range(stock_seeds)]
        runs += [(source, 0, schedule_of(0, tag())) for source in
                 dict.fromkeys([*peer_sources.values(), *start_sources.values()])
                 if source not in (None, BASELINE_TRAINER)]
        stock_start = checkpoint_of(BASELINE_TRAINER, runs[0][2])
        for name in [CONTROL_TRAINER] + methods:
            source, own_start = peer_sources.get(name), start_sources.get(name)
            peer = None if source is None else checkpoint_of(
                source, schedule_of(1 if source == BASELINE_TRAINER else 0, tag()))
            start = stock_start if own_start is None else checkpoint_of(own_start, schedule_of(0, tag()))
            runs += [(name, r, schedule_of(r, tag(f"{ramped(name)}_warm"), (start, peer)))
                     for r in range(repeats if name == CONTROL_TRAINER else method_repeats)]
        return runs

    def identity_of(name: str, count: str, schedule: tuple) -> dict:
        """Everything a run's numbers depend on besides the code (``workspace``): recorded and checked."""
        return {"dataset": dataset_name, "plans": plans_identifier, "configuration": configuration, "fold": fold,
                "trainer": name, "num_labeled": count, **data_identities[count], "epochs": epochs,
                "iterations_per_epoch": iterations, "val_iterations_per_epoch": val_iterations,
                "rampup_iterations": rampup_iterations, "run_seed": schedule[5], **_warm_start_columns(schedule[-1])}

    planned = {count: count_runs(count) for count in num_labeled}
    entries, index = [], {}  # the progress display's runs; run name -> its position there
    for count, runs in planned.items():
        for name, repeat, schedule in runs:
            index[_run_name(name, schedule, classes)] = len(entries)
            warm = " warm" if schedule[-1] else ""
            entries.append((f"{name}{f' (repeat {repeat})' if repeat else ''}, {count} labeled{warm}", epochs))
        if SELFTRAIN in trainers and count != "all":
            for r in range(1, selftrain_rounds + 1):
                index[(SELFTRAIN, count, r)] = len(entries)
                entries.append((f"{SELFTRAIN} round {r} student{' (warm)' if warm_start else ''}, {count} labeled",
                                epochs))
    progress = CommandProgress(entries, progress_stream or (sys.stdout if verbose else console_stream()),
                               live=False if verbose else None)

    def run_log(run_name: str) -> str | None:
        return None if verbose else join(out_dir, "logs", f"{run_name}.txt")

    for count, runs in planned.items():  # a folder of another identity is refused before anything trains
        for name, _, schedule in runs:
            run_dir, identity = join(out_dir, "runs", _run_name(name, schedule, classes)), identity_of(name, count,
                                                                                                     schedule)
            results_dir = os.path.dirname(checkpoint_of(name, schedule))
            for folder, what in ((run_dir, "the run folder"), (results_dir, "the nnUNet_results folder")):
                if isdir(folder):
                    check_identity(folder, identity, what)
    rows, member_rows, failures = [], [], []
    # runs of earlier commands into the same folder stay in its tables; this command's own are recomputed
    own_runs = {key for key in index if isinstance(key, str)}
    if SELFTRAIN in trainers:
        own_runs |= {_selftrain_run_name(schedule[3], selftrain_rounds, warm_start) for runs in planned.values()
                     for name, repeat, schedule in runs if name == BASELINE_TRAINER and repeat == 0}
    left_out: list[str] = []  # earlier runs not comparable with this command's: named once at the end

    def write_tables() -> None:
        earlier, earlier_pairs, skipped = earlier_runs(
            out_dir, own_runs, rows[0], "" if rampup_iterations is None else str(rampup_iterations))
        left_out[:] = skipped
        write_results(rows + earlier, out_dir, member_rows + earlier_pairs)
        if on_results_written is not None:
            on_results_written()

    def failed(run_name: str, error: Exception) -> None:
        import traceback

        log = run_log(run_name)
        if log:
            with open(log, "a") as f:
                f.write("".join(traceback.format_exception(error)))
        tail = log_tail(log) if log else ""
        progress.message(f"{run_name}: FAILED: {type(error).__name__}: {error}"
                         + (f"\nlast lines of {log}:\n{tail}" if log else ""))
        failures.append(f"{run_name}: {type(error).__name__}: {error}" + (f" (log: {log})" if log else ""))
        if stop_on_failure:
            raise SemiRunsFailed(failures) from error

    for count, runs in planned.items():
        save_json_atomic(count_splits[count], join(workspace, SPLITS_FILE))  # the benchmark's copy, not the dataset's
        split = count_splits[count][fold]
        cases = _held_out_cases(raw, dataset_json, split, test_labels)
        # with test labels, the fold's validation cases are scored too, apart: the development cases
        development = _held_out_cases(raw, dataset_json, split, None) if test_labels else None
        stopped, side_failed = [], set()
        # every training in a worker process, which reads the benchmark's split (workspace.py); finished ones skipped
        pending = [(name, schedule) for name, _, schedule in runs
                   if not isfile(join(out_dir, "runs", _run_name(name, schedule, classes), "scores.csv"))
                   and not isfile(checkpoint_of(name, schedule))]
        for name, schedule in pending:  # recorded where the run trains
            check_identity(os.path.dirname(checkpoint_of(name, schedule)), identity_of(name, count, schedule),
                           "the nnUNet_results folder")
        # the runs others start from (warm-start mode) finish before those start
        for phase in ([p for p in pending if p[1][-1] is None], [p for p in pending if p[1][-1] is not None]):
            if stopped:  # the deadline came in the first phase
                stopped += [_run_name(name, schedule, classes) for name, schedule in phase]
                continue
            stopped, side_failures = _train_side_by_side(
                phase, jobs, plans, configuration, fold, dataset_json, device, stop_training_at,
                progress=progress, index=index, run_log=run_log,
                environment={"nnUNet_preprocessed": workspace_root})
            for run_name, error in side_failures:
                failed(run_name, error)
            side_failed |= {run_name for run_name, _ in side_failures}
        for name, repeat, schedule in runs:
            trainer_cls = with_schedule(classes[name], *schedule)
            run_dir = join(out_dir, "runs", trainer_cls.__name__)
            scores_file, archive = join(run_dir, "scores.csv"), join(run_dir, "test_predictions.tar.gz")
            if trainer_cls.__name__ in side_failed:  # reported already
                continue
            if trainer_cls.__name__ in stopped:
                _keep_unfinished_record(trainer_cls, plans, configuration, fold, dataset_json, out_dir)
                continue
            if isfile(scores_file) and (not predict_test or isfile(archive)):
                print(f"{trainer_cls.__name__}: scored earlier ({scores_file}), skipping")
                progress.skip(index[trainer_cls.__name__])
                run_rows = _read_csv(scores_file)
                rows += run_rows
                if score_members:  # its predictions' output into the run's log, like the run's own
                    with captured_output(run_log(trainer_cls.__name__)):
                        member_rows += _score_members(trainer_cls, run_rows[0], run_dir, cases, out_dir, plans,
                                                      configuration, dataset_json, labels, device, progress,
                                                      index[trainer_cls.__name__])
                continue
            if stop_at is not None and time.time() >= stop_at:
                print(f"deadline: {trainer_cls.__name__} finished training but is not predicted or scored; run "
                      f"the same command again to score it")
                continue
            log = run_log(trainer_cls.__name__)
            if log:
                progress.message(f"{trainer_cls.__name__}: nnU-Net's output goes to {log}")
            common = {"trainer": name, "num_labeled": count, "repeat": repeat, "dataset": dataset_name,
                      "configuration": configuration, "plans": plans_identifier, "fold": fold,
                      "num_val": len(cases) if test_labels is None else "", "epochs": epochs,
                      "iterations_per_epoch": iterations,
                      "rampup_iterations": "" if rampup_iterations is None else rampup_iterations,
                      "seed": seed + repeat, **_warm_start_columns(schedule[-1]), **data_columns[count],
                      "case_set": "test" if test_labels else "development",
                      "evaluated_on": "imagesTs" if test_labels else f"fold {fold} val", **(extra_columns or {}),
                      **info}
            try:
                with captured_output(log):
                    run_rows = _train_and_score(trainer_cls, plans, configuration, fold, dataset_json, device, cases,
                                                labels, out_dir, raw, predict_test, common, progress,
                                                index[trainer_cls.__name__], development)
                    rows += run_rows
                    run_rows = [r for r in run_rows if r["case_set"] == common["case_set"]]  # members: headline
                    check_identity(run_dir, identity_of(name, count, schedule), "the run folder")  # recorded
                    if score_members:
                        member_rows += _score_members(trainer_cls, run_rows[0], run_dir, cases, out_dir, plans,
                                                      configuration, dataset_json, labels, device, progress,
                                                      index[trainer_cls.__name__])
            except Exception as error:  # the others go on (--stop_on_failure: not)
                failed(trainer_cls.__name__, error)
                continue
            write_tables()  # after every run: a stopped command keeps its tables
        if SELFTRAIN in trainers and count != "all":
            teacher_schedule = next(schedule for name, repeat, schedule in runs
                                    if name == BASELINE_TRAINER and repeat == 0)
            run_name = _selftrain_run_name(teacher_schedule[3], selftrain_rounds, warm_start)
            log = run_log(run_name)
            try:
                selftrain_rows = _self_training_run(
                    dataset_name, count, teacher_schedule, selftrain_rounds, plans, plans_identifier,
                    configuration, fold, dataset_json, cases, labels, out_dir, raw, device, predict_test, stop_at,
                    {"num_val": len(cases) if test_labels is None else "", "rampup_iterations": "",
                     "evaluated_on": "imagesTs" if test_labels else f"fold {fold} val", **data_columns[count],
                     "case_set": "test" if test_labels else "development", **(extra_columns or {}), **info},
                    progress, index, log, warm_start, splits_file=join(workspace, SPLITS_FILE),
                    development_cases=development)
            except Exception as error:
                failed(run_name, error)
                selftrain_rows = []
            if selftrain_rows:
                rows += selftrain_rows
                write_tables()
    if rows:
        write_tables()
        if left_out:
            print(f"results.md leaves out {len(left_out)} earlier run(s) of another split, schedule or ramp in "
                  f"{join(out_dir, 'runs')} ({', '.join(left_out)}); nnUNetv2_semi_benchmark report {out_dir} -o "
                  f"<folder> tabulates every run, each schedule and ramp apart.")
    else:
        print("no run finished: nothing to tabulate")
    if failures:
        raise SemiRunsFailed(failures)
    return rows


def _train_and_score(trainer_cls: type, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device, cases: dict, labels: list[int], out_dir: str, raw: str,
                     predict_test: bool, common: dict, progress: CommandProgress, position: int,
                     development_cases: dict | None = None) -> list[dict]:
    """Train one run (followed on the progress display), predict and score its held-out cases (and, where test
    cases are scored, the ``development_cases`` apart, ``case_set`` "development"), keep its record; ``scores.csv``
    is written last, so that its presence means the run is complete."""
    output_folder = _watched_train(trainer_cls, plans, configuration, fold, dataset_json, device, progress, position)
    run_dir = join(out_dir, "runs", trainer_cls.__name__)
    predictions = join(out_dir, "predictions", trainer_cls.__name__)
    _predict(trainer_cls, output_folder, plans, configuration, dataset_json, cases, predictions, device,
             announce=_announcer(progress, position, f"{common['case_set']} cases"))
    common = common | {"deployed": _deployed_model(output_folder),
                       "train_seconds": round(training_seconds(output_folder), 1)}
    run_rows = _as_written(_score_run(cases, predictions, dataset_json, labels, common))
    if development_cases:
        development = join(out_dir, "predictions", f"{trainer_cls.__name__}__development")
        _predict(trainer_cls, output_folder, plans, configuration, dataset_json, development_cases, development,
                 device, announce=_announcer(progress, position, "development cases"))
        run_rows += _as_written(_score_run(development_cases, development, dataset_json, labels,
                                           common | {"case_set": "development"}))
    os.makedirs(run_dir, exist_ok=True)
    _keep_run_record(output_folder, run_dir)
    if predict_test:
        _pack_test_predictions(trainer_cls, output_folder, plans, configuration, dataset_json, raw,
                               join(out_dir, "test_predictions", trainer_cls.__name__),
                               join(run_dir, "test_predictions.tar.gz"), device, progress, position)
    _write_csv(run_rows, join(run_dir, "scores.csv"))
    return run_rows


def _watched_train(trainer_cls: type, plans: dict, configuration: str, fold: int, dataset_json: dict,
                   device: torch.device, progress: CommandProgress, position: int) -> str:
    """``_train`` with its epochs on the progress display (a finished run: marked done, nothing to follow)."""
    folder = _fold_folder(trainer_cls, plans, configuration, fold)
    if isfile(join(folder, "checkpoint_final.pth")):
        progress.skip(position)
        return _train(trainer_cls, plans, configuration, fold, dataset_json, device)
    with progress.watch(position, folder):
        return _train(trainer_cls, plans, configuration, fold, dataset_json, device)


def _derived_dataset_id(name: str) -> int:
    """The id of ``Dataset<id>_<name>`` if an earlier run made or began it (resume), else the highest id that no
    dataset uses in nnUNet_raw, nnUNet_preprocessed or nnUNet_results."""
    import re

    roots = [require_env_folder(v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")]
    used = set()
    for root in roots:
        for entry in os.listdir(root):
            match = re.fullmatch(r"\.?Dataset(\d{3})_(.+?)(\.incomplete)?", entry)
            if match:
                if match.group(2) == name:  # made or begun earlier (a begun one is staged afresh)
                    return int(match.group(1))
                used.add(int(match.group(1)))
    free = [i for i in range(999, 0, -1) if i not in used]
    if not free:
        raise SemiInputError("selftrain: every nnU-Net dataset id 1-999 is in use; free one for the derived dataset.")
    return free[0]


def _selftrain_run_name(tag: str, rounds: int, warm: bool = False) -> str:
    return f"{SELFTRAIN}__{tag}{'_warm' if warm else ''}_{rounds}round{'s' if rounds > 1 else ''}"


def _run_of_checkpoint(checkpoint: str | None) -> str:
    """The run name (``<Trainer>__<tag>``) of a run's ``.../<run>__<plans>__<configuration>/fold_k/checkpoint``."""
    return "" if checkpoint is None else basename(dirname(dirname(checkpoint))).rsplit("__", 2)[0]


def _warm_start_columns(warm: tuple | None) -> dict:
    """A row's start: the runs whose checkpoints it warm-started from (empty: from scratch)."""
    start, peer = warm if warm is not None else (None, None)
    return {"warm_start_from": _run_of_checkpoint(start), "peer_warm_start_from": _run_of_checkpoint(peer)}


def _self_training_run(dataset_name: str, count: str, teacher_schedule: tuple, rounds: int, plans: dict,
                       plans_identifier: str, configuration: str, fold: int, dataset_json: dict, cases: dict,
                       labels: list[int], out_dir: str, raw: str, device: torch.device, predict_test: bool,
                       stop_at: float | None, columns: dict, progress: CommandProgress, index: dict,
                       log: str | None, warm: bool = False, splits_file: str | None = None,
                       development_cases: dict | None = None) -> list[dict]:
    """``selftrain`` in the trainer list: offline self-training scored like every trainer.

    The teacher is this count's first stock run (trained here if its checkpoint is not on this machine). Each round
    pseudo-labels the fold's unlabeled cases with the previous model into a derived dataset (``pseudolabel_dataset``
    with its defaults: voxels below 0.9 ensemble probability ignored, every case kept), plans and preprocesses it
    with the source's plans (``prepare_student_dataset``) and trains stock nnU-Net on it with the same schedule and
    seed. The last student predicts the same held-out cases; ``train_seconds`` is the teacher's plus every
    student's. Resumable at every step; the derived datasets stay in nnUNet_raw/_preprocessed/_results (named
    ``<source>_selftrain_<count>lab_<epochs>x<iterations>_round<r>``, a free id chosen). Its output goes to ``log``
    (None: this console), its students' epochs to ``progress``. ``warm``: every student is
    ``nnUNetTrainer_warmStart`` started from the teacher's checkpoint (the warm-start mode's form)."""
    from nnunet_semi.tools.self_training import prepare_student_dataset, pseudolabel_dataset, run_logged

    epochs, iterations, val_iterations, tag, _, seed, checkpoint_every, _ = teacher_schedule
    run_name = _selftrain_run_name(tag, rounds, warm)
    run_dir = join(out_dir, "runs", run_name)
    scores_file, archive = join(run_dir, "scores.csv"), join(run_dir, "test_predictions.tar.gz")
    if isfile(scores_file) and (not predict_test or isfile(archive)):
        print(f"{run_name}: scored earlier ({scores_file}), skipping")
        for r in range(1, rounds + 1):
            progress.skip(index[(SELFTRAIN, count, r)])
        return _read_csv(scores_file)
    if stop_at is not None and time.time() >= stop_at:
        print(f"deadline: {run_name} not started; run the same command again to train it")
        return []
    if log:
        progress.message(f"{run_name}: nnU-Net's output goes to {log}")
    stock = resolve_trainer(BASELINE_TRAINER)
    teacher_cls = with_schedule(stock, *teacher_schedule)
    with captured_output(log):
        teacher_folder = _fold_folder(teacher_cls, plans, configuration, fold)  # trained with the count's runs
        if not isfile(join(teacher_folder, "checkpoint_final.pth")):
            raise RuntimeError(f"its teacher, {teacher_cls.__name__} (stock nnU-Net's first run), did not finish "
                               f"training")
        seconds = training_seconds(teacher_folder)
        os.makedirs(run_dir, exist_ok=True)
        commands_log = join(run_dir, "selftrain_commands.log")
        source = dataset_name.split("_", 1)[1]
        model_folder, model_folds, model_cls = os.path.dirname(teacher_folder), (fold,), teacher_cls
        for round_index in range(1, rounds + 1):
            name = f"{source}_selftrain_{tag.removeprefix('bench_')}_round{round_index}"
            derived_id = _derived_dataset_id(name)
            derived = f"Dataset{derived_id:03d}_{name}"
            if not isfile(join(require_env_folder("nnUNet_raw"), derived, "dataset.json")):
                progress.message(f"{run_name}: round {round_index}, pseudo labels of {model_folder} -> {derived}")
                pseudolabel_dataset(dataset_name, BASELINE_TRAINER, configuration, derived_id, name,
                                    plans=plans_identifier, fold=fold, folds=model_folds, device=device.type,
                                    num_processes=1, model_folder=model_folder, trainer_class=model_cls,
                                    splits_file=splits_file)
            prepare_student_dataset(dataset_name, derived_id, plans_identifier, configuration, 1,
                                    lambda command: run_logged(command, commands_log))
            student_plans, student_json = load_plans_and_dataset_json(
                join(require_env_folder("nnUNet_preprocessed"), derived), plans_identifier)
            start = (join(teacher_folder, "checkpoint_final.pth"), None) if warm else None
            student_cls = with_schedule(resolve_trainer(CONTROL_TRAINER) if warm else stock, epochs, iterations,
                                        val_iterations, f"{tag}_selftrain_round{round_index}{'_warm' if warm else ''}",
                                        None, seed, checkpoint_every, start)
            student_folder = _watched_train(student_cls, student_plans, configuration, 0, student_json, device,
                                            progress, index[(SELFTRAIN, count, round_index)])
            seconds += training_seconds(student_folder)
            model_folder, model_folds, model_cls = os.path.dirname(student_folder), (0,), student_cls
        predictions = join(out_dir, "predictions", run_name)
        _predict(student_cls, student_folder, student_plans, configuration, student_json, cases, predictions,
                 device, announce=_announcer(progress, index[(SELFTRAIN, count, rounds)], "held-out cases"))
        common = {"trainer": SELFTRAIN, "num_labeled": count, "repeat": 0, "deployed": f"student of round {rounds}",
                  "dataset": dataset_name, "configuration": configuration, "plans": plans_identifier, "fold": fold,
                  "epochs": epochs, "iterations_per_epoch": iterations, "seed": seed, "selftrain_rounds": rounds,
                  **_warm_start_columns((join(teacher_folder, "checkpoint_final.pth"), None) if warm else None),
                  **columns, "train_seconds": round(seconds, 1)}
        run_rows = _as_written(_score_run(cases, predictions, dataset_json, labels, common))
        if development_cases:
            development = f"{predictions}__development"
            _predict(student_cls, student_folder, student_plans, configuration, student_json, development_cases,
                     development, device)
            run_rows += _as_written(_score_run(development_cases, development, dataset_json, labels,
                                               common | {"case_set": "development"}))
        _keep_run_record(student_folder, run_dir)
        if predict_test:
            _pack_test_predictions(student_cls, student_folder, student_plans, configuration, student_json, raw,
                                   join(out_dir, "test_predictions", run_name), archive, device, progress,
                                   index[(SELFTRAIN, count, rounds)])
        _write_csv(run_rows, scores_file)  # last: its presence means the run is complete
    return run_rows


def _score_members(trainer_cls: type, run_row: dict, run_dir: str, cases: dict, out_dir: str, plans: dict,
                   configuration: str, dataset_json: dict, labels: list[int], device: torch.device,
                   progress: CommandProgress | None = None, position: int | None = None) -> list[dict]:
    """Every model one run's checkpoint holds, each scored on the held-out cases (rows with ``scored_model``): the
    student and the EMA teacher (``runs/<run>/ema_pair_scores.csv``), or a dual network's two networks and, where
    it deploys one, their ensemble (``member_scores.csv``). From the file when it exists, else from the run's
    checkpoint if it is still there; the deployed model's predictions are the run's own, not predicted twice."""
    scored = read_member_scores(run_dir)
    if scored:
        return scored
    output_folder = _fold_folder(trainer_cls, plans, configuration, int(run_row["fold"]))
    if not isfile(join(output_folder, "checkpoint_final.pth")):
        return []
    members = trainer_cls.member_weights(final_checkpoint(output_folder)) \
        if hasattr(trainer_cls, "member_weights") else {}  # the trainer says what it holds; stock: one network
    scores_file = join(run_dir, EMA_PAIR_SCORES if "teacher" in members else DUAL_MEMBER_SCORES)
    rows = []
    deployed_predictions = join(out_dir, "predictions", trainer_cls.__name__)
    for member, weights in members.items():
        predictions = join(out_dir, "predictions", f"{trainer_cls.__name__}__{member}")
        if member == run_row["deployed"] and all(
                isfile(join(deployed_predictions, case + dataset_json["file_ending"])) for case in cases):
            predictions = deployed_predictions  # the run's own predictions are this member's: not predicted twice
        else:
            _predict(trainer_cls, output_folder, plans, configuration, dataset_json, cases, predictions, device,
                     weights, announce=_announcer(progress, position, f"held-out cases with the run's {member}"))
        common = {k: v for k, v in run_row.items() if k not in ("case", "class", *METRICS)} | {"scored_model": member}
        rows += _as_written(_score_run(cases, predictions, dataset_json, labels, common))
    if rows:
        _write_csv(rows, scores_file)
    return rows


def _where_and_when(rows: list[dict]) -> str:
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
    ``member_rows`` are given (``_score_members``) the teacher against the student, ema_pair.csv, and each network of
    a dual-network run against what it deploys, dual_members.csv) and results.png."""
    if not rows:
        raise SemiInputError("no results to write: no trainer produced predictions.")
    _write_csv(rows, join(out_dir, "results.csv"))
    rows = [r | {"num_labeled": table_group(r)} for r in rows]
    member_rows = [r | {"num_labeled": table_group(r)} for r in member_rows or []]
    headline, development = split_case_sets(rows)
    info = headline[0]
    lines = [f"# Quality: {info['dataset']}, {info['configuration']}, fold {info['fold']}, evaluated on "
             f"{info['evaluated_on']}", "",
             f"Schedule {info['epochs']} epochs x {info['iterations_per_epoch']} iterations for every trainer; "
             f"{_where_and_when(rows)}. Mean ± std over cases (and foreground classes); distances are NaN-excluded "
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
        _write_csv(ema_pairs, join(out_dir, "ema_pair.csv"))
    if dual_members:
        _write_csv(dual_members, join(out_dir, "dual_members.csv"))
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
    """``_score_members`` rows split into EMA pairs' (a ``teacher`` scored) and dual networks' (a ``peer``), run by
    run."""
    runs = {}
    for r in rows:
        runs.setdefault((r["num_labeled"], r["trainer"], r.get("repeat", "")), []).append(r)
    ema, dual = [], []
    for run in runs.values():
        (ema if any(r["scored_model"] == "teacher" for r in run) else dual).extend(run)
    return ema, dual


def member_tables(rows: list[dict]) -> list[str]:
    """Markdown lines (each table after a blank line) for ``_score_members`` rows: ``ema_pair_table`` and
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
        member = {m: _dice_by_case([r for r in run if r["scored_model"] == m])
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
        member = {m: _dice_by_case([r for r in run if r["scored_model"] == m]) for m in ("student", "teacher")}
        deployed = run[0]["deployed"]
        c = paired_comparison(member["teacher"], member["student"])
        means = {m: np.mean(list(v.values())) if v else math.nan for m, v in member.items()}
        lines.append(f"| {count} | {trainer} | {deployed} | {means['student']:.2f} | {means['teacher']:.2f} | "
                     f"{c['mean']:+.2f} | {c['median']:+.2f} | {c['wins']} | {c['losses']} | "
                     f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {c['p_wilcoxon']:.3f} |")
    return lines


def _repeat(row: dict) -> int:
    return int(row.get("repeat") or 0)  # results written before repeats existed have no column


def first_runs(rows: list[dict]) -> list[dict]:
    """The rows of every trainer's first run (stock's repeats left out)."""
    return [r for r in rows if _repeat(r) == 0]


def _dice_by_case(rows: list[dict]) -> dict:
    """case -> Dice in % of one run's rows, the mean over the case's foreground classes: the paired statistics take
    one sample per case (a case's classes are not independent samples)."""
    per_case = {}
    for r in rows:
        per_case.setdefault(r["case"], []).append(100 * float(r["dice"]))
    return {case: float(np.mean(values)) for case, values in per_case.items()}


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


def table_group(row: dict, label: str | None = None) -> str:
    """The group a row is tabulated and paired in: its labeled count (or ``label``), marked ``· warm`` for a run
    warm-started from a checkpoint: warm runs are never averaged or paired with runs from scratch."""
    return (label or str(row["num_labeled"])) + (" · warm" if row.get("warm_start_from") else "")


def baseline_of(group_rows: list[dict]) -> str:
    """The trainer a group's runs are paired against: the warm-start control where the group has it, else stock."""
    return CONTROL_TRAINER if any(r["trainer"] == CONTROL_TRAINER for r in group_rows) else BASELINE_TRAINER


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
            runs.setdefault((r["trainer"], _repeat(r)), []).append(r)
        reference = baseline_of(group)
        if (reference, 0) not in runs:
            continue
        baseline = _dice_by_case(runs[(reference, 0)])
        for (trainer, repeat), run in runs.items():
            if (trainer, repeat) == (reference, 0):
                continue
            c = paired_comparison(_dice_by_case(run), baseline)
            label = f"{trainer} (repeat {repeat})" if repeat else trainer
            lines.append(f"| {count} | {label} | {c['n']} | {c['mean']:+.2f} | {c['median']:+.2f} | {c['wins']} | "
                         f"{c['losses']} | [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {c['p_wilcoxon']:.3f} |")
    return lines


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
            per_trainer.setdefault(r["trainer"], {}).setdefault(_repeat(r), []).append(r)
        if reference not in per_trainer:
            continue
        baseline = per_trainer[reference]
        baseline_means = [float(np.mean(list(_dice_by_case(run).values()))) for run in baseline.values()]
        baseline_cases = _seed_average(baseline.values())
        for trainer, seeds in per_trainer.items():
            means = [float(np.mean(list(_dice_by_case(run).values()))) for run in seeds.values()]
            spread = f"{max(means) - min(means):.2f}" if len(means) > 1 else ""
            base_spread = f"{max(baseline_means) - min(baseline_means):.2f}" if len(baseline_means) > 1 else ""
            if trainer == reference:
                lines.append(f"| {count} | {trainer} (baseline) | {len(means)} | "
                             f"{', '.join(f'{m:.2f}' for m in means)} |  | {spread} |  |  |  |")
                continue
            c = paired_comparison(_seed_average(seeds.values()), baseline_cases)
            lines.append(f"| {count} | {trainer} | {len(means)} | {', '.join(f'{m:.2f}' for m in means)} | "
                         f"{np.mean(means) - np.mean(baseline_means):+.2f} | {spread} | {base_spread} | "
                         f"{c['mean']:+.2f}, {c['wins']}/{c['n']}, [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | "
                         f"{seed_verdict(means, baseline_means)} |")
    return lines


def _seed_average(runs) -> dict:
    """(case, class) -> Dice in %, averaged over several runs (seeds) of one trainer; the cases all share."""
    per_run = [_dice_by_case(run) for run in runs]
    shared = set.intersection(*(set(d) for d in per_run))
    return {key: float(np.mean([d[key] for d in per_run])) for key in sorted(shared)}


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
                seeds.setdefault(_repeat(r), []).append(100 * float(r["dice"]))
        means = [float(np.mean(v)) for v in seeds.values()]
        stats["seeds"] = f"{len(means)}, spread {max(means) - min(means):.2f}" if len(means) > 1 else "1 (single seed)"
    references = {count: baseline_of([r for r in rows if r["num_labeled"] == count])
                  for count in dict.fromkeys(r["num_labeled"] for r in rows)}
    for (count, trainer), stats in summary.items():
        baseline = summary.get((count, references[count]))
        if baseline is not None and trainer != references[count]:
            stats["gain"] = stats["dice"][0] - baseline["dice"][0]
    return summary


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
            runs.setdefault(r["trainer"], {}).setdefault(_repeat(r), []).append(r)
        if reference not in runs:
            continue
        base = _seed_average(runs[reference].values())
        base_mean = np.mean(list(base.values()))
        base_seeds = [np.mean([v for k, v in _dice_by_case(run).items() if k in base]) - base_mean
                      for run in runs[reference].values()]
        for trainer, seeds in runs.items():
            if trainer == reference:
                continue
            averaged = _seed_average(seeds.values())
            shared = [k for k in averaged if k in base]
            gains = [np.mean([_dice_by_case(run)[k] - base[k] for k in shared if k in _dice_by_case(run)])
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
