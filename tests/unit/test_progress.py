"""The progress display: epoch records written by the trainer mixin, followed from the command, time left from
measured epoch times only, plain lines without control characters off a terminal, a run's output captured."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time

from nnunet_semi.tools.progress import PROGRESS_FILE, CommandProgress, captured_output, format_duration


def _append(folder, epoch, seconds, dice=0.5, at=None):
    with open(folder / PROGRESS_FILE, "a") as f:
        f.write(json.dumps({"epoch": epoch, "epochs": 4, "seconds": seconds, "pseudo_dice": dice,
                            "time": time.time() if at is None else at}) + "\n")


def _wait_for(stream, text, timeout=5.0):
    end = time.time() + timeout
    while text not in stream.getvalue() and time.time() < end:
        time.sleep(0.01)


def test_time_left_comes_from_the_epochs_measured_in_this_command(tmp_path):
    stream = io.StringIO()
    progress = CommandProgress([("nnUNetTrainer, 4 labeled", 4), ("nnUNetTrainerSGRS, 4 labeled", 2)], stream,
                               live=False)
    _append(tmp_path, 1, 999.0, at=time.time() - 3600)  # resumed from an earlier command: done, not timed
    with progress.watch(0, str(tmp_path), poll_seconds=0.01):
        _wait_for(stream, "epoch 1/4")
        _append(tmp_path, 2, 10.0, dice=0.61)
        _wait_for(stream, "epoch 2/4 |")
        _append(tmp_path, 3, 20.0, dice=0.72)
        _wait_for(stream, "epoch 3/4 |")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "run 1/2 nnUNetTrainer, 4 labeled | epoch 1/4 | time left: measuring"
    # epoch 2: 10 s measured (the resumed 999 s epoch is not), 2 epochs left; the next run's 2 epochs at 10 s
    assert lines[1] == ("run 1/2 nnUNetTrainer, 4 labeled | epoch 2/4 | last epoch 10 s, pseudo Dice 0.610 | "
                        "run left 0m20s, all runs' training left 0m40s")
    assert lines[2].endswith("run left 0m15s, all runs' training left 0m45s")  # mean 15 s: 1 + 2 epochs left
    assert len(lines) == 3 and not re.search(r"[\r\x1b]", stream.getvalue())
    assert format_duration(3725) == "1h02m"


def test_prediction_is_announced_with_the_time_it_took_per_case_so_far(monkeypatch):
    import nnunet_semi.tools.progress as progress_module

    clock = iter([100.0, 160.0, 500.0, 530.0])  # the first run's 4 cases take 60 s
    monkeypatch.setattr(progress_module.time, "time", lambda: next(clock))
    stream = io.StringIO()
    progress = CommandProgress([("nnUNetTrainer, 4 labeled", 4), ("nnUNetTrainerSGRS, 4 labeled", 2)], stream,
                               live=False)
    with progress.predicting(0, 4, "held-out cases"):
        pass
    with progress.predicting(1, 10, "test images"):
        pass
    lines = stream.getvalue().splitlines()
    assert lines == ["run 1/2 nnUNetTrainer, 4 labeled | predicting 4 held-out cases",
                     "run 2/2 nnUNetTrainerSGRS, 4 labeled | predicting 10 test images, about 2m30s (15 s per case "
                     "so far)"]
    assert (progress.prediction_seconds, progress.predicted_cases) == (90.0, 14)


def test_the_live_form_is_a_tqdm_bar_per_run(tmp_path):
    stream = io.StringIO()
    progress = CommandProgress([("nnUNetTrainer, 2 labeled", 4)], stream, live=True)
    with progress.watch(0, str(tmp_path), poll_seconds=0.01):
        _append(tmp_path, 1, 5.0)
        _wait_for(stream, "pseudo Dice 0.500")
    assert "run 1/1 nnUNetTrainer, 2 labeled" in stream.getvalue() and "\r" in stream.getvalue()


def test_captured_output_takes_python_prints_where_stdout_is_not_the_descriptor(tmp_path, capsys):
    """Under pytest (or in a notebook) sys.stdout is an object of its own; the prints must still reach the log."""
    log = tmp_path / "run.txt"
    with captured_output(str(log)):
        print("from python")
        print("a warning", file=sys.stderr)
    print("after")
    captured = capsys.readouterr()
    assert log.read_text() == "from python\na warning\n"
    assert captured.out == "after\n" and captured.err == ""


def test_captured_output_takes_this_process_and_its_children(tmp_path):
    """In a fresh interpreter, whose stdout is a real descriptor (pytest replaces this one's)."""
    log = tmp_path / "logs" / "run.txt"
    script = f"""
import os, subprocess, sys
from nnunet_semi.tools.progress import captured_output, console_stream
console = console_stream()
with captured_output({str(log)!r}):
    print("from python")
    os.write(1, b"from the descriptor\\n")
    subprocess.run([sys.executable, "-c", "import sys; print('from a child'); print('err', file=sys.stderr)"])
    console.write("on the console\\n")
print("after")
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    text = log.read_text()
    assert all(s in text for s in ("from python", "from the descriptor", "from a child", "err"))
    assert completed.stdout == "on the console\nafter\n" and "on the console" not in text
