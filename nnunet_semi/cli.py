"""Every console entry point of the plugin: argparse wrappers around its API functions (nnU-Net's ``*_entry``
pattern), with one error style: bad input ends the command with one ``<command>: error: ...`` line and exit code 2.

Heavy modules are imported inside the entries, so that ``--help`` and the quick commands start at once."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from os.path import join

from nnunet_semi.errors import SemiInputError, SemiRunsFailed


def _reports_input_errors(entry):
    """Bad input ends the command with one ``error:`` line and exit code 2, like argparse's own errors; failed runs
    of a command that went on are listed at its end, exit code 1."""

    @functools.wraps(entry)
    def wrapped(argv=None):
        prog = entry.__name__.removesuffix("_entry")
        try:
            entry(argv)
        except SemiInputError as e:
            print(f"nnUNetv2_semi_{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except SemiRunsFailed as e:
            print(f"nnUNetv2_semi_{prog}: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapped


@_reports_input_errors
def trainer_dir_entry(argv=None):
    parser = argparse.ArgumentParser(
        description="Print the folder to put in nnUNet_extTrainer so that nnUNetv2_train/nnUNetv2_predict find the "
                    "nnunet-semi trainers: export nnUNet_extTrainer=\"$(nnUNetv2_semi_trainer_dir)\"")
    parser.parse_args(argv)
    from nnunet_semi.trainer.discovery import trainer_dir

    print(trainer_dir())


@_reports_input_errors
def preprocess_entry(argv=None):
    from nnunetv2.configuration import default_num_processes

    parser = argparse.ArgumentParser(
        description="Preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled with the dataset's existing plans, through "
                    "nnU-Net's own preprocessor, into <data_identifier>_unlabeled beside the labeled data.")
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", nargs="+", required=True, help="configuration(s) from the plans, e.g. 3d_fullres")
    parser.add_argument("-np", type=int, default=default_num_processes,
                        help=f"worker processes (default {default_num_processes}; 1 runs in this process)")
    parser.add_argument("-plans_name", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    args = parser.parse_args(argv)
    from nnunet_semi.data.unlabeled import preprocess_unlabeled

    preprocess_unlabeled(args.d, args.c, num_processes=args.np, plans_identifier=args.plans_name)


@_reports_input_errors
def split_entry(argv=None):
    parser = argparse.ArgumentParser(
        description="Rewrite splits_final.json so that each fold trains on N labeled cases; the fold's other "
                    "training cases go to a new 'unlabeled' key (their labels are never read). The original split "
                    "is kept in splits_final.original.json.")
    parser.add_argument("-d", required=True, help="dataset id or name")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--num_labeled", type=int, help="labeled cases per fold")
    group.add_argument("--restore", action="store_true", help="restore the original split and exit")
    parser.add_argument("--order", choices=("first", "random"), default="first",
                        help="'first': the first N training cases in sorted order (the papers' protocol on LA); "
                             "'random': a seeded random draw")
    parser.add_argument("--seed", type=int, default=12345, help="seed for --order random (fold k uses seed + k)")
    parser.add_argument("--num_val", type=int, default=None,
                        help="one fold (0) validating on the last K cases in sorted order, instead of the 5 folds")
    args = parser.parse_args(argv)
    from nnunet_semi.data.splits import make_labeled_split, restore_original_split

    if args.restore:
        splits = restore_original_split(args.d)
        print(f"restored the original split ({len(splits)} folds)")
        return
    splits = make_labeled_split(args.d, args.num_labeled, order=args.order, seed=args.seed, num_val=args.num_val)
    for k, fold in enumerate(splits):
        print(f"fold {k}: {len(fold['train'])} labeled, {len(fold['unlabeled'])} unlabeled, {len(fold['val'])} val")


@_reports_input_errors
def export_entry(argv=None):
    parser = argparse.ArgumentParser(
        description="Copy a trained nnunet-semi model folder as an nnUNetTrainer model that vanilla nnU-Net (without "
                    "this plugin) predicts with: nnUNetv2_predict_from_modelfolder -m OUT ...")
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", required=True, help="trainer the model was trained with")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-o", required=True, help="output folder (new or empty)")
    parser.add_argument("--network", default="best", choices=("best", "student", "peer"),
                        help="dual-network trainers (DualCCE) only: which single network to export, as vanilla "
                             "nnU-Net cannot run their ensemble. best (default): the one that validated better alone")
    args = parser.parse_args(argv)
    from nnunet_semi.data.dataset_io import load_json, require_env_folder, resolve_dataset_name
    from nnunet_semi.tools.export import export_vanilla

    results = require_env_folder("nnUNet_results")
    model_folder = join(results, resolve_dataset_name(args.d), f"{args.tr}__{args.p}__{args.c}")
    for path in export_vanilla(model_folder, args.o, single_network=args.network):
        print(f"exported {path}")
    provenance = load_json(join(args.o, "semi_export.json"))
    for checkpoint, record in provenance.items():
        if "exported_network" in record:
            print(f"{checkpoint}: trained as a dual network (deployed: {record['deployed_weights']}); vanilla nnU-Net "
                  f"cannot run the ensemble, so the single network '{record['exported_network']}' was exported")


@_reports_input_errors
def pseudolabel_entry(argv=None) -> None:
    from nnunet_semi.tools.self_training import SOURCES

    parser = argparse.ArgumentParser(
        description="Pseudo-label a fold's unlabeled cases with a trained model (nnU-Net's predictor, a fold "
                    "ensemble by default) into a new nnU-Net raw dataset: the fold's labeled and validation cases "
                    "unchanged, the pseudo-labeled cases added, uncertain voxels set to the ignore label.")
    parser.add_argument("-d", required=True, help="source dataset id or name")
    parser.add_argument("-tr", required=True, help="trainer of the model (any: nnUNetTrainer, a semi trainer)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", nargs="+", default=None, help="model folds to ensemble (default: every trained fold)")
    parser.add_argument("--fold", type=int, default=0,
                        help="the split fold whose unlabeled cases are predicted and whose validation cases stay "
                             "out (default 0)")
    parser.add_argument("-o_id", type=int, required=True, help="id of the new dataset")
    parser.add_argument("-o_name", required=True, help="name of the new dataset (Dataset<id>_<name>)")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES,
                        help="where the unlabeled cases come from (default: both)")
    parser.add_argument("--voxel_threshold", type=float, default=0.9,
                        help="keep the argmax where the ensemble's max probability reaches this, else the ignore "
                             "label (default 0.9)")
    parser.add_argument("--no_ignore", action="store_true", help="hard argmax everywhere, no ignore label")
    parser.add_argument("--case_threshold", type=float, default=0.0,
                        help="leave out cases whose confidence (mean max probability over the predicted "
                             "foreground) is below this (default 0: keep all)")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="default cuda")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring at prediction")
    parser.add_argument("-np", type=int, default=2, help="worker processes for pre- and postprocessing")
    args = parser.parse_args(argv)
    from nnunet_semi.tools.self_training import pseudolabel_dataset

    folds = None if args.f is None else tuple(f if f == "all" else int(f) for f in args.f)
    result = pseudolabel_dataset(args.d, args.tr, args.c, args.o_id, args.o_name, plans=args.p, fold=args.fold,
                                 folds=folds, sources=tuple(args.sources), voxel_threshold=args.voxel_threshold,
                                 case_threshold=args.case_threshold, mask_uncertain=not args.no_ignore,
                                 copy_images=args.copy, checkpoint=args.chk, device=args.device,
                                 use_mirroring=not args.disable_tta, num_processes=args.np)
    print(f"{result['dataset']}: {len(result['kept'])} pseudo-labeled cases added, {len(result['left_out'])} left "
          f"out below --case_threshold {args.case_threshold}; per-case scores in {result['table']}")


@_reports_input_errors
def selftrain_entry(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Offline self-training with plain nnU-Net commands, resumable at every step: the teacher "
                    "pseudo-labels the fold's unlabeled cases into a new dataset (nnUNetv2_semi_pseudolabel), "
                    "which is planned with the source's plans, preprocessed and trained on; each round's student "
                    "is the next round's teacher. Run the same command again to resume.")
    parser.add_argument("-d", required=True, help="source dataset id or name")
    parser.add_argument("-tr", required=True, help="the first teacher's trainer (trained here if not finished)")
    parser.add_argument("-o_id", type=int, required=True, help="id of round 1's dataset (round r: o_id + r - 1)")
    parser.add_argument("-o_name", required=True, help="name of the derived datasets (<name>_round<r>)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of pseudo-labeling and training (default 1)")
    parser.add_argument("--student", default="nnUNetTrainer", help="the students' trainer (default nnUNetTrainer)")
    parser.add_argument("--finetune", metavar="TRAINER",
                        help="then fine-tune each student on the labeled cases alone with this trainer (e.g. "
                             "nnUNetTrainer_50epochs; nnU-Net's -pretrained_weights, which re-initializes the "
                             "segmentation heads); the fine-tuned model is the round's model")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--fold", type=int, default=0, help="the split fold (default 0)")
    parser.add_argument("--voxel_threshold", type=float, default=0.9, help="as nnUNetv2_semi_pseudolabel")
    parser.add_argument("--case_threshold", type=float, default=0.0, help="as nnUNetv2_semi_pseudolabel")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="default cuda")
    parser.add_argument("--disable_tta", action="store_true", help="no mirroring when pseudo-labeling")
    parser.add_argument("-np", type=int, default=2, help="worker processes of nnU-Net's pre- and postprocessing")
    args = parser.parse_args(argv)
    from nnunet_semi.tools.self_training import self_train

    students = self_train(args.d, args.tr, args.o_id, args.o_name, rounds=args.rounds, configuration=args.c,
                          plans=args.p, fold=args.fold, student=args.student, finetune=args.finetune,
                          voxel_threshold=args.voxel_threshold,
                          case_threshold=args.case_threshold, device=args.device,
                          use_mirroring=not args.disable_tta, num_processes=args.np)
    print(f"models of the rounds: {', '.join(students)}")


@_reports_input_errors
def example_entry(argv=None) -> None:
    from nnunet_semi.tools.example import EXAMPLE_DATASET_ID, run_example

    parser = argparse.ArgumentParser(description="Generate an example dataset and run the whole nnunet-semi set-up.")
    parser.add_argument("--out", default="demo_output", help="folder for nnUNet_raw/preprocessed/results")
    parser.add_argument("-np", type=int, default=2, help="worker processes")
    args = parser.parse_args(argv)
    paths = run_example(args.out, args.np)
    from nnunet_semi.trainer.discovery import trainer_dir

    exports = "\n".join(f"export {k}={v}" for k, v in paths.items())
    print(f"\nExample ready (Dataset{EXAMPLE_DATASET_ID}_SemiExample). To train:\n\n{exports}\n"
          f"export nnUNet_extTrainer=\"{trainer_dir()}\"\n"
          f"nnUNetv2_train {EXAMPLE_DATASET_ID} 3d_fullres 0 -tr nnUNetTrainer             # labeled-only baseline\n"
          f"nnUNetv2_train {EXAMPLE_DATASET_ID} 3d_fullres 0 -tr nnUNetTrainerMeanTeacher  # semi-supervised\n")


@_reports_input_errors
def demo_entry(argv=None) -> None:
    from nnunet_semi.tools.demo import DEMO_DATASET, run_demo

    parser = argparse.ArgumentParser(
        description="Labeled-only nnU-Net against Mean Teacher on a generated dataset, through nnU-Net's commands "
                    "(about 10 minutes on 2 CPU cores).")
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="stream nnU-Net's output here (default: demo_log*.txt in --out, and a progress display)")
    parser.add_argument("--stop_on_failure", action="store_true",
                        help="stop when a trainer fails (default: report it and go on with the other)")
    args = parser.parse_args(argv)
    earlier = join(args.out, "nnUNet_results", DEMO_DATASET)
    if os.path.isdir(earlier):
        raise SemiInputError(f"{earlier} exists from an earlier run. Remove {args.out} or pass another --out.")
    run_demo(args.out, verbose=args.verbose, stop_on_failure=args.stop_on_failure)


@_reports_input_errors
def benchmark_entry(argv=None) -> None:
    from nnunet_semi.tools.benchmark.coarse import (
        COARSE_EPOCHS,
        COARSE_ITERATIONS,
        COARSE_NUM_VAL,
        COARSE_RAMPUP_FRACTION,
        DEFAULT_MAX_PATCH_VOXELS,
    )
    from nnunet_semi.tools.benchmark.common import TINY_DATASET_ID, make_tiny_dataset, semi_trainers

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["cell"]:
        _forward_cell(argv[1:])
        return
    parser = argparse.ArgumentParser(
        description="nnUNetv2_semi_benchmark quality|speed|report: --tiny runs on a generated dataset in a "
                    "few minutes on CPU, quality --coarse any real dataset on a coarse grid with a small U-Net in "
                    "about an hour per trainer on CPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    quality = sub.add_parser("quality", help="train, predict and score every trainer against labeled-only nnU-Net")
    speed = sub.add_parser("speed", help="time per iteration and peak memory as ratios to stock nnU-Net")
    for p in (quality, speed):
        p.add_argument("-d", help="dataset id or name (planned and preprocessed); not with --tiny")
        p.add_argument("-tr", nargs="+", default=None, help=f"trainers (default: {' '.join(semi_trainers())}); "
                                                             "nnUNetTrainer is always included; quality also "
                                                             "takes selftrain (offline self-training)")
        p.add_argument("-c", default="3d_fullres", help="configuration")
        p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
        p.add_argument("-o", required=True, help="output folder")
        p.add_argument("--tiny", action="store_true", help="generated tiny dataset and network: minutes on 2 CPU cores")
    quality.add_argument("--num_labeled", nargs="+", default=["8"],
                         help="labeled counts (positive integers), and 'all'")
    for p in (quality, speed):
        p.add_argument("-v", "--verbose", action="store_true",
                       help="stream nnU-Net's output of every run here (default: a log file per run in -o/logs, its "
                            "path printed once, and a progress display)")
        p.add_argument("--stop_on_failure", action="store_true",
                       help="stop at the first failed run (default: report it, go on with the others, list the "
                            "failures at the end and exit with code 1)")
    quality.add_argument("--selftrain_rounds", type=int, default=1,
                         help="rounds of 'selftrain' in -tr (offline self-training: the stock run as teacher, "
                              "stock students on its pseudo labels); default 1")
    quality.add_argument("--epochs", type=int, default=None, help=f"default 50; --coarse: {COARSE_EPOCHS}")
    quality.add_argument("--iterations", type=int, default=None,
                         help=f"iterations per epoch; default 250; --coarse: {COARSE_ITERATIONS}")
    quality.add_argument("-f", type=int, default=0, help="fold")
    quality.add_argument("--test_labels", default=None, help="labels of imagesTs; default: the fold's val cases")
    quality.add_argument("--order", choices=("first", "random"), default="first")
    quality.add_argument("--seed", type=int, default=12345, help="seed of --order random and of every run")
    quality.add_argument("--num_val", type=int, default=None,
                         help=f"validate on the last K training cases (one fold, 0); --coarse default: "
                              f"{COARSE_NUM_VAL}, or the fold's own split with 0")
    quality.add_argument("--jobs", type=int, default=1,
                         help="train the runs of each labeled count as this many processes side by side on the "
                              "device (data-loading workers and CPU threads split between them); default 1")
    quality.add_argument("--repeats", type=int, default=1,
                         help="train stock nnU-Net this many times (seeds seed, seed+1, ...): its run-to-run spread")
    quality.add_argument("--rampup_iterations", type=int, default=None,
                         help=f"one unsupervised ramp length in iterations for every method; default: each "
                              f"method's own; --coarse: {COARSE_RAMPUP_FRACTION:.0%}% of the run")
    quality.add_argument("--score_members", "--score_ema_pair", dest="score_members", action="store_true",
                         help="also score every model a run holds, whichever is deployed: the student and the EMA "
                              "teacher, or a dual network's two networks and their ensemble (--score_ema_pair: the "
                              "older name)")
    quality.add_argument("--predict_test", action="store_true",
                         help="also predict imagesTs (no labels needed) and pack it per run (--coarse: on when "
                              "imagesTs exists)")
    quality.add_argument("--warm_start", action="store_true",
                         help="warm-start mode: stock nnU-Net trains on the labeled cases, then every trainer and "
                              "the control nnUNetTrainer_warmStart (stock continued, loaded the same way, --repeats "
                              "seeds) continue from its checkpoint for the same schedule; gains are over the control")
    quality.add_argument("--method_repeats", type=int, default=1,
                         help="seeds of every trainer other than the baseline (default 1): their own spread")
    quality.add_argument("--coarse", action="store_true",
                         help="plan a copy of the dataset at a coarse spacing (median case in one patch of at most "
                              "--coarse_voxels voxels) with a 16-128-feature U-Net, and train on it")
    quality.add_argument("--coarse_voxels", type=int, default=DEFAULT_MAX_PATCH_VOXELS,
                         help="--coarse: most voxels in one patch (default %(default)s)")
    quality.add_argument("--coarse_spacing", type=float, nargs="+", default=None,
                         help="--coarse: this target spacing in mm (one value: isotropic) instead of the derived one")
    report = sub.add_parser("report", help="merge quality result folders of one dataset and split protocol")
    report.add_argument("folders", nargs="+", help="result folders of nnUNetv2_semi_benchmark quality")
    report.add_argument("-o", required=True, help="output folder of the merged table and plot")
    report.add_argument("--readme", default=None,
                        help="also rewrite the marked results block of this file (e.g. benchmarks/results/README.md) with the "
                             "merged tables")
    speed.add_argument("--steps", type=int, default=None, help="timed steps per trainer (default 20; --tiny: 3)")
    speed.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny: 1)")
    speed.add_argument("--compute_only", action="store_true",
                       help="time only the steps without data loading: the compute ratio, half the run (on a CPU the "
                            "augmentation workers share the cores, so the time with loading says nothing of a GPU)")
    speed.add_argument("--num_labeled", type=int, default=None,
                       help="write a labeled split first (needed when the dataset has no imagesUnlabeled)")
    args = parser.parse_args(argv)
    if args.command == "report":
        from nnunet_semi.tools.benchmark.report import merge_results, write_into_readme

        if args.readme is not None and not os.path.isfile(args.readme):
            raise SemiInputError(f"--readme {args.readme}: no such file.")
        merge_results(args.folders, args.o)
        if args.readme is not None:
            command = " ".join(["nnUNetv2_semi_benchmark report", *args.folders, "-o", args.o, "--readme",
                                args.readme])
            write_into_readme(join(args.o, "results.md"), args.readme, command)
        print(open(join(args.o, "results.md")).read())
        return
    trainers = args.tr or semi_trainers()
    dataset, plans = args.d, args.p
    _check_benchmark_input(args, trainers)  # all of it, before anything is generated, planned or written
    if args.command == "quality" and (args.jobs < 1 or args.repeats < 1 or args.method_repeats < 1):
        raise SemiInputError(f"--jobs {args.jobs}: give at least 1 (1 trains one run after the other)."  # before
                             if args.jobs < 1 else f"--repeats {args.repeats} --method_repeats "  # anything is written
                             f"{args.method_repeats}: give at least 1 each.")
    if args.command == "quality" and args.selftrain_rounds < 1:
        raise SemiInputError(f"--selftrain_rounds {args.selftrain_rounds}: give at least 1.")
    if args.command == "speed" and "selftrain" in trainers:
        raise SemiInputError("-tr selftrain: offline self-training is several stock trainings, not a training step "
                             "of its own; time it with quality (its training min) or leave it out of speed.")
    if args.command == "speed" and ((args.steps is not None and args.steps < 1) or
                                    (args.warmup is not None and args.warmup < 0)):
        raise SemiInputError(f"--steps {args.steps} --warmup {args.warmup}: give at least 1 timed step and no "
                             f"negative warm-up.")
    if args.tiny and getattr(args, "coarse", False):
        raise SemiInputError("--tiny and --coarse exclude each other: --coarse plans a dataset given with -d.")
    if args.tiny:
        with _planning_output(args):
            raw = make_tiny_dataset(join(args.o, "tiny_dataset"))
        dataset, plans = TINY_DATASET_ID, "nnUNetDemoPlans"
    elif dataset is None:
        raise SemiInputError("give -d DATASET or --tiny.")
    if args.command == "quality":
        _quality_command(args, dataset, plans, trainers, raw if args.tiny else None)
    else:
        from nnunet_semi.data.splits import make_labeled_split
        from nnunet_semi.tools.benchmark.speed import run_speed_benchmark

        num_labeled = 2 if args.tiny else args.num_labeled
        if num_labeled is not None:
            make_labeled_split(dataset, num_labeled)
        steps = args.steps if args.steps is not None else (3 if args.tiny else 20)
        warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
        run_speed_benchmark(dataset, trainers, args.o, args.c, plans, steps=steps, warmup=warmup,
                            compute_only=args.compute_only, verbose=args.verbose,
                            stop_on_failure=args.stop_on_failure)
        print(open(join(args.o, "speed.md")).read())


def _check_benchmark_input(args, trainers: list[str]) -> None:
    """Every option of quality and speed that can be checked without the data: trainers resolved, counts, fold,
    label folder, the optional dependency. Raises ``SemiInputError`` (one line) before anything is written."""
    from nnunet_semi.tools.benchmark.common import resolve_trainer

    for name in trainers:
        if name != "selftrain":  # offline self-training is stock trainings, refused by speed below
            resolve_trainer(name)
    if args.command != "quality":
        return
    from nnunet_semi.tools.benchmark.scoring import require_medpy

    require_medpy()
    for count in args.num_labeled:
        if count != "all" and not (count.isdigit() and int(count) > 0):
            raise SemiInputError(f"--num_labeled {count}: neither a positive number of labeled cases nor 'all'.")
    args.num_labeled = [c if c == "all" else str(int(c)) for c in args.num_labeled]
    if args.f < 0:
        raise SemiInputError(f"-f {args.f}: give a fold index (0, 1, ...).")
    if args.num_val and args.f != 0:
        raise SemiInputError(f"-f {args.f} with --num_val: the held-out split has one fold, 0.")
    if args.test_labels is not None and not os.path.isdir(args.test_labels):
        raise SemiInputError(f"--test_labels {args.test_labels} is not a folder.")
    for option in ("epochs", "iterations"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise SemiInputError(f"--{option} {getattr(args, option)}: give at least 1.")
    if args.warm_start and "all" in args.num_labeled and len(args.num_labeled) == 1:
        raise SemiInputError("--warm_start with --num_labeled all only: a warm start continues a labeled subset's "
                             "stock run; give a labeled count.")


def _planning_output(args):
    """nnU-Net's planning and preprocessing output to ``-o/logs/planning.txt`` (its path printed), unless -v."""
    from nnunet_semi.tools.progress import captured_output

    log = None if args.verbose else join(args.o, "logs", "planning.txt")
    if log:
        print(f"planning and preprocessing: nnU-Net's output goes to {log}", flush=True)
    return captured_output(log)


def _quality_command(args, dataset, plans: str, trainers: list[str], tiny_raw: str | None) -> None:
    from nnunet_semi.tools.benchmark.coarse import (
        COARSE_EPOCHS,
        COARSE_ITERATIONS,
        COARSE_NUM_VAL,
        COARSE_RAMPUP_FRACTION,
    )
    from nnunet_semi.tools.benchmark.quality import QualitySettings, run_quality_benchmark

    configuration, extra, num_val, rampup = args.c, {}, args.num_val, args.rampup_iterations
    epochs = args.epochs or (2 if tiny_raw else COARSE_EPOCHS if args.coarse else 50)
    iterations = args.iterations or (4 if tiny_raw else COARSE_ITERATIONS if args.coarse else 250)
    predict_test, checkpoint_every = args.predict_test, None
    if args.repeats < 1:
        raise SemiInputError(f"--repeats {args.repeats}: give at least 1.")
    if args.jobs < 1:
        raise SemiInputError(f"--jobs {args.jobs}: give at least 1 (1 trains one run after the other).")
    if args.coarse:
        from nnunet_semi.data.dataset_io import labeled_case_ids, load_json, require_env_folder, resolve_dataset_name
        from nnunet_semi.data.splits import check_held_out_size
        from nnunet_semi.tools.benchmark.coarse import COARSE_CONFIGURATION, plan_coarse

        name = resolve_dataset_name(dataset)
        raw = join(require_env_folder("nnUNet_raw"), name)
        num_val = COARSE_NUM_VAL if num_val is None else (num_val or None)
        if num_val is not None:  # before planning: a bad size costs nothing
            num_cases = len(labeled_case_ids(raw, load_json(join(raw, "dataset.json"))))
            for count in args.num_labeled:
                check_held_out_size(num_cases, 0 if count == "all" else int(count), num_val, name,
                                    None if args.num_val else f"--num_val {num_val} (the --coarse default)")
        with _planning_output(args):
            coarse = plan_coarse(dataset, args.coarse_voxels, args.coarse_spacing,
                                 num_processes=int(os.environ.get("nnUNet_def_n_proc", 2)))
        plans, configuration = coarse["plans"], COARSE_CONFIGURATION
        rampup = round(COARSE_RAMPUP_FRACTION * epochs * iterations) if rampup is None else rampup
        checkpoint_every = 1  # short runs: resume a killed run from its last epoch
        predict_test = predict_test or os.path.isdir(join(raw, "imagesTs"))
        extra = {"spacing_mm": "x".join(f"{s:g}" for s in coarse["spacing"]),
                 "patch_size": "x".join(map(str, coarse["patch_size"])), "batch_size": coarse["batch_size"],
                 "features": "-".join(map(str, coarse["features"]))}
        print(f"coarse plans {plans}: spacing {extra['spacing_mm']} mm, patch {extra['patch_size']}, batch "
              f"{coarse['batch_size']}, U-Net features {extra['features']}; {epochs} x {iterations} iterations, "
              f"unsupervised ramp over {rampup} iterations")
    counts = ["2", "all"] if tiny_raw else args.num_labeled
    test_labels = join(tiny_raw, "labelsTs") if tiny_raw else args.test_labels
    try:
        run_quality_benchmark(QualitySettings(
            dataset, counts, trainers, epochs, iterations, args.o, configuration, args.f, plans, test_labels,
            args.order, args.seed, num_val=num_val, repeats=args.repeats, method_repeats=args.method_repeats,
            rampup_iterations=rampup, run_suffix="" if args.rampup_iterations is None else
            f"_ramp{args.rampup_iterations}", warm_start=args.warm_start, predict_test=predict_test,
            score_members=args.score_members, checkpoint_every=checkpoint_every, extra_columns=extra, jobs=args.jobs,
            selftrain_rounds=args.selftrain_rounds, verbose=args.verbose, stop_on_failure=args.stop_on_failure))
    except SemiRunsFailed:
        if os.path.isfile(join(args.o, "results.md")):  # the tables of the runs that finished, then the failures
            print(open(join(args.o, "results.md")).read())
        raise
    print(open(join(args.o, "results.md")).read())


def _forward_cell(argv: list[str]) -> None:
    """``nnUNetv2_semi_benchmark cell`` keeps working where the lab is (a clone): a one-line notice, then the lab's
    ``python -m semi_lab cell``; the cells are this project's own measuring, not part of the installed library."""
    import nnunet_semi

    print("nnUNetv2_semi_benchmark cell: moved to the project's lab, now `python -m semi_lab cell` (PYTHONPATH="
          "benchmarks, or benchmarks/scripts/run_cell.sh); running it", file=sys.stderr)
    lab = join(os.path.dirname(os.path.dirname(nnunet_semi.__file__)), "benchmarks")
    if not os.path.isdir(join(lab, "semi_lab")):
        raise SemiInputError("the benchmark cells belong to the project's lab (benchmarks/ in a clone of "
                             "nnunet-semi), which this installation does not have.")
    sys.path.insert(0, lab)
    from semi_lab.__main__ import cell_entry

    cell_entry(argv)


def main(argv=None) -> None:
    """``python -m nnunet_semi.cli COMMAND ARGS``: a command by its name without ``nnUNetv2_semi_`` (scripts that
    run a checkout's own code without installing it, e.g. ``scripts/run_cell.sh``)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {name.removesuffix("_entry"): entry for name, entry in globals().items() if name.endswith("_entry")}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m nnunet_semi.cli {{{','.join(commands)}}} ...", file=sys.stderr)
        sys.exit(2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
