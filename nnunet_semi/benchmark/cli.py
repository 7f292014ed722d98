"""``nnUNetv2_semi_benchmark quality|speed``; ``--tiny`` runs either on a generated dataset in a few minutes on CPU."""

from __future__ import annotations

import argparse
import os
import sys
from os.path import join

from nnunet_semi.errors import SemiInputError

TINY_DATASET_ID = 994


def semi_trainers() -> list[str]:
    """Every registered method (variants excluded): adding a trainer to nnunet_semi.training adds it here."""
    import nnunet_semi.training

    return [n for n in nnunet_semi.training.__all__ if "_" not in n]


def make_tiny_dataset(root: str) -> str:
    """A generated, planned and preprocessed dataset with a tiny network; exports the nnU-Net path variables."""
    from nnunet_semi.dataset_io import use_nnunet_folders
    from nnunet_semi.demo import write_demo_plans
    from nnunet_semi.synthetic import make_synthetic_dataset, plan_and_preprocess
    from nnunet_semi.unlabeled import preprocess_unlabeled

    paths = use_nnunet_folders(root)
    raw = join(paths["nnUNet_raw"], f"Dataset{TINY_DATASET_ID}_SemiTiny")
    preprocessed = join(paths["nnUNet_preprocessed"], os.path.basename(raw))
    if os.path.isfile(join(preprocessed, "nnUNetDemoPlans.json")):
        return raw  # made by an earlier run in the same folder
    make_synthetic_dataset(paths["nnUNet_raw"], TINY_DATASET_ID, name="SemiTiny", num_labeled=8, num_unlabeled=4,
                           num_test=4, shape=(24, 24, 24), seed=7)
    plan_and_preprocess(TINY_DATASET_ID, check_dataset_integrity=False)
    write_demo_plans(preprocessed, features=(4, 8, 16))
    preprocess_unlabeled(TINY_DATASET_ID, ["3d_fullres"], num_processes=1, plans_identifier="nnUNetDemoPlans")
    return raw


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    quality = sub.add_parser("quality", help="train, predict and score every trainer against labeled-only nnU-Net")
    speed = sub.add_parser("speed", help="time per iteration and peak memory as ratios to stock nnU-Net")
    for p in (quality, speed):
        p.add_argument("-d", help="dataset id or name (planned and preprocessed); not with --tiny")
        p.add_argument("-tr", nargs="+", default=None, help=f"trainers (default: {' '.join(semi_trainers())}); "
                                                             "nnUNetTrainer is always included")
        p.add_argument("-c", default="3d_fullres", help="configuration")
        p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
        p.add_argument("-o", required=True, help="output folder")
        p.add_argument("--tiny", action="store_true", help="generated tiny dataset and network: minutes on 2 CPU cores")
    quality.add_argument("--num_labeled", nargs="+", default=["8"], help="labeled counts, and 'all'")
    quality.add_argument("--epochs", type=int, default=50)
    quality.add_argument("--iterations", type=int, default=250, help="iterations per epoch")
    quality.add_argument("-f", type=int, default=0, help="fold")
    quality.add_argument("--test_labels", default=None, help="labels of imagesTs; default: the fold's val cases")
    quality.add_argument("--order", choices=("first", "random"), default="first")
    quality.add_argument("--seed", type=int, default=12345)
    speed.add_argument("--steps", type=int, default=None, help="timed steps per trainer (default 20; --tiny: 3)")
    speed.add_argument("--num_labeled", type=int, default=None,
                       help="write a labeled split first (needed when the dataset has no imagesUnlabeled)")
    args = parser.parse_args(argv)
    trainers = args.tr or semi_trainers()
    try:
        dataset, plans = args.d, args.p
        if args.tiny:
            raw = make_tiny_dataset(join(args.o, "tiny_dataset"))
            dataset, plans = TINY_DATASET_ID, "nnUNetDemoPlans"
        elif dataset is None:
            raise SemiInputError("give -d DATASET or --tiny.")
        if args.command == "quality":
            from nnunet_semi.benchmark.quality import run_quality_benchmark

            epochs, iterations = (2, 4) if args.tiny else (args.epochs, args.iterations)
            counts = ["2", "all"] if args.tiny else args.num_labeled
            test_labels = join(raw, "labelsTs") if args.tiny else args.test_labels
            run_quality_benchmark(dataset, counts, trainers, epochs, iterations, args.o, args.c, args.f, plans,
                                  test_labels, args.order, args.seed)
            print(open(join(args.o, "results.md")).read())
        else:
            from nnunet_semi.benchmark.speed import run_speed_benchmark
            from nnunet_semi.splits import make_labeled_split

            num_labeled = 2 if args.tiny else args.num_labeled
            if num_labeled is not None:
                make_labeled_split(dataset, num_labeled)
            steps = args.steps or (3 if args.tiny else 20)
            run_speed_benchmark(dataset, trainers, args.o, args.c, plans, steps=steps, warmup=1 if args.tiny else 3)
            print(open(join(args.o, "speed.md")).read())
    except SemiInputError as e:
        print(f"nnUNetv2_semi_benchmark: error: {e}", file=sys.stderr)
        sys.exit(2)
