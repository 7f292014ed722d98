"""Training the benchmark's runs: nnU-Net's trainer on a scheduled class, resumed or skipped, in worker processes
side by side (each its own process group, killed whole at a deadline), with the environment the benchmark gives
them (its own copy of the preprocessed folder)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from os.path import isfile, join

import torch

from nnunet_semi.tools.benchmark.common import resolve_trainer, with_schedule
from nnunet_semi.tools.progress import CommandProgress, captured_output


def fold_folder(trainer_cls: type, plans: dict, configuration: str, fold: int) -> str:
    """The run's nnU-Net output folder, by nnU-Net's own rule (``nnUNet_results/<dataset>/<trainer>__<plans>__<c>``)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return get_output_folder(plans["dataset_name"], trainer_cls.__name__, plans["plans_name"], configuration, fold)


def train_run(trainer_cls: type, plans: dict, configuration: str, fold: int, dataset_json: dict,
           device: torch.device) -> str:
    """Train (or resume, or skip when finished); returns the fold's output folder."""
    output_folder = fold_folder(trainer_cls, plans, configuration, fold)  # no trainer (it would open a log file)
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


def train_side_by_side(runs: list[tuple[str, tuple]], jobs: int, plans: dict, configuration: str, fold: int,
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
                        index[run_name], fold_folder(trainer_cls, plans, configuration, fold)))
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
                stopped = [p.name for p in active.values()] + [run_name(n, s) for n, s in pending]
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


def run_name(name: str, schedule: tuple, classes: dict | None = None) -> str:
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
            return train_run(trainer_cls, plans, configuration, fold, dataset_json, torch.device(device))
        except BaseException:
            traceback.print_exc()  # into the run's log, which the failure report quotes
            sys.stderr.flush()
            raise


def watched_train(trainer_cls: type, plans: dict, configuration: str, fold: int, dataset_json: dict,
                   device: torch.device, progress: CommandProgress, position: int) -> str:
    """``train_run`` with its epochs on the progress display (a finished run: marked done, nothing to follow)."""
    folder = fold_folder(trainer_cls, plans, configuration, fold)
    if isfile(join(folder, "checkpoint_final.pth")):
        progress.skip(position)
        return train_run(trainer_cls, plans, configuration, fold, dataset_json, device)
    with progress.watch(position, folder):
        return train_run(trainer_cls, plans, configuration, fold, dataset_json, device)
