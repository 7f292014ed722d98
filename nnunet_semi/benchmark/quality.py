"""``nnUNetv2_semi_benchmark quality``: segmentation quality of each trainer against labeled-only nnU-Net.

For every labeled count N: rewrite the split (``--order first`` by default), train every trainer on the same split
and schedule (stock ``nnUNetTrainer`` always included; ``all`` trains it alone on the full split, the supervised
upper bound), predict the held-out cases with nnU-Net's predictor and score them per foreground class with medpy:
Dice, Jaccard, 95 % Hausdorff distance and average surface distance, in mm (image spacing) and in voxels (the
papers' convention). Finished runs are skipped and interrupted ones resume from ``checkpoint_latest.pth``.
"""

from __future__ import annotations

import csv
import math
import os
from os.path import isdir, isfile, join

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_semi.benchmark.common import (
    BASELINE_TRAINER,
    load_plans_and_dataset_json,
    provenance,
    resolve_trainer,
    with_schedule,
)
from nnunet_semi.dataset_io import require_env_folder, resolve_dataset_name
from nnunet_semi.errors import SemiInputError
from nnunet_semi.plotting import isolated_style

METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")


def case_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...], label: int) -> dict:
    """medpy's binary metrics of one class; distances NaN when either mask is empty (undefined)."""
    from medpy.metric import binary

    pred, ref = prediction == label, reference == label
    both_empty = not pred.any() and not ref.any()
    result = {"dice": 1.0 if both_empty else float(binary.dc(pred, ref)),
              "jaccard": 1.0 if both_empty else float(binary.jc(pred, ref))}
    for unit, voxelspacing in (("mm", spacing), ("vox", None)):
        defined = pred.any() and ref.any()
        result[f"hd95_{unit}"] = float(binary.hd95(pred, ref, voxelspacing)) if defined else math.nan
        result[f"asd_{unit}"] = float(binary.asd(pred, ref, voxelspacing)) if defined else math.nan
    return result


def _held_out_cases(raw: str, dataset_json: dict, split: dict, test_labels: str | None) -> dict[str, tuple]:
    """case id -> (image files, reference label file)."""
    ending = dataset_json["file_ending"]
    channels = len(dataset_json["channel_names"])
    if test_labels is not None:
        ids = sorted(f[:-len(ending)] for f in os.listdir(test_labels) if f.endswith(ending))
        folder, label_folder = join(raw, "imagesTs"), test_labels
    else:
        ids, folder, label_folder = sorted(split["val"]), join(raw, "imagesTr"), join(raw, "labelsTr")
    cases = {}
    for case in ids:
        images = [join(folder, f"{case}_{c:04d}{ending}") for c in range(channels)]
        missing = [f for f in images + [join(label_folder, case + ending)] if not isfile(f)]
        if missing:
            raise SemiInputError(f"held-out case {case}: missing {missing}. Check --test_labels and imagesTs.")
        cases[case] = (images, join(label_folder, case + ending))
    return cases


def _train(trainer_cls: type, plans: dict, configuration: str, fold: int, dataset_json: dict,
           device: torch.device) -> str:
    """Train (or resume, or skip when finished); returns the fold's output folder."""
    trainer = trainer_cls(plans | {"continue_training": True}, configuration, fold, dataset_json, device=device)
    final = join(trainer.output_folder, "checkpoint_final.pth")
    if isfile(final):
        print(f"{trainer_cls.__name__}: finished earlier, skipping training")
        return trainer.output_folder
    latest = join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.initialize()
    if isfile(latest):
        trainer.load_checkpoint(latest)
    trainer.run_training()
    return trainer.output_folder


def _predict(trainer_cls: type, output_folder: str, plans: dict, configuration: str, dataset_json: dict,
             cases: dict, prediction_folder: str, device: torch.device) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    checkpoint = torch.load(join(output_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    network = trainer_cls.build_network_architecture(
        plans_manager, cm, determine_num_input_channels(plans_manager, cm, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda",
                                allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, cm, [checkpoint["network_weights"]], dataset_json,
                                    trainer_cls.__name__, checkpoint["inference_allowed_mirroring_axes"])
    os.makedirs(prediction_folder, exist_ok=True)
    todo = [c for c in cases if not isfile(join(prediction_folder, c + dataset_json["file_ending"]))]
    if todo:
        predictor.predict_from_files([cases[c][0] for c in todo], [join(prediction_folder, c) for c in todo],
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)


def run_quality_benchmark(dataset_name_or_id: int | str, num_labeled: list[str], trainers: list[str], epochs: int,
                          iterations: int, out_dir: str, configuration: str = "3d_fullres", fold: int = 0,
                          plans_identifier: str = "nnUNetPlans", test_labels: str | None = None,
                          order: str = "first", seed: int = 12345, val_iterations: int | None = None,
                          device: torch.device | None = None) -> list[dict]:
    """Train, predict and score; writes ``results.csv``, ``results.md`` and ``results.png`` into ``out_dir``.

    Args:
        dataset_name_or_id: a planned and preprocessed dataset (its ``imagesUnlabeled``, if any, preprocessed too).
        num_labeled: labeled counts as strings: integers, or ``"all"`` (stock nnU-Net on the full split).
        trainers: semi-supervised trainer names; ``nnUNetTrainer`` is always added as the baseline.
        epochs, iterations: the schedule, identical for every trainer.
        out_dir: where results and predictions go.
        test_labels: folder with the labels of ``imagesTs``; None: evaluate on the fold's validation cases.
    """
    from nnunet_semi.dataset_io import save_json_atomic
    from nnunet_semi.splits import SPLITS_FILE, full_splits, make_labeled_split

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dataset_name = resolve_dataset_name(dataset_name_or_id)
    raw = join(require_env_folder("nnUNet_raw"), dataset_name)
    preprocessed = join(require_env_folder("nnUNet_preprocessed"), dataset_name)
    if not isfile(join(preprocessed, plans_identifier + ".json")):
        raise SemiInputError(f"{dataset_name} is not planned: run nnUNetv2_plan_and_preprocess -d "
                             f"{dataset_name_or_id} -c {configuration} (and nnUNetv2_semi_preprocess) first.")
    if test_labels is not None and not isdir(test_labels):
        raise SemiInputError(f"--test_labels {test_labels} is not a folder.")
    plans, dataset_json = load_plans_and_dataset_json(preprocessed, plans_identifier)
    labels = PlansManager(plans).get_label_manager(dataset_json).foreground_labels
    all_trainers = [BASELINE_TRAINER] + [t for t in trainers if t != BASELINE_TRAINER]
    classes = {t: resolve_trainer(t) for t in all_trainers}
    info = provenance(device)
    val_iterations = val_iterations if val_iterations is not None else max(1, iterations // 5)
    os.makedirs(out_dir, exist_ok=True)

    rows = []
    for count in num_labeled:
        if count == "all":  # the full split: stock nnU-Net on every label, the upper bound
            full = full_splits(preprocessed, raw)
            save_json_atomic(full, join(preprocessed, SPLITS_FILE))
            split, run_trainers = full[fold], [BASELINE_TRAINER]
        else:
            split = make_labeled_split(dataset_name, int(count), order, seed)[fold]
            run_trainers = all_trainers
        cases = _held_out_cases(raw, dataset_json, split, test_labels)
        for name in run_trainers:
            tag = f"bench_{count}lab_{epochs}x{iterations}"
            trainer_cls = with_schedule(classes[name], epochs, iterations, val_iterations, tag)
            output_folder = _train(trainer_cls, plans, configuration, fold, dataset_json, device)
            predictions = join(out_dir, "predictions", f"{name}_{count}")
            _predict(trainer_cls, output_folder, plans, configuration, dataset_json, cases, predictions, device)
            for case, (_, label_file) in cases.items():
                reference_image = sitk.ReadImage(label_file)
                reference = sitk.GetArrayFromImage(reference_image)
                prediction = sitk.GetArrayFromImage(sitk.ReadImage(join(predictions, case + dataset_json["file_ending"])))
                spacing = tuple(reference_image.GetSpacing())[::-1]
                for label in labels:
                    rows.append({"trainer": name, "num_labeled": count, "case": case, "class": label,
                                 **case_metrics(prediction, reference, spacing, label),
                                 "dataset": dataset_name, "configuration": configuration, "fold": fold,
                                 "epochs": epochs, "iterations_per_epoch": iterations, "seed": seed,
                                 "evaluated_on": "imagesTs" if test_labels else f"fold {fold} val", **info})
    write_results(rows, out_dir)
    return rows


def write_results(rows: list[dict], out_dir: str) -> None:
    """results.csv (every row), results.md (mean ± std and gain over the baseline) and results.png."""
    if not rows:
        raise SemiInputError("no results to write: no trainer produced predictions.")
    with open(join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    info = rows[0]
    lines = [f"# Quality: {info['dataset']}, {info['configuration']}, fold {info['fold']}, evaluated on "
             f"{info['evaluated_on']}", "",
             f"Schedule {info['epochs']} epochs x {info['iterations_per_epoch']} iterations for every trainer; "
             f"commit {info['commit']}, nnU-Net {info['nnunetv2']}, torch {info['torch']}, device {info['device']}, "
             f"{info['date']}. Mean ± std over cases (and foreground classes); distances are NaN-excluded means "
             f"(a distance is undefined when a mask is empty). Gain: Dice points over nnUNetTrainer with the same "
             f"labeled cases.", "",
             "| labeled | trainer | Dice % | gain | Jaccard % | 95HD mm | ASD mm | 95HD vox | ASD vox |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (count, trainer), stats in summary.items():
        cells = [f"{stats[m][0]:.2f} ± {stats[m][1]:.2f}" for m in METRICS]
        gain = stats.get("gain")
        lines.append(f"| {count} | {trainer} | {cells[0]} | {'' if gain is None else f'{gain:+.2f}'} | "
                     f"{' | '.join(cells[1:])} |")
    with open(join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_results(rows, summary, join(out_dir, "results.png"))


def summarize(rows: list[dict]) -> dict:
    """(labeled count, trainer) -> metric -> (mean, std) with Dice and Jaccard in %, plus 'gain' in Dice points."""
    summary = {}
    for key in dict.fromkeys((r["num_labeled"], r["trainer"]) for r in rows):
        selected = [r for r in rows if (r["num_labeled"], r["trainer"]) == key]
        stats = {}
        for metric in METRICS:
            values = np.array([r[metric] for r in selected], dtype=float)
            values = values * 100 if metric in ("dice", "jaccard") else values
            values = values[np.isfinite(values)]
            stats[metric] = (float(values.mean()), float(values.std())) if len(values) else (math.nan, math.nan)
        summary[key] = stats
    for (count, trainer), stats in summary.items():
        baseline = summary.get((count, BASELINE_TRAINER))
        if baseline is not None and trainer != BASELINE_TRAINER:
            stats["gain"] = stats["dice"][0] - baseline["dice"][0]
    return summary


@isolated_style
def plot_results(rows: list[dict], summary: dict, filename: str) -> None:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    counts = list(dict.fromkeys(r["num_labeled"] for r in rows))
    trainers = list(dict.fromkeys(r["trainer"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    for i, trainer in enumerate(trainers):
        xs = [j for j, c in enumerate(counts) if (c, trainer) in summary]
        means = [summary[(counts[j], trainer)]["dice"][0] for j in xs]
        stds = [summary[(counts[j], trainer)]["dice"][1] for j in xs]
        left.errorbar(np.array(xs) + 0.05 * i, means, yerr=stds, marker="o", capsize=3, label=trainer)
        for j in xs:
            values = [100 * r["dice"] for r in rows if r["trainer"] == trainer and r["num_labeled"] == counts[j]]
            right.scatter(np.full(len(values), j + 0.12 * (i - (len(trainers) - 1) / 2)), values, s=12,
                          alpha=0.7, color=f"C{i}", label=trainer if j == xs[0] else None)
    for axis in (left, right):
        axis.set_xticks(range(len(counts)), [str(c) for c in counts])
        axis.set_xlabel("labeled cases")
        axis.set_ylabel("Dice %")
        axis.grid(alpha=0.3)
    left.set_title("mean ± std Dice")
    right.set_title("per case and class")
    left.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)
