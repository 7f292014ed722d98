"""What a person watching a long command sees: which run, which epoch, how long is left.

A trainer that mixes in ``EpochProgressFile`` appends one JSON line per finished epoch to ``progress.jsonl`` in its
output folder (epochs done, of how many, the epoch's seconds, its pseudo Dice). ``CommandProgress`` follows those
files from the command that started the runs, in the same process or not (worker processes, ``nnUNetv2_train``
subprocesses), and shows a tqdm bar per run on a terminal or one plain line per epoch elsewhere (CI, ``nohup``,
the cell runner: no control characters). Time left comes from the epoch times measured in this command only.
``captured_output`` sends a run's own output (nnU-Net's logs, its data-loading workers') to a file, at the level
of the file descriptors, so that the progress display stays readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from os.path import isfile, join

PROGRESS_FILE = "progress.jsonl"


class EpochProgressFile:
    """Trainer mixin: after each epoch, one line of ``progress.jsonl`` in the output folder (rank 0 only)."""

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank != 0:
            return
        def last(key: str) -> float:
            return float(self.logger.get_value(key, step=None)[-1])

        record = {"epoch": self.current_epoch, "epochs": self.num_epochs,
                  "seconds": last("epoch_end_timestamps") - last("epoch_start_timestamps"),
                  "pseudo_dice": last("mean_fg_dice"), "time": time.time()}
        with open(join(self.output_folder, PROGRESS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")


def read_progress(output_folder: str) -> list[dict]:
    """The epoch records of a run's output folder (a half-written last line is left for the next read)."""
    path = join(output_folder, PROGRESS_FILE)
    if not isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class CommandProgress:
    """The progress of a command's runs (label and epochs of each, in order).

    ``watch(index, output_folder)`` follows one run while it trains; ``skip(index)`` marks a run that needs no
    training (finished earlier). Time left for a run: its mean measured epoch time times the epochs it has left;
    for the command: that, plus the epochs of the runs not started times the mean epoch time measured so far in
    this command ("measuring" until one epoch has been timed). Epochs resumed from an earlier command are counted
    as done but not timed.
    """

    def __init__(self, runs: list[tuple[str, int]], stream=None, live: bool | None = None):
        self.runs = runs
        self.stream = stream if stream is not None else sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.done = [0] * len(runs)  # epochs done per run
        self.finished = [False] * len(runs)
        self.timed: dict[int, list[float]] = {}  # epoch seconds measured in this command, per run
        self.prediction_seconds, self.predicted_cases = 0.0, 0  # measured in this command, every run together
        self._lock = threading.Lock()
        self._bars = {}

    def message(self, text: str) -> None:
        """A line of its own (a step, a log path, a failure), above the live bars."""
        with self._lock:
            if self.live and self._bars:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def skip(self, index: int) -> None:
        self.done[index], self.finished[index] = self.runs[index][1], True

    def seconds_left(self, index: int) -> tuple[float | None, float | None]:
        """(this run, the whole command) in seconds; None before any epoch of this command has been timed."""
        measured = [s for seconds in self.timed.values() for s in seconds]
        if not measured:
            return None, None
        overall = sum(measured) / len(measured)
        own = self.timed.get(index)
        per_epoch = sum(own) / len(own) if own else overall
        run_left = per_epoch * (self.runs[index][1] - self.done[index])
        later = sum(epochs * overall for i, (_, epochs) in enumerate(self.runs)
                    if i != index and not self.finished[i] and not self.timed.get(i))
        others_running = sum(sum(s) / len(s) * (self.runs[i][1] - self.done[i]) for i, s in self.timed.items()
                             if i != index and not self.finished[i])
        return run_left, run_left + later + others_running

    def status_line(self, index: int, record: dict | None) -> str:
        label, epochs = self.runs[index]
        parts = [f"run {index + 1}/{len(self.runs)} {label}", f"epoch {self.done[index]}/{epochs}"]
        if record is not None:
            parts.append(f"last epoch {record['seconds']:.0f} s, pseudo Dice {record['pseudo_dice']:.3f}")
        run_left, command_left = self.seconds_left(index)
        parts.append("time left: measuring" if run_left is None else
                     f"run left {format_duration(run_left)}, all runs' training left {format_duration(command_left)}")
        return " | ".join(parts)

    def _record(self, index: int, record: dict, started: float) -> None:
        with self._lock:
            self.done[index] = record["epoch"]
            if record["epochs"] != self.runs[index][1]:  # the trainer's own schedule, where the command guessed
                self.runs[index] = (self.runs[index][0], record["epochs"])
            if record["time"] >= started:  # an epoch of this command, not one resumed from an earlier run
                self.timed.setdefault(index, []).append(record["seconds"])
            line = self.status_line(index, record)
            bar = self._bars.get(index)
            if bar is not None:
                bar.total, bar.n = record["epochs"], record["epoch"]
                bar.set_postfix_str(line.split(" | ", 2)[2], refresh=True)
            else:
                print(line, file=self.stream, flush=True)

    @contextlib.contextmanager
    def predicting(self, index: int, cases: int, what: str):
        """A line before run ``index`` predicts ``cases`` images (``what``: e.g. "held-out cases"), with the time
        it should take from the seconds per case measured so far in this command; prediction (test-time mirroring
        on CPU above all) can take minutes that no epoch line covers."""
        label = self.runs[index][0]
        estimate = ""
        if self.predicted_cases:
            per_case = self.prediction_seconds / self.predicted_cases
            estimate = f", about {format_duration(per_case * cases)} ({per_case:.0f} s per case so far)"
        self.message(f"run {index + 1}/{len(self.runs)} {label} | predicting {cases} {what}{estimate}")
        started = time.time()
        yield
        with self._lock:
            self.prediction_seconds += time.time() - started
            self.predicted_cases += cases

    @contextlib.contextmanager
    def watch(self, index: int, output_folder: str, poll_seconds: float = 1.0):
        """Follow ``output_folder/progress.jsonl`` of run ``index`` while the block runs."""
        started = time.time()
        earlier = read_progress(output_folder)  # a resumed run's epochs: done, not timed
        seen = len(earlier)
        self.done[index] = earlier[-1]["epoch"] if earlier else 0
        if self.live:
            from tqdm import tqdm

            with self._lock:
                label, epochs = self.runs[index]
                self._bars[index] = tqdm(total=epochs, initial=self.done[index], file=self.stream, unit="epoch",
                                         desc=f"run {index + 1}/{len(self.runs)} {label}", dynamic_ncols=True)
        else:
            self.message(self.status_line(index, None))
        stop = threading.Event()

        def follow():
            nonlocal seen
            while True:
                records = read_progress(output_folder)
                for record in records[seen:]:
                    self._record(index, record, started)
                seen = len(records)
                if stop.wait(poll_seconds):
                    break
            for record in read_progress(output_folder)[seen:]:  # the last epoch, written as the block ended
                self._record(index, record, started)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with self._lock:
                self.finished[index] = True
                bar = self._bars.pop(index, None)
                if bar is not None:
                    bar.close()


def console_stream():
    """A stream on the terminal (or whatever stdout is now) that ``captured_output`` does not redirect."""
    sys.stdout.flush()
    try:
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (e.g. captured by pytest)
        return sys.stdout


@contextlib.contextmanager
def captured_output(log_file: str | None):
    """File descriptors 1 and 2 (this process's prints and those of the processes it starts) appended to
    ``log_file`` while the block runs; None: unchanged (``--verbose``).

    ``sys.stdout``/``sys.stderr`` are pointed at the log too: where they are not the descriptors (pytest's capture,
    a notebook), Python's own prints would otherwise bypass the redirection."""
    if log_file is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a", buffering=1, encoding="utf-8", errors="replace") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def log_tail(log_file: str, lines: int = 20) -> str:
    """The last ``lines`` lines of a log (empty when there is none)."""
    if not isfile(log_file):
        return ""
    with open(log_file, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
