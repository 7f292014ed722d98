"""The lab's benchmark cells (``python -m semi_lab cell`` / ``benchmarks/scripts/run_cell.sh``; the old
``nnUNetv2_semi_benchmark cell`` forwards to it) and the offline wheel install."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from nnunet_semi.errors import SemiInputError
from nnunet_semi.tools.benchmark.common import resolve_trainer
from semi_lab import cells, offline
from semi_lab.__main__ import main as lab_main


def test_unknown_cell_is_one_line_listing_the_known_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lab_main(["cell", "la4-sgr", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown cell 'la4-sgr'" in err and "la4-sgrs" in err and "cpu-dryrun" in err
    assert not (tmp_path / "out").exists()


def test_run_cell_sh_reaches_the_lab_of_the_checkout_and_the_old_command_name_forwards_to_it():
    """benchmarks/scripts/run_cell.sh runs ``python -m semi_lab cell`` on the checkout, without an install; the old
    ``nnUNetv2_semi_benchmark cell`` keeps working in a clone, with a one-line notice."""
    root = Path(__file__).resolve().parents[2]
    assert "python3 -m semi_lab cell" in (root / "benchmarks" / "scripts" / "run_cell.sh").read_text()
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), str(root / "benchmarks")])}
    listed = subprocess.run([sys.executable, "-m", "semi_lab", "cell", "--list"], cwd=root, capture_output=True,
                            text=True, env=env)
    assert listed.returncode == 0 and "cpu-la4-sgrs" in listed.stdout
    forwarded = subprocess.run([sys.executable, "-m", "nnunet_semi.cli", "benchmark", "cell", "--list"], cwd=root,
                               capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(root)})
    assert forwarded.returncode == 0 and forwarded.stdout == listed.stdout
    assert forwarded.stderr.count("\n") == 1 and "moved to the project's lab" in forwarded.stderr
    unknown = subprocess.run([sys.executable, "-m", "nnunet_semi.cli", "nonsense"], cwd=root, capture_output=True,
                             text=True, env=os.environ | {"PYTHONPATH": str(root)})
    assert unknown.returncode == 2 and "benchmark" in unknown.stderr


def test_deadline_too_short_to_train_is_refused_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lab_main(["cell", "la4-sgrs", "-o", str(tmp_path / "out"), "--deadline", "100", "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert "--deadline 100: too short to train anything" in err and "give at least 210" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()


def test_cell_table_one_schedule_per_device_one_protocol_every_method():
    quality = [c for c in cells.CELLS.values() if c.kind == "quality" and c.dataset == "Dataset101_LA"]
    gpu = [c for c in quality if c.device == "gpu"]
    cpu = [c for c in quality if c.device == "cpu" and c.name.startswith("cpu-la4-")]
    assert {(c.epochs, c.iterations) for c in gpu} == {(cells.GPU_EPOCHS, cells.GPU_ITERATIONS)}
    assert {(c.epochs, c.iterations, c.coarse) for c in cpu} == {(15, 100, True)}
    assert {(c.fold, c.num_val) for c in quality} == {(0, 16)}  # one split protocol: report merges them
    assert all(c.repeats == 2 for c in gpu + cpu)  # stock's spread in every real cell
    for method in cells.METHODS:
        for prefix in ("la4-", "la8-", "cpu-la4-"):
            cell = cells.get_cell(prefix + method.lower())
            assert cell.trainers == (f"nnUNetTrainer{method}",)
    for cell in cells.CELLS.values():
        for trainer in cell.trainers:
            resolve_trainer(trainer)  # every name in the table is a trainer
    assert "| `la4-sgrs` | quality | SGRS | 4 | 4 x 250 | 2 | 3 | 540 s |" in cells.cell_table_markdown()


def test_offline_check_names_missing_and_unsatisfied_requirements(monkeypatch):
    monkeypatch.setattr(offline, "project_requirements",
                        lambda: ["numpy<1", "no-such-distribution-xyz>=2", "SimpleITK>=2"])
    with pytest.raises(offline.OfflineError) as e:
        offline.check()
    message = str(e.value)
    assert "no-such-distribution-xyz>=2 (needed by nnunet-semi) is missing" in message
    assert "needs numpy<1" in message
    assert "simpleitk" not in message.lower()  # replaced by NibabelIO offline, never required


def test_offline_check_passes_on_this_environment():
    offline.check()  # the test environment has the project's whole closure installed


def _write_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A minimal pure-Python wheel (one module) that pip installs offline."""
    dist_info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{dist_info}/METADATA": "Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version + "\n"
                                      + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist_info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for arcname, text in files.items():
            z.writestr(arcname, text)
    return path


def test_offline_install_names_the_missing_wheel_then_installs_only_what_is_missing(tmp_path, monkeypatch):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _write_wheel(wheels, "semi_offline_a", "1.0", ["semi_offline_b>=2"])
    monkeypatch.setattr(offline, "project_requirements", lambda: ["semi_offline_a==1.0", "numpy"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # install() puts site first; undone after the test
    with pytest.raises(offline.OfflineError, match=r"semi-offline-b>=2 \(needed by semi-offline-a\) is missing"):
        offline.install(str(wheels), str(site))
    _write_wheel(wheels, "semi_offline_b", "2.1")
    installed = offline.install(str(wheels), str(site))
    assert installed == ["semi-offline-b"]  # a was installed by the first call; numpy is preinstalled, no wheel
    assert (site / "semi_offline_b" / "__init__.py").is_file()
    assert offline.install(str(wheels), str(site)) == []  # everything present: nothing reinstalled


def test_offline_install_of_a_folder_that_does_not_exist_says_how_to_make_it(tmp_path):
    result = subprocess.run([sys.executable, offline.__file__, "install", str(tmp_path / "nope"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "scripts/build_wheels.sh" in result.stderr


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cell_work(tmp_path_factory):
    """One work folder for the module's cells: the tiny dataset is generated and planned once."""
    return tmp_path_factory.mktemp("cell_work")


@pytest.fixture
def nnunet_env(monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_compile"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # run_cell exports its own; restored afterwards
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")


@pytest.mark.slow
def test_tiny_cell_trains_scores_and_packs_everything_into_the_output_folder(tmp_path, cell_work, nnunet_env):
    out = tmp_path / "out"
    archive = cells.run_cell("tiny", str(out), work_dir=str(cell_work))
    assert Path(archive) == out / "tiny.tar.gz"
    rows = _rows(out / "results.csv")
    assert {r["trainer"] for r in rows} == {"nnUNetTrainer", "nnUNetTrainerMeanTeacher"}
    assert {r["cell"] for r in rows} == {"tiny"} and all(0 <= float(r["dice"]) <= 1 for r in rows)
    assert "nnUNetTrainerMeanTeacher" in (out / "results.md").read_text()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    data = next(m.group(1) for n in names  # the hash of the runs' data identity in their names
                if (m := re.fullmatch(r"runs/nnUNetTrainer__bench_2lab_1x4_([0-9a-f]{6})/scores.csv", n)))
    for run in (f"nnUNetTrainer__bench_2lab_1x4_{data}", f"nnUNetTrainerMeanTeacher__bench_2lab_1x4_{data}"):
        assert f"runs/{run}/scores.csv" in names and f"runs/{run}/curves.csv" in names
    assert f"runs/nnUNetTrainerMeanTeacher__bench_2lab_1x4_{data}/ema_pair_scores.csv" in names
    assert "cell.json" in names and not any(n.startswith("predictions") for n in names)


def _processes_with_env(text: str) -> list[int]:
    """Other processes whose environment mentions ``text`` (spawned workers inherit the cell's nnU-Net folders)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
            command = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if text in environ and "resource_tracker" not in command:  # this process's own tracker may start late
            found.append(int(pid))
    return found


@pytest.mark.slow
def test_cell_deadline_stops_training_cleanly_and_returns_the_logs_so_far(tmp_path, cell_work, nnunet_env,
                                                                          monkeypatch):
    long_cell = dataclasses.replace(cells.CELLS["tiny"], name="tiny-long", epochs=10_000, reserve_s=10)
    monkeypatch.setitem(cells.CELLS, "tiny-long", long_cell)
    monkeypatch.setattr(cells, "SETUP_ESTIMATE_S", 0)
    from nnunet_semi.tools.benchmark.common import make_tiny_dataset

    make_tiny_dataset(str(cell_work / "tiny_dataset"))  # made once per module; the deadline is for training
    out, started = tmp_path / "out", time.time()
    cells.run_cell("tiny-long", str(out), deadline_s=70, work_dir=str(cell_work), started=started)
    assert time.time() - started < 70  # done before the deadline
    with tarfile.open(out / "tiny-long.tar.gz") as tar:
        names = tar.getnames()
    for run in ("nnUNetTrainer__bench_2lab_10000x4", "nnUNetTrainerMeanTeacher__bench_2lab_10000x4"):
        assert any(re.match(rf"unfinished/{run}_[0-9a-f]{{6}}/training_log", n) for n in names), names
        assert not any(n.startswith(f"runs/{run}_") and n.endswith("scores.csv") for n in names)
    time.sleep(1)
    assert _processes_with_env(str(cell_work)) == []  # the runs' processes and their loaders are gone
    results = cell_work / "tiny_dataset" / "nnUNet_results"
    latest = list(results.rglob("nnUNetTrainerMeanTeacher__bench_2lab_10000x4*/fold_0/checkpoint_latest.pth"))
    assert latest, "a stopped run keeps its last checkpoint to resume from"
    with pytest.raises(SemiInputError, match="too short to train anything"):
        cells.run_cell("tiny-long", str(out), deadline_s=30, work_dir=str(cell_work))
