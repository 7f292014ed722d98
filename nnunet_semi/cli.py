"""Console entry points: argparse wrappers around the plugin's API functions (nnU-Net's ``*_entry`` pattern)."""

from __future__ import annotations

import argparse
import functools
import sys

from nnunet_semi.errors import SemiInputError


def _reports_input_errors(entry):
    """Bad input ends the command with one ``error:`` line and exit code 2, like argparse's own errors."""

    @functools.wraps(entry)
    def wrapped(argv=None):
        try:
            entry(argv)
        except SemiInputError as e:
            prog = entry.__name__.removesuffix("_entry")
            print(f"nnUNetv2_semi_{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)

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
    from os.path import join

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
