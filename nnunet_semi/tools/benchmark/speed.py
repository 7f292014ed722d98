"""``nnUNetv2_semi_benchmark speed``: time per training iteration and peak memory, as ratios to stock nnU-Net.

Every trainer is measured at the same plans, configuration and labeled batch, each in a fresh process (so peak
memory is its own), one after the other in one run: the median step time with data loading (nnU-Net's background
augmentation, labeled and unlabeled) and without it (one batch held on the device, as nnU-Net's
``*_noDataLoading`` benchmark trainers do), and the peak memory (GPU memory on CUDA, process RSS on CPU).
"""

from __future__ import annotations

import csv
import itertools
import math
import multiprocessing
import os
import resource
import statistics
import time
from os.path import join

import torch

from nnunet_semi.data.dataset_io import require_env_folder, resolve_dataset_name
from nnunet_semi.tools.benchmark.common import (
    BASELINE_TRAINER,
    load_plans_and_dataset_json,
    provenance,
    resolve_trainer,
    with_schedule,
)
from nnunet_semi.trainer.plotting import isolated_style


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(trainer, next_batch, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        trainer.train_step(next_batch())
        _synchronize(trainer.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reset_peak_rss() -> None:
    """Restart the process's peak-RSS mark (Linux), so that importing torch does not set the peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def measure_trainer(trainer_name: str, dataset_name: str, configuration: str, plans_identifier: str, steps: int,
                    warmup: int, device_type: str, env: dict, compute_only: bool = False) -> dict:
    """Median seconds per step with and without data loading and the peak memory (MB) of one trainer (runs in a
    fresh process). ``compute_only``: the steps with loading are not timed (NaN)."""
    os.environ.update(env)
    device = torch.device(device_type)
    preprocessed = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    plans, dataset_json = load_plans_and_dataset_json(preprocessed, plans_identifier)
    trainer_cls = with_schedule(resolve_trainer(trainer_name), 1000, steps + warmup, 1, "speed")
    trainer = trainer_cls(plans | {"continue_training": False}, configuration, 0, dataset_json, device=device)
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()
    with_loading = float("nan") if compute_only else \
        _timed_steps(trainer, lambda: next(trainer.dataloader_train), steps, warmup)

    batch = next(trainer.dataloader_train)
    batch = {"data": batch["data"].to(device), "target": [t.to(device) for t in batch["target"]]
             if isinstance(batch["target"], list) else batch["target"].to(device)}
    unlabeled_loader = getattr(trainer, "dataloader_unlabeled", None)
    if unlabeled_loader is not None:  # hold one unlabeled batch on the device as well
        held = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(unlabeled_loader).items()}
        trainer.dataloader_unlabeled = itertools.repeat(held)
    without_loading = _timed_steps(trainer, lambda: batch, steps, warmup)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = _peak_rss_mb()
    for loader in (trainer.dataloader_train, trainer.dataloader_val, unlabeled_loader):
        if hasattr(loader, "_finish"):
            loader._finish()
    return {"trainer": trainer_name, "step_s_with_loading": with_loading, "step_s_without_loading": without_loading,
            "peak_memory_mb": peak_mb, "batch_size": trainer.batch_size,
            "patch_size": "x".join(map(str, trainer.configuration_manager.patch_size))}


def _send_result(connection, function, args) -> None:
    try:
        connection.send(("ok", function(*args)))
    except BaseException as e:  # report the failure to the parent instead of dying silently
        connection.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        connection.close()


def _in_fresh_process(function, *args):
    """function(*args) in a new spawned, non-daemonic process (it may start nnU-Net's augmentation workers)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_send_result, args=(sender, function, args))
    process.start()
    sender.close()
    try:
        status, value = receiver.recv()
    except EOFError:
        status, value = "error", f"the measuring process died (exit code {process.join() or process.exitcode})"
    process.join()
    if status != "ok":
        raise RuntimeError(f"measuring {args[0]} failed: {value}")
    return value


def run_speed_benchmark(dataset_name_or_id: int | str, trainers: list[str], out_dir: str,
                        configuration: str = "3d_fullres", plans_identifier: str = "nnUNetPlans", steps: int = 20,
                        warmup: int = 3, device: torch.device | None = None,
                        stop_at: float | None = None, compute_only: bool = False, verbose: bool = False,
                        stop_on_failure: bool = False) -> list[dict]:
    """Measure stock nnU-Net and every trainer; writes speed.csv, speed.md and speed.png into ``out_dir``, after
    every trainer (a stopped command keeps what it measured).

    The dataset's split must give fold 0 unlabeled cases (``nnUNetv2_semi_split``) or it must have preprocessed
    ``imagesUnlabeled``. ``stop_at`` (a ``time.time()`` value): no trainer is started after it. ``compute_only``
    times only the steps without loading: on a CPU the augmentation workers share the cores with the network, so
    the time with loading says nothing about a GPU, and skipping it halves the run at large plans.

    Each trainer's own output goes to ``out_dir/logs/<trainer>.txt`` (``verbose``: here); a line per trainer says
    which is measured, how long it took and the time left (the mean measured so far times the trainers left). A
    failed trainer is reported with its log's last lines and the others go on (``stop_on_failure``: not; stock
    failing stops the command, as every ratio needs it); ``SemiRunsFailed`` lists the failures at the end.
    """
    from nnunet_semi.errors import SemiRunsFailed
    from nnunet_semi.tools.progress import captured_output, format_duration, log_tail

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dataset_name = resolve_dataset_name(dataset_name_or_id)
    names = [BASELINE_TRAINER] + [t for t in trainers if t != BASELINE_TRAINER]
    env = {k: v for k, v in os.environ.items() if k.startswith("nnUNet")}
    rows, info = [], provenance(device)
    os.makedirs(out_dir, exist_ok=True)
    durations, failures = [], []
    for i, name in enumerate(names):  # a fresh process per trainer: its peak memory is its own
        if stop_at is not None and time.time() >= stop_at:
            print(f"deadline: not measured: {', '.join(names[i:])}")
            break
        log = None if verbose else join(out_dir, "logs", f"{name}.txt")
        print(f"trainer {i + 1}/{len(names)} {name}: {warmup} + {steps} steps"
              + ("" if log is None else f" (its output: {log})"), flush=True)
        started = time.time()
        try:
            with captured_output(log):
                row = _in_fresh_process(measure_trainer, name, dataset_name, configuration, plans_identifier, steps,
                                        warmup, device.type, env, compute_only)
        except Exception as error:
            print(f"{name}: FAILED: {type(error).__name__}: {error}"
                  + ("" if log is None else f"\nlast lines of {log}:\n{log_tail(log)}"), flush=True)
            failures.append(f"{name}: {type(error).__name__}: {error}" + ("" if log is None else f" (log: {log})"))
            if stop_on_failure or not rows:  # every ratio is to stock
                raise SemiRunsFailed(failures) from error
            continue
        durations.append(time.time() - started)
        left = sum(durations) / len(durations) * (len(names) - i - 1)
        print(f"{name}: {row['step_s_with_loading']:.3f} s/step with loading, "
              f"{row['step_s_without_loading']:.3f} s/step without, {row['peak_memory_mb']:.0f} MB; measured in "
              f"{format_duration(durations[-1])}, time left {format_duration(left)}", flush=True)
        for key in ("step_s_with_loading", "step_s_without_loading", "peak_memory_mb"):
            row[f"{key}_ratio"] = row[key] / (rows[0] if rows else row)[key]
        row.update(dataset=dataset_name, configuration=configuration, plans=plans_identifier, steps=steps,
                   warmup=warmup, **info)
        rows.append(row)
        write_speed_results(rows, out_dir)
    if failures:
        raise SemiRunsFailed(failures)
    return rows


@isolated_style
def write_speed_results(rows: list[dict], out_dir: str) -> None:
    with open(join(out_dir, "speed.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    info = rows[0]
    memory = "process RSS (training process, peak mark reset after start-up)" if info["device"].startswith("cpu") \
        else "GPU memory (max allocated)"
    lines = [f"# Speed: {info['dataset']}, {info['configuration']} ({info['plans']}), patch {info['patch_size']}, "
             f"labeled batch {info['batch_size']}", "",
             f"Median over {info['steps']} steps after {info.get('warmup', 3)} warm-up steps, each trainer in its own "
             f"process, one after the other in one run; ratios to nnUNetTrainer measured in the same run. Peak "
             f"memory: {memory} while training. Commit {info['commit']}, nnU-Net {info['nnunetv2']}, "
             f"torch {info['torch']}, device {info['device']}, {info['date']}.", "",
             "| trainer | s/step with loading | ratio | s/step without loading | ratio | peak MB | ratio |",
             "|---|---|---|---|---|---|---|"]
    def cell(value: float, digits: int) -> str:
        return "not timed" if math.isnan(value) else f"{value:.{digits}f}"  # NaN: --compute_only

    for r in rows:
        lines.append(f"| {r['trainer']} | {cell(r['step_s_with_loading'], 3)} | "
                     f"{cell(r['step_s_with_loading_ratio'], 2)} | {r['step_s_without_loading']:.3f} | "
                     f"{r['step_s_without_loading_ratio']:.2f} | {r['peak_memory_mb']:.0f} | "
                     f"{r['peak_memory_mb_ratio']:.2f} |")
    with open(join(out_dir, "speed.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 5))
    x = np.arange(len(rows))
    series = [(key, label) for key, label in (("step_s_with_loading_ratio", "time/step, with loading"),
                                              ("step_s_without_loading_ratio", "time/step, without loading"),
                                              ("peak_memory_mb_ratio", "peak memory"))
              if not all(math.isnan(r[key]) for r in rows)]  # --compute_only: no with-loading bars
    for i, (key, label) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * 0.27, [r[key] for r in rows], 0.27, label=label)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(x, [r["trainer"] for r in rows], rotation=15)
    ax.set_ylabel("ratio to nnUNetTrainer")
    ax.set_title(f"{info['dataset']} {info['configuration']} on {info['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(join(out_dir, "speed.png"))
    plt.close(fig)
