"""Helpers of the test modules (import them with ``from helpers import ...``): the synthetic dataset's id and
name, nnU-Net folders under a test's tmp_path, tiny networks and schedules, trainers and their batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nnunet_semi.tools.synthetic import plan_and_preprocess  # noqa: F401  (for the test modules)

DATASET_ID = 990
DATASET_NAME = "Dataset990_SemiSynthetic"


@dataclass
class NNUNetFolders:
    raw: Path
    preprocessed: Path
    results: Path

    @property
    def raw_dataset(self) -> Path:
        return self.raw / DATASET_NAME

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed / DATASET_NAME


def point_nnunet_at(monkeypatch, root: Path) -> NNUNetFolders:
    folders = NNUNetFolders(root / "raw", root / "preprocessed", root / "results")
    for name, path in (("nnUNet_raw", folders.raw), ("nnUNet_preprocessed", folders.preprocessed),
                       ("nnUNet_results", folders.results)):
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("nnUNet_compile", "f")
    return folders


def shrink_network(plans_file: Path, features=(4, 8, 16)) -> None:
    """A 3-stage 4/8/16-channel U-Net (one conv per stage) in every configuration, batch 2: CPU training in seconds."""
    from nnunet_semi.tools.demo import reduce_network

    plans = reduce_network(json.loads(plans_file.read_text()), features, convs_per_stage=1)
    for configuration in plans["configurations"].values():
        if "architecture" in configuration:
            configuration["batch_size"] = 2
    plans_file.write_text(json.dumps(plans, indent=2))


def make_trainer(env: NNUNetFolders, cls, fold=0, configuration="3d_fullres"):
    """A trainer of ``cls`` on CPU, started and inside its first training epoch."""
    plans = json.loads((env.preprocessed_dataset / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    dataset_json = json.loads((env.preprocessed_dataset / "dataset.json").read_text())
    trainer = cls(plans, configuration, fold, dataset_json, device=torch.device("cpu"))
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    return trainer


def tiny_schedule(cls, **attributes):
    """``cls`` with a 4-epoch, 2-iteration schedule (and any other class attributes overridden), named after it."""
    attributes = {"epochs": 4, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1} | attributes
    return type(f"{cls.__name__}Tiny", (cls,), attributes)


def next_batches(trainer) -> tuple[dict, dict]:
    """The next labeled batch (``data``, ``target``) and unlabeled batch (``data_weak``, ``data_strong``) of a
    trainer, as ``compute_losses`` takes them."""
    labeled = next(trainer.dataloader_train)
    unlabeled = {k: v for k, v in next(trainer.dataloader_unlabeled).items() if k != "keys"}
    return {"data": labeled["data"], "target": labeled["target"]}, unlabeled


def has_grad(module, prefix: str = "") -> bool:
    """Whether any parameter of ``module`` whose name starts with ``prefix`` received a non-zero gradient."""
    return any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters()
               if n.startswith(prefix))


def plain_unet_architecture(dim: int = 3) -> dict:
    """A tiny 3-stage PlainConvUNet as an nnU-Net plans architecture dict (4/8/16 features, 2 convs per stage)."""
    from nnunet_semi.components.networks import PLAIN_CONV_UNET

    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    return {"network_class_name": PLAIN_CONV_UNET,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": conv,
                            "kernel_sizes": [[3] * dim] * 3, "strides": [[1] * dim, [2] * dim, [2] * dim],
                            "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}}}


def random_streams_rewinder(trainer):
    """A function that rewinds the trainer's random streams (``random_generator``) to where they are now, so that
    two ``compute_losses`` calls draw the same noise, samples and boxes."""
    trainer.random_generator(trainer.device)
    trainer.random_generator("cpu")
    states = {k: g.get_state() for k, g in trainer._generators.items()}

    def rewind():
        for k, state in states.items():
            trainer._generators[k].set_state(state)
    return rewind


def bench_run(out, prefix: str, suffix: str = "") -> str:
    """The name of the benchmark run in ``out/runs`` (or any folder holding run folders) named
    ``<prefix>_<6 hex digits of its data identity><suffix>`` (e.g. prefix ``nnUNetTrainer__bench_2lab_2x4``, suffix
    ``_r1``); exactly one must exist."""
    import re

    folder = Path(out) / "runs" if (Path(out) / "runs").is_dir() else Path(out)
    names = [p.name for p in folder.iterdir() if re.fullmatch(re.escape(prefix) + r"_[0-9a-f]{6}" + re.escape(suffix),
                                                              p.name)]
    assert len(names) == 1, (prefix, suffix, sorted(p.name for p in folder.iterdir()))
    return names[0]
