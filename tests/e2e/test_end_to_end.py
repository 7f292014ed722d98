"""The user's path through nnU-Net's own commands: nnUNetv2_train -tr <our trainer>, --c, nnUNetv2_predict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nnunet_semi.methods
from helpers import DATASET_ID, DATASET_NAME
from nnunet_semi.data.splits import make_labeled_split
from nnunet_semi.data.unlabeled import preprocess_unlabeled
from nnunet_semi.trainer.discovery import trainer_dir

SUPPORT = Path(__file__).resolve().parents[1] / "support"


def _run(args, env):
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _without_the_plugin(env: dict, tmp_path: Path) -> dict:
    """``env`` in which nnU-Net runs without the plugin: no trainer lookup, and ``import nnunet_semi`` fails (a
    package of that name that refuses to import comes first on the path), so a vanilla prediction cannot lean on it."""
    blocker = tmp_path / "no_plugin" / "nnunet_semi"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ImportError('nnunet_semi is not installed here')\n")
    vanilla = {k: v for k, v in env.items() if k not in ("nnUNet_extTrainer", "PYTHONPATH")}
    vanilla["PYTHONPATH"] = str(blocker.parent)
    probe = subprocess.run([sys.executable, "-c", "import nnunet_semi"], env=vanilla, capture_output=True, text=True,
                           cwd=tmp_path)  # not the checkout's folder, whose package `python -c` would find first
    assert probe.returncode != 0 and "not installed here" in probe.stderr
    return vanilla


def _predict_test_cases(env_folders, env, trainer: str, output: Path) -> Path:
    """nnUNetv2_predict of the dataset's imagesTs with fold 0 of ``trainer``, on CPU, without mirroring."""
    _run(["nnUNetv2_predict", "-i", str(env_folders.raw_dataset / "imagesTs"), "-o", str(output),
          "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu",
          "-npp", "1", "-nps", "1", "--disable_tta"], env)
    return output


@pytest.fixture
def command_env(planned_dataset):
    make_labeled_split(DATASET_ID, 2)
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1)
    env = dict(os.environ)
    # the plugin's folder as the README says, plus the test-only tiny-schedule trainers
    env["nnUNet_extTrainer"] = os.pathsep.join([trainer_dir(), str(SUPPORT / "ext")])
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env.get("PYTHONPATH", "")])
    env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="f")
    return planned_dataset, env


# every method of the package on the tiny schedule (tests/support/tiny_trainers.py), found by itself; CPS's path
# through the commands is DualCCE's (below) without the ensemble, and the contract tests cover its steps
END_TO_END = [f"{name}Tiny" for name in nnunet_semi.methods.__all__
              if "_" not in name and name not in ("nnUNetTrainerCPS", "nnUNetTrainerDualCCE")]


@pytest.mark.slow
@pytest.mark.parametrize("TRAINER", END_TO_END)
def test_train_resume_and_predict_through_nnunet_commands(TRAINER, command_env, tmp_path):
    env_folders, env = command_env
    _run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env)
    fold = env_folders.results / DATASET_NAME / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    for name in ("checkpoint_final.pth", "progress.png", "progress_semi.png", "debug.json",
                 "validation/summary.json"):
        assert (fold / name).is_file(), name
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Unlabeled cases: 5, unlabeled batch size: 2" in log
    first_term = getattr(nnunet_semi.methods, TRAINER.removesuffix("Tiny")).loss_terms[0]
    assert log.count(f"Semi-supervised: loss_{first_term}:") == 2  # one line per epoch

    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert all(len(v) == 2 for k, v in checkpoint["logging"].items() if k.startswith("semi_"))
    assert checkpoint["semi_state"]["deployed_weights"] == "student"  # Mean Teacher declares the student
    # network_weights is exactly the stock network that nnUNetv2_predict builds
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_semi.methods import nnUNetTrainerMeanTeacher

    plans = PlansManager(str(fold.parent / "plans.json"))
    cm = plans.get_configuration("3d_fullres")
    network = nnUNetTrainerMeanTeacher.build_network_architecture(
        plans, cm, 1, 2, enable_deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"], strict=True)

    # --c on a finished run resumes from checkpoint_final: nothing is retrained, the teacher is restored
    out = _run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--c"], env)
    assert "Epoch 2" not in out

    predictions = _predict_test_cases(env_folders, env, TRAINER, tmp_path / "pred")
    for case in ("test_000", "test_001"):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case}.nii.gz")))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(env_folders.raw_dataset / "imagesTs" /
                                                              f"{case}_0000.nii.gz")))
        assert prediction.shape == reference.shape
        assert set(np.unique(prediction)) <= {0, 1}

    # export for vanilla nnU-Net: the plugin's trainer lookup is switched off and the predictions are identical
    exported = tmp_path / "exported"
    _run(["nnUNetv2_semi_export", "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", TRAINER, "-o", str(exported)], env)
    vanilla_checkpoint = torch.load(exported / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert vanilla_checkpoint["trainer_name"] == "nnUNetTrainer" and "semi_state" not in vanilla_checkpoint
    vanilla_env = _without_the_plugin(env, tmp_path)
    vanilla_predictions = tmp_path / "pred_vanilla"
    _run(["nnUNetv2_predict_from_modelfolder", "-i", str(env_folders.raw_dataset / "imagesTs"), "-o",
          str(vanilla_predictions), "-m", str(exported), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
          "--disable_tta"], vanilla_env)
    for case in ("test_000", "test_001"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(vanilla_predictions / f"{case}.nii.gz")))
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_dual_network_ensemble_deploys_through_nnunet_commands_and_exports_its_peer(command_env, tmp_path):
    env_folders, env = command_env
    trainer = "nnUNetTrainerDualCCETiny"
    _run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    fold = env_folders.results / DATASET_NAME / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "network_weights in checkpoint_final.pth: ensemble" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["network_weights"]["deployed_member"].item() == 2  # the ensemble
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's final validation ran on the ensemble
    # --val reloads the ensemble checkpoint and validates again
    (fold / "validation" / "summary.json").unlink()
    _run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu", "--val"], env)
    assert (fold / "validation" / "summary.json").is_file()

    predictions = _predict_test_cases(env_folders, env, trainer, tmp_path / "pred")
    for case in ("test_000", "test_001"):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case}.nii.gz")))
        assert prediction.shape == (24, 24, 24) and set(np.unique(prediction)) <= {0, 1}

    # vanilla nnU-Net gets the better single network (pinned: the residual-encoder peer) and its architecture
    exported = tmp_path / "exported"
    out = _run(["nnUNetv2_semi_export", "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", trainer, "-o",
                str(exported)], env)
    assert "the single network 'peer' was exported" in out
    vanilla_env = _without_the_plugin(env, tmp_path)
    _run(["nnUNetv2_predict_from_modelfolder", "-i", str(env_folders.raw_dataset / "imagesTs"), "-o",
          str(tmp_path / "pred_vanilla"), "-m", str(exported), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
          "--disable_tta"], vanilla_env)
    assert (tmp_path / "pred_vanilla" / "test_000.nii.gz").is_file()
