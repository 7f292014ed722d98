"""``nnUNetv2_semi_demo``: labeled-only nnU-Net against Mean Teacher on a generated dataset, through nnU-Net's commands.

Generates a synthetic dataset (labeled, unlabeled and test cases with labels for scoring), plans and preprocesses it
with nnU-Net, preprocesses the unlabeled images, keeps 4 labeled cases in fold 0, trains stock ``nnUNetTrainer`` and
``nnUNetTrainerMeanTeacher`` on the same short schedule, predicts the test cases with ``nnUNetv2_predict`` and prints
and plots the Dice of both. So that it finishes in about 10 minutes on 2 CPU cores it trains a reduced network
(plans ``nnUNetDemoPlans``: the dataset's plans with 8–64 feature maps); it uses a GPU when one is present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from os.path import join

import numpy as np
import SimpleITK as sitk

from nnunet_semi.tools.progress import CommandProgress, log_tail
from nnunet_semi.trainer.plotting import isolated_style

DEMO_DATASET_ID = 993
DEMO_DATASET = f"Dataset{DEMO_DATASET_ID:03d}_SemiDemo"
DEMO_PLANS = "nnUNetDemoPlans"


def _run(args: list[str], log_file: str | None) -> None:
    """Run an nnU-Net command, its output appended to ``log_file`` (None: streamed here); on failure, raise with
    the end of the log."""
    if log_file is None:
        result = subprocess.run(args, env=os.environ)
    else:
        with open(log_file, "a") as log:
            log.write(f"\n$ {' '.join(args)}\n")
            log.flush()
            result = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    if result.returncode != 0:
        where = f"; its last lines, from {log_file}:\n{log_tail(log_file)}" if log_file else ""
        raise RuntimeError(f"{' '.join(args)} failed (exit code {result.returncode}){where}")


def reduce_network(plans: dict, features: tuple[int, ...], convs_per_stage: int | None = None) -> dict:
    """Shrink every configuration's U-Net in ``plans`` (in place) to ``features`` per stage, at most as many stages
    as before; ``convs_per_stage`` also sets the convolutions per stage (None keeps the plans' counts)."""
    for configuration in plans["configurations"].values():
        kwargs = configuration.get("architecture", {}).get("arch_kwargs")
        if kwargs is None:
            continue
        n = min(len(features), kwargs["n_stages"])
        encoder = [convs_per_stage] * n if convs_per_stage else kwargs["n_conv_per_stage"][:n]
        decoder = [convs_per_stage] * (n - 1) if convs_per_stage else kwargs["n_conv_per_stage_decoder"][:n - 1]
        kwargs.update(n_stages=n, features_per_stage=list(features[:n]), kernel_sizes=kwargs["kernel_sizes"][:n],
                      strides=kwargs["strides"][:n], n_conv_per_stage=encoder, n_conv_per_stage_decoder=decoder)
    return plans


def write_demo_plans(preprocessed_dataset: str, features: tuple[int, ...] = (8, 16, 32, 64)) -> None:
    """Copy the dataset's plans as ``nnUNetDemoPlans`` with fewer feature maps (same preprocessed data)."""
    with open(join(preprocessed_dataset, "nnUNetPlans.json")) as f:
        plans = reduce_network(json.load(f), features)
    plans["plans_name"] = DEMO_PLANS
    with open(join(preprocessed_dataset, DEMO_PLANS + ".json"), "w") as f:
        json.dump(plans, f, indent=2)


def dice_scores(prediction_folder: str, label_folder: str) -> dict[str, float]:
    """Foreground Dice (label > 0) of every prediction against its reference label, by case id."""
    scores = {}
    for name in sorted(os.listdir(label_folder)):
        reference = sitk.GetArrayFromImage(sitk.ReadImage(join(label_folder, name))) > 0
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(join(prediction_folder, name))) > 0
        denominator = reference.sum() + prediction.sum()
        scores[name.split(".")[0]] = float(2 * (reference & prediction).sum() / denominator) if denominator else 1.0
    return scores


@isolated_style
def plot_results(results: dict[str, dict[str, float]], filename: str) -> None:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(results)
    for i, name in enumerate(names):
        values = list(results[name].values())
        ax.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, alpha=0.7)
        ax.hlines(np.mean(values), i - 0.3, i + 0.3, color="black")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("Dice per test case (line: mean)")
    ax.set_ylim(0, 1)
    ax.set_title("Labeled-only nnU-Net vs. semi-supervised, same split and schedule")
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)


def run_demo(out_dir: str, baseline_trainer: str = "nnUNetTrainer_demo",
             semi_trainer: str = "nnUNetTrainerMeanTeacher_demo", num_labeled: int = 4,
             case_shape: tuple[int, ...] = (32, 32, 32), num_processes: int = 2, verbose: bool = False,
             stop_on_failure: bool = False, progress_stream=None) -> dict[str, dict[str, float]]:
    """Run the whole demo in ``out_dir``; returns trainer -> {test case: Dice}. Writes demo_results.{json,png}.

    nnU-Net's output goes to ``demo_log.txt`` (preparation) and ``demo_log_<trainer>.txt`` (each trainer's training
    and prediction), each path printed once; ``verbose`` streams it here instead. The trainings are followed on a
    progress display (``tools.progress``). A failed trainer is reported with its log's last lines and the other
    one goes on (``stop_on_failure``: the demo stops); ``SemiRunsFailed`` lists the failures at the end.
    """
    from nnunet_semi.errors import SemiRunsFailed
    from nnunet_semi.tools.demo_trainers import DEMO_EPOCHS
    import torch

    from nnunet_semi.data.dataset_io import use_nnunet_folders
    from nnunet_semi.data.splits import make_labeled_split
    from nnunet_semi.data.unlabeled import preprocess_unlabeled
    from nnunet_semi.tools.synthetic import make_synthetic_dataset
    from nnunet_semi.trainer.discovery import trainer_dir

    out_dir = os.path.abspath(out_dir)
    paths = use_nnunet_folders(out_dir)
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in (trainer_dir(), os.environ.get("nnUNet_extTrainer", "")) if p)
    os.environ.setdefault("nnUNet_n_proc_DA", str(num_processes))
    os.environ.setdefault("nnUNet_def_n_proc", str(num_processes))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(out_dir, exist_ok=True)
    log_file = None if verbose else join(out_dir, "demo_log.txt")
    start = time.time()
    trainers = (baseline_trainer, semi_trainer)
    progress = CommandProgress([(f"{t}, {num_labeled} labeled", DEMO_EPOCHS) for t in trainers],
                               progress_stream or sys.stdout, live=False if verbose else None)

    def step(message: str) -> None:
        progress.message(f"[{time.time() - start:6.0f} s] {message}")

    if log_file:
        step(f"nnU-Net's output of the preparation goes to {log_file}")

    step(f"generating {DEMO_DATASET} (labeled, unlabeled and test cases) in {paths['nnUNet_raw']}")
    raw = make_synthetic_dataset(paths["nnUNet_raw"], DEMO_DATASET_ID, name="SemiDemo", num_labeled=20,
                                 num_unlabeled=20, num_test=10, shape=case_shape, seed=2026)
    step("nnUNetv2_plan_and_preprocess")
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(DEMO_DATASET_ID), "-c", "3d_fullres", "-np",
          str(num_processes)], log_file)
    preprocessed = join(paths["nnUNet_preprocessed"], DEMO_DATASET)
    write_demo_plans(preprocessed)
    step("nnUNetv2_semi_preprocess and nnUNetv2_semi_split")
    preprocess_unlabeled(DEMO_DATASET_ID, ["3d_fullres"], num_processes=num_processes, plans_identifier=DEMO_PLANS)
    fold0 = make_labeled_split(DEMO_DATASET_ID, num_labeled)[0]
    step(f"fold 0: {len(fold0['train'])} labeled cases; unlabeled: {len(fold0['unlabeled'])} training cases + 20 "
         f"imagesUnlabeled cases; device: {device}")

    results, failures = {}, []
    for position, trainer in enumerate(trainers):
        trainer_log = None if verbose else join(out_dir, f"demo_log_{trainer}.txt")
        step(f"nnUNetv2_train {DEMO_DATASET_ID} 3d_fullres 0 -p {DEMO_PLANS} -tr {trainer}"
             + (f" (nnU-Net's output: {trainer_log})" if trainer_log else ""))
        try:
            with progress.watch(position, join(paths["nnUNet_results"], DEMO_DATASET,
                                               f"{trainer}__{DEMO_PLANS}__3d_fullres", "fold_0")):
                _run(["nnUNetv2_train", str(DEMO_DATASET_ID), "3d_fullres", "0", "-p", DEMO_PLANS, "-tr", trainer,
                      "-device", device], trainer_log)
            predictions = join(out_dir, f"predictions_{trainer}")
            step(f"nnUNetv2_predict -tr {trainer} on the {len(os.listdir(join(raw, 'imagesTs')))} test cases")
            _run(["nnUNetv2_predict", "-i", join(raw, "imagesTs"), "-o", predictions, "-d", str(DEMO_DATASET_ID),
                  "-c", "3d_fullres", "-f", "0", "-p", DEMO_PLANS, "-tr", trainer, "-device", device,
                  "-npp", "1", "-nps", "1"], trainer_log)
        except RuntimeError as error:  # the other trainer goes on (stop_on_failure: not)
            step(f"{trainer}: FAILED: {error}")
            failures.append(f"{trainer}: {str(error).splitlines()[0]}")
            if stop_on_failure:
                raise SemiRunsFailed(failures) from error
            continue
        results[trainer] = dice_scores(predictions, join(raw, "labelsTs"))
    if not results:
        raise SemiRunsFailed(failures)

    with open(join(out_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_results(results, join(out_dir, "demo_results.png"))
    print(f"\nTest Dice ({len(fold0['train'])} labeled cases, same split and schedule, {device}):")
    for trainer, scores in results.items():
        print(f"  {trainer:40s} {np.mean(list(scores.values())):.4f} ± {np.std(list(scores.values())):.4f}")
    step(f"done; results in {join(out_dir, 'demo_results.json')} and demo_results.png"
         + (f", nnU-Net's output in {out_dir}/demo_log*.txt" if log_file else ""))
    if failures:
        raise SemiRunsFailed(failures)
    return results
