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


def summarize_demo(results: dict[str, dict[str, float]]) -> dict:
    """Mean, std and count of each trainer's test Dice, and the per-case difference of the last trainer to the first
    (mean, std, cases better / worse): what ``demo_results.json`` and the plot state."""
    summary = {name: {"mean": float(np.mean(list(v.values()))), "std": float(np.std(list(v.values()))),
                      "cases": len(v)} for name, v in results.items()}
    names = list(results)
    if len(names) >= 2:
        first, last = results[names[0]], results[names[-1]]
        shared = sorted(set(first) & set(last))
        difference = np.array([last[c] - first[c] for c in shared])
        summary["difference"] = {"of": names[-1], "minus": names[0], "mean": float(difference.mean()),
                                 "std": float(difference.std()), "better": int((difference > 0).sum()),
                                 "worse": int((difference < 0).sum()), "cases": len(shared)}
    return summary


@isolated_style
def plot_results(results: dict[str, dict[str, float]], filename: str) -> None:
    """Per-case pairs: one line per test case from the first trainer's Dice to the next one's, the axis fitted to
    the data, each trainer's mean ± std and the mean difference written on the figure."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    names, summary = list(results), summarize_demo(results)
    cases = sorted(set.intersection(*(set(v) for v in results.values())))
    fig, ax = plt.subplots(figsize=(6, 5))
    for case in cases:
        values = [results[n][case] for n in names]
        better = values[-1] > values[0]
        ax.plot(range(len(names)), values, marker="o", color="tab:green" if better else "tab:red", alpha=0.6)
    every = [v for r in results.values() for v in r.values()]
    margin = max(0.01, 0.1 * (max(every) - min(every)))
    ax.set_ylim(max(0.0, min(every) - margin), min(1.0, max(every) + margin))
    ax.set_xlim(-0.4, len(names) - 0.6)
    ax.set_xticks(range(len(names)), [f"{n}\n{summary[n]['mean']:.3f} ± {summary[n]['std']:.3f}" for n in names])
    ax.set_ylabel("Dice per test case (a line per case)")
    title = "Same split and schedule"
    if "difference" in summary:
        d = summary["difference"]
        title += (f": difference {d['mean']:+.3f} ± {d['std']:.3f},\nbetter on {d['better']} of {d['cases']} "
                  f"cases (green), worse on {d['worse']} (red)")
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
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
    import torch

    from nnunet_semi.data.dataset_io import use_nnunet_folders
    from nnunet_semi.data.splits import make_labeled_split
    from nnunet_semi.data.unlabeled import preprocess_unlabeled
    from nnunet_semi.errors import SemiRunsFailed
    from nnunet_semi.tools.demo_trainers import DEMO_EPOCHS
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
        json.dump({"summary": summarize_demo(results), "per_case": results}, f, indent=2)
    plot_results(results, join(out_dir, "demo_results.png"))
    print(f"\nTest Dice ({len(fold0['train'])} labeled cases, same split and schedule, {device}):")
    for trainer, scores in results.items():
        print(f"  {trainer:40s} {np.mean(list(scores.values())):.4f} ± {np.std(list(scores.values())):.4f}")
    step(f"done; results in {join(out_dir, 'demo_results.json')} and demo_results.png"
         + (f", nnU-Net's output in {out_dir}/demo_log*.txt" if log_file else ""))
    if failures:
        raise SemiRunsFailed(failures)
    return results
