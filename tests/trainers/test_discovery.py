"""Trainer discovery through nnU-Net's nnUNet_extTrainer, for the editable install and for a wheel install."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import nnunet_semi.methods
from nnunet_semi.cli import trainer_dir_entry
from nnunet_semi.trainer.discovery import trainer_dir

REPO = Path(__file__).resolve().parents[2]


def test_trainer_dir_holds_only_reexports(capsys):
    folder = Path(trainer_dir())
    trainer_dir_entry([])
    assert capsys.readouterr().out.strip() == str(folder)
    modules = sorted(p.name for p in folder.glob("*.py"))
    assert modules == ["__init__.py", "nnunet_semi_demo_trainers.py", "nnunet_semi_trainers.py"]
    # no class is defined there: nnU-Net purges the folder's modules after the lookup
    for module in modules:
        assert "class " not in (folder / module).read_text()


def test_demo_trainers_are_found_but_are_not_methods(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_semi.tools.demo_trainers import nnUNetTrainerMeanTeacher_demo

    monkeypatch.setenv("nnUNet_extTrainer", trainer_dir())
    assert recursive_find_trainer_class_by_name("nnUNetTrainerMeanTeacher_demo") is nnUNetTrainerMeanTeacher_demo
    assert not any(name.endswith("_demo") for name in nnunet_semi.methods.__all__)


@pytest.mark.parametrize("name", nnunet_semi.methods.__all__)
def test_every_trainer_resolves_to_the_package_class_and_pickles(name, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", trainer_dir())
    found = recursive_find_trainer_class_by_name(name)
    assert found is getattr(nnunet_semi.methods, name)
    assert found.__module__.startswith("nnunet_semi.")  # defined in the package, not the purged folder
    assert pickle.loads(pickle.dumps(found)) is found


def test_names_do_not_collide_with_nnunet_trainers(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    for name in nnunet_semi.methods.__all__:
        with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):
            recursive_find_trainer_class_by_name(name)


@pytest.mark.slow
def test_wheel_install_finds_the_trainers(tmp_path, planned_dataset):
    """Build the wheel, install it into an isolated target, look the trainers up from there and build one exactly
    as nnUNetv2_train does (nnunetv2.run.run_training.get_trainer_from_args)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True)
    wheel = next((tmp_path / "dist").glob("nnunet_semi-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env["PYTHONPATH"] = str(target)
    script = (
        "import os, pickle, nnunet_semi, nnunet_semi.trainer.discovery as d\n"
        "os.environ['nnUNet_extTrainer'] = d.trainer_dir()\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "cls = find('nnUNetTrainerMeanTeacher')\n"
        "assert pickle.loads(pickle.dumps(cls)) is cls\n"
        "import torch\n"
        "from nnunetv2.run.run_training import get_trainer_from_args\n"
        "trainer = get_trainer_from_args('990', '3d_fullres', 0, 'nnUNetTrainerSGRS', device=torch.device('cpu'))\n"
        "trainer.initialize()\n"
        "assert trainer.teacher is not None and type(trainer).__module__ == 'nnunet_semi.methods.sgrs'\n"
        "print(nnunet_semi.__file__); print(d.trainer_dir()); print(cls.__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    package_file, ext_dir, module = result.stdout.strip().splitlines()[-3:]
    assert package_file.startswith(str(target)) and ext_dir == str(target / "nnunet_semi" / "ext_trainers")
    assert module == "nnunet_semi.methods.mean_teacher"
    # the console script prints the same folder
    script_path = target / "bin" / "nnUNetv2_semi_trainer_dir"
    printed = subprocess.run([sys.executable, str(script_path)], env=env, capture_output=True, text=True)
    assert printed.stdout.strip() == ext_dir
