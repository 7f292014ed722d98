"""Crash-safe checkpoints: atomic writes, damaged files, stock nnU-Net checkpoints, and SIGKILL through nnUNetv2_train
at many points (issue #13)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import DATASET_ID, DATASET_NAME, make_trainer, tiny_schedule
from nnunet_semi.components.schedules import sigmoid_rampup
from nnunet_semi.methods import nnUNetTrainerMeanTeacher
from nnunet_semi.trainer.checkpoints import DamagedCheckpointError, atomic_torch_save, read_checkpoint


def test_atomic_save_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "checkpoint_latest.pth")
    atomic_torch_save({"network_weights": {"w": torch.ones(3)}, "current_epoch": 1}, path)
    (tmp_path / "checkpoint_latest.pth.tmp-999").write_bytes(b"left by a killed writer")

    def killed():
        assert any(p.name.startswith("checkpoint_latest.pth.tmp-") for p in tmp_path.iterdir())
        raise KeyboardInterrupt  # the process dies between the complete temporary file and the rename

    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"network_weights": {"w": torch.zeros(3)}, "current_epoch": 2}, path, before_replace=killed)
    assert read_checkpoint(path)["current_epoch"] == 1  # the previous complete file
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]  # no temporary files left
    atomic_torch_save({"network_weights": {}, "current_epoch": 3}, path)
    assert read_checkpoint(path)["current_epoch"] == 3


def test_damaged_and_missing_checkpoints_are_told_apart(tmp_path):
    empty, cut = tmp_path / "checkpoint_latest.pth", tmp_path / "checkpoint_best.pth"
    empty.write_bytes(b"")
    atomic_torch_save({"network_weights": {"w": torch.randn(100)}}, str(cut))
    cut.write_bytes(cut.read_bytes()[:200])
    for path in (empty, cut):
        with pytest.raises(DamagedCheckpointError, match=path.name):
            read_checkpoint(str(path))
    with pytest.raises(FileNotFoundError):
        read_checkpoint(str(tmp_path / "checkpoint_final.pth"))


def test_a_trainer_checkpoint_is_one_atomic_write_with_the_semi_state(semi_dataset, tmp_path, monkeypatch):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerMeanTeacher))
    trainer.train_step(next(trainer.dataloader_train))
    writes = []
    original = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: writes.append(f) or original(obj, f, *a, **k))
    path = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    on_disk = [f for f in writes if not hasattr(f, "getvalue")]  # nnU-Net's own save goes to memory
    assert len(on_disk) == 1 and Path(on_disk[0].name).name.startswith("checkpoint_latest.pth.tmp-")
    checkpoint = read_checkpoint(str(path))
    assert "teacher.encoder.stages.0.0.convs.0.conv.weight" in checkpoint["semi_state"]["auxiliary"]


def _saved_trainer(semi_dataset, folder: Path, epochs_done: int, name: str):
    trainer = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerMeanTeacher))
    trainer.current_epoch = epochs_done - 1  # nnU-Net saves current_epoch + 1
    trainer.save_checkpoint(str(folder / name))
    return trainer


def test_resume_skips_a_damaged_checkpoint_for_the_newest_readable_one(semi_dataset, tmp_path):
    _saved_trainer(semi_dataset, tmp_path, 2, "checkpoint_best.pth")
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"")  # what a kill during nnU-Net's own write leaves
    resumed = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerMeanTeacher))
    resumed.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    assert resumed.current_epoch == 2 and resumed._teacher_restored
    log = Path(resumed.log_file).read_text()
    assert "damaged checkpoint" in log and "checkpoint_latest.pth (0 bytes)" in log
    assert "Resuming from" in log and "checkpoint_best.pth instead (epoch 2)" in log


def test_resume_starts_fresh_when_no_checkpoint_can_be_read(semi_dataset, tmp_path):
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    resumed = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerMeanTeacher))
    resumed.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    assert resumed.current_epoch == 0 and not resumed._teacher_restored
    assert "no readable checkpoint" in Path(resumed.log_file).read_text()


def test_a_stock_nnunet_checkpoint_resumes_with_the_teacher_rebuilt_from_the_student(semi_dataset, tmp_path):
    trainer = _saved_trainer(semi_dataset, tmp_path, 3, "checkpoint_latest.pth")
    stock = torch.load(tmp_path / "checkpoint_latest.pth", weights_only=False)
    del stock["semi_state"]
    stock["optimizer_state"]["param_groups"] = stock["optimizer_state"]["param_groups"][:1]
    torch.save(stock, tmp_path / "checkpoint_latest.pth")
    resumed = make_trainer(semi_dataset, tiny_schedule(nnUNetTrainerMeanTeacher))
    resumed.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    assert resumed.current_epoch == 3 and not resumed._teacher_restored
    resumed.on_train_start()  # the teacher starts as the loaded student
    for k, v in trainer.unwrapped_network().state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[k], v)
    assert "has no 'semi_state'" in Path(resumed.log_file).read_text()


# ------------------------------------------------------------------------------------------ the kill loop
def _resume_epoch(fold: Path) -> int:
    """The epoch ``--c`` resumes at: nnU-Net loads checkpoint_final, else _latest, else _best."""
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        if (fold / name).is_file():
            return read_checkpoint(str(fold / name))["current_epoch"]
    return 0


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_until_the_run_finishes(planned_dataset, tmp_path):
    import re
    import sys

    from nnunet_semi.data.splits import make_labeled_split
    from nnunet_semi.data.unlabeled import preprocess_unlabeled
    from nnunet_semi.trainer.discovery import trainer_dir

    support = Path(__file__).resolve().parents[1] / "support"
    sys.path.insert(0, str(support))
    from tiny_trainers import nnUNetTrainerMeanTeacherSlowCheckpoints as cls

    make_labeled_split(DATASET_ID, 2)
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1)
    env = dict(os.environ) | {"nnUNet_extTrainer": os.pathsep.join([trainer_dir(), str(support / "ext")]),
                              "PYTHONPATH": os.pathsep.join([str(support), os.environ.get("PYTHONPATH", "")]),
                              "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    fold = planned_dataset.results / DATASET_NAME / f"{cls.__name__}__nnUNetPlans__3d_fullres" / "fold_0"
    command = ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", cls.__name__, "-device", "cpu"]

    # kill points: while a checkpoint's temporary file is complete but not yet renamed, or a number of seconds
    # after the start's second epoch began (inside an epoch, a validation or a save; counted from there, not from
    # the log's creation, so that on a slow or loaded machine the start has written a checkpoint first and the
    # next one resumes); the last start finishes
    kills = ["during_write", 1.5, "during_write", 3.0, "during_write", 0.5, None]
    epoch_line = re.compile(r": Epoch (\d+) *$", re.M)
    expected_starts, fired, first_epochs = [], [], []
    for kill in kills:
        expected_starts.append(_resume_epoch(fold))
        logs_before = set(fold.glob("training_log_*.txt"))
        process = subprocess.Popen(command + (["--c"] if len(expected_starts) > 1 else []), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        log_seen = None
        while process.poll() is None and kill is not None:
            if log_seen is None and isinstance(kill, float):
                new_logs = set(fold.glob("training_log_*.txt")) - logs_before
                if any(len(epoch_line.findall(log.read_text())) >= 2 for log in new_logs):
                    log_seen = time.time()
            in_write = any(".tmp-" in p.name for p in fold.glob("checkpoint_*.pth.tmp-*"))
            if (kill == "during_write" and in_write) or \
                    (isinstance(kill, float) and log_seen is not None and time.time() - log_seen > kill):
                os.killpg(process.pid, signal.SIGKILL)
                fired.append(kill)
                break
            time.sleep(0.05)
        process.wait(timeout=900)
        for log in set(fold.glob("training_log_*.txt")) - logs_before:
            started_at = epoch_line.search(log.read_text())
            if started_at:  # this start reached its first epoch: it began where the newest checkpoint left off
                first_epochs.append((int(started_at.group(1)), expected_starts[-1]))
        # whatever the moment, every checkpoint under its final name is complete
        for path in fold.glob("checkpoint_*.pth"):
            read_checkpoint(str(path))
        if process.returncode == 0:
            break
    assert process.returncode == 0 and (fold / "checkpoint_final.pth").is_file(), "the run never finished"
    assert fired == kills[:-1]  # every kill landed before the run could finish, three of them inside a write

    # every start resumed where the newest checkpoint left it (or at 0 before the first one existed)
    assert len(first_epochs) >= 4 and all(started == expected for started, expected in first_epochs), first_epochs
    assert max(expected_starts) > 0  # some restart resumed from a checkpoint, not from scratch

    final = read_checkpoint(str(fold / "checkpoint_final.pth"))
    assert any(k.startswith("teacher.") for k in final["semi_state"]["auxiliary"])
    assert final["current_epoch"] == cls.epochs
    logged = final["logging"]
    # one entry per epoch, however often the run was killed: no epoch counted twice
    assert len(logged["epoch_end_timestamps"]) == cls.epochs
    # the ramp continued from the restored step: the weight logged for epoch e is the mean ramp over its steps
    for epoch, weight in enumerate(logged["semi_unsup_weight"]):
        steps = range(epoch * cls.iterations_per_epoch, (epoch + 1) * cls.iterations_per_epoch)
        expected = sum(cls.unsup_weight * sigmoid_rampup(s, cls.unsup_rampup_iterations) for s in steps) / len(steps)
        assert weight == pytest.approx(expected, rel=1e-5), epoch


def test_the_benchmark_resumes_a_run_from_its_best_checkpoint_when_latest_is_missing(semi_dataset):
    import json

    from nnunet_semi.tools.benchmark.training import train_run

    cls = tiny_schedule(nnUNetTrainerMeanTeacher, epochs=2, iterations_per_epoch=1, val_iterations_per_epoch=1)
    trainer = make_trainer(semi_dataset, cls)
    trainer.current_epoch = 0  # saved as "1 epoch done"
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_best.pth"))
    logs_before = set(Path(trainer.output_folder).glob("training_log_*.txt"))
    plans = json.loads((semi_dataset.preprocessed_dataset / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((semi_dataset.preprocessed_dataset / "dataset.json").read_text())
    time.sleep(1.1)  # nnU-Net names its log by the second
    train_run(cls, plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    log = "".join(p.read_text() for p in set(Path(trainer.output_folder).glob("training_log_*.txt")) - logs_before)
    assert "Epoch 1" in log and "Epoch 0 " not in log  # trained the second epoch only
    assert read_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))["current_epoch"] == 2
