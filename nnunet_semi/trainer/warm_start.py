"""Warm start: ``nnUNetv2_train ... -pretrained_weights CHECKPOINT`` loads every layer, output layers included.

nnU-Net's ``load_pretrained_weights`` is made for transfer to another label set: it skips the 1x1 output
convolutions (``.seg_layers.``). A semi-supervised run that continues a trained nnU-Net on the same labels needs
them: with a random output head the teacher's first pseudo labels would be noise. ``WarmStart`` trainers (every
plugin trainer, and ``nnUNetTrainer_warmStart``, stock nnU-Net loaded the same way: the fair control) load the
checkpoint whole, after checking that it was trained on the same classes with the same network; a checkpoint that
does not fit is refused with one line naming both, before training starts.

How it hooks in: nnU-Net's ``maybe_load_checkpoint`` calls ``load_pretrained_weights(trainer.network, file)``,
looked up in ``nnunetv2.run.run_training`` at call time. This module puts a dispatcher there that sends the networks
of ``WarmStart`` trainers to their trainer's ``load_warm_start`` and every other network to nnU-Net's own function,
unchanged. ``warm_start_every_trainer`` extends it to every trainer of the process (``python -m
nnunet_semi.tools.warm_train`` is ``nnUNetv2_train`` so, for stock trainers such as self-training's fine-tuning).

A warm-started run is a new run from epoch 0 on loaded weights, the same for every trainer and the control: nnU-Net's
poly learning rate starts again from its initial value, the unsupervised ramp starts at step 0 of the new run, and
the EMA teacher is a copy of the loaded student at step 0. Networks beside the student that the checkpoint does not
hold (a dual network's peer, heads) start as they would from scratch, unless a peer checkpoint is given
(``peer_warm_start_checkpoint``, or the ``nnUNet_semi_peer_weights`` variable).
"""

from __future__ import annotations

import os
import sys
import weakref

import torch
from nnunetv2.run import load_pretrained_weights as _nnunet_pretrained
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_semi.errors import SemiInputError

PEER_WEIGHTS_VARIABLE = "nnUNet_semi_peer_weights"

# network (unwrapped) -> its WarmStart trainer (weak both ways: neither keeps the other alive)
_WARM_START_TRAINERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EVERY_TRAINER = False


def unwrapped(network: nn.Module) -> nn.Module:
    """``network`` without its DDP and torch.compile wrappers."""
    module = network.module if isinstance(network, DDP) else network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def read_network_weights(checkpoint_file: str, what: str = "-pretrained_weights") -> tuple[dict, dict]:
    """(``network_weights``, the whole checkpoint) of an nnU-Net checkpoint file, on the CPU; a one-line error
    naming the file when it is missing, unreadable or holds no ``network_weights``."""
    if not os.path.isfile(checkpoint_file):
        raise SemiInputError(f"{what} {checkpoint_file}: no such file.")
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    except Exception as error:  # a damaged or foreign file: name it, whatever torch raised
        raise SemiInputError(f"{what} {checkpoint_file} cannot be read ({type(error).__name__}: {error}); give an "
                             f"nnU-Net checkpoint (checkpoint_final.pth).") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise SemiInputError(f"{what} {checkpoint_file} holds no 'network_weights': give an nnU-Net checkpoint "
                             f"(checkpoint_final.pth).")
    return checkpoint["network_weights"], checkpoint


def _described(checkpoint: dict) -> str:
    """What a checkpoint says it was trained with (plans, configuration, trainer), where it says so."""
    init = checkpoint.get("init_args") or {}
    plans = init.get("plans") or {}
    parts = [f"plans {plans['plans_name']}" if "plans_name" in plans else "",
             f"configuration {init['configuration']}" if "configuration" in init else "",
             f"trainer {checkpoint['trainer_name']}" if "trainer_name" in checkpoint else ""]
    return ", ".join(p for p in parts if p) or "no plans recorded"


def _label_set(dataset_json: dict) -> dict:
    """The classes a segmentation head predicts: the ``labels`` of dataset.json without the ignore label (which a
    pseudo-labeled copy of a dataset adds; it is no output channel)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dataset_json.get("labels", {}).items()
            if k != "ignore"}


def check_fits(weights: dict, checkpoint: dict, network: nn.Module, dataset_json: dict | None, here: str,
               checkpoint_file: str, what: str = "-pretrained_weights") -> None:
    """Raise a one-line ``SemiInputError`` naming both sides when ``weights`` cannot be ``network``'s: other classes
    (the checkpoint's dataset.json labels against ``dataset_json``, where both are known) or another network (keys
    or shapes). ``here``: what this side was built with, for the message."""
    there = _described(checkpoint)
    theirs = (checkpoint.get("init_args") or {}).get("dataset_json")
    if theirs is not None and dataset_json is not None and _label_set(theirs) != _label_set(dataset_json):
        raise SemiInputError(
            f"{what} {checkpoint_file} was trained on the classes {_label_set(theirs)} ({there}); this trainer "
            f"segments {_label_set(dataset_json)} ({here}). A warm start continues a model of the same classes; "
            f"for another label set use nnU-Net's fine-tuning (a stock trainer, whose -pretrained_weights skips "
            f"the output layers).")
    own = network.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    shapes = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or shapes:
        if shapes:
            key = shapes[0]
            difference = f"{key} is {tuple(weights[key].shape)} there and {tuple(own[key].shape)} here"
        else:
            difference = (f"{len(missing)} of this network's tensors are missing there (e.g. {missing[0]})" if missing
                          else f"it holds {len(unexpected)} tensors this network has not (e.g. {unexpected[0]})")
        raise SemiInputError(
            f"{what} {checkpoint_file} holds another network ({there}) than this trainer builds ({here}): "
            f"{difference}. Warm-start from a checkpoint of the same plans and configuration.")


def load_whole(network: nn.Module, checkpoint_file: str, dataset_json: dict | None, here: str,
               what: str = "-pretrained_weights") -> dict:
    """Load every tensor of a checkpoint's ``network_weights`` into ``network`` (wrappers removed), output layers
    included, after ``check_fits``; returns the checkpoint."""
    target = unwrapped(network)
    weights, checkpoint = read_network_weights(checkpoint_file, what)
    check_fits(weights, checkpoint, target, dataset_json, here, checkpoint_file, what)
    target.load_state_dict(weights, strict=True)
    return checkpoint


class WarmStart(nnUNetTrainer):
    """Loads ``-pretrained_weights`` whole (output layers included) into ``self.network``; see the module doc.

    Attributes:
        warm_start_checkpoint: a checkpoint to start from when no ``-pretrained_weights`` is given and nothing is
            resumed (the benchmark's warm-start mode sets it on its run classes); None: none.
        peer_warm_start_checkpoint: a checkpoint for the network a dual-network method trains beside the student;
            None: the ``nnUNet_semi_peer_weights`` variable, else the peer starts as from scratch.
        peer_labeled_only_trainer: the stock trainer whose labeled-only run is the peer's warm start (a dual-network
            method declares it; the benchmark's warm-start mode trains it, with another seed than the student's
            start when it is stock nnU-Net); None: no peer.
        warm_start_trainer: the labeled-only trainer whose run the benchmark's warm-start mode starts this trainer
            from (e.g. BCP's copy-paste pre-training); None: stock nnU-Net's, like every other trainer.
    """

    warm_start_checkpoint: str | None = None
    peer_warm_start_checkpoint: str | None = None
    peer_labeled_only_trainer: str | None = None
    warm_start_trainer: str | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.warm_started_from: str | None = None

    def initialize(self):
        super().initialize()
        _WARM_START_TRAINERS[unwrapped(self.network)] = weakref.ref(self)

    def network_description(self) -> str:
        return (f"plans {self.plans_manager.plans_name}, configuration {self.configuration_name}, "
                f"trainer {type(self).__name__}")

    def load_warm_start(self, checkpoint_file: str) -> None:
        """Start from ``checkpoint_file``: every layer of its ``network_weights`` into ``self.network``, then
        ``load_warm_start_auxiliary``. Raises a one-line ``SemiInputError`` (nothing loaded) when it does not fit."""
        if not self.was_initialized:
            self.initialize()
        load_whole(self.network, checkpoint_file, self.dataset_json, self.network_description())
        self.warm_started_from = checkpoint_file
        self.print_to_log_file(f"Warm start: every layer of {checkpoint_file} loaded into the network, output "
                               f"layers included; a new run from epoch 0 (learning rate and unsupervised ramp "
                               f"start again).")
        self.load_warm_start_auxiliary(checkpoint_file)

    def load_warm_start_auxiliary(self, checkpoint_file: str) -> None:
        """Start the modules beside ``self.network`` (hook; default: nothing, e.g. an EMA teacher is copied from the
        loaded student when training starts)."""

    def peer_checkpoint(self) -> str | None:
        """The peer's warm-start checkpoint: ``peer_warm_start_checkpoint``, else ``$nnUNet_semi_peer_weights``."""
        return self.peer_warm_start_checkpoint or os.environ.get(PEER_WEIGHTS_VARIABLE) or None

    def on_train_start(self):
        # the benchmark's run classes carry their checkpoint; a resumed run (a checkpoint loaded, current_epoch > 0)
        # or one given -pretrained_weights already has its weights
        if self.warm_start_checkpoint and self.warm_started_from is None and self.current_epoch == 0:
            self.load_warm_start(self.warm_start_checkpoint)
        super().on_train_start()


class nnUNetTrainer_warmStart(WarmStart):
    """Stock nnU-Net whose ``-pretrained_weights`` loads every layer, output layers included: the control of a
    warm-started semi-supervised run (the same checkpoint, loaded the same way, the same schedule), and a fine-tuning
    on the same labels that keeps the trained output head."""


def warm_start_every_trainer(enabled: bool = True) -> None:
    """Load ``-pretrained_weights`` whole for every trainer of this process, not only ``WarmStart`` ones (without
    a trainer to ask, the classes are compared through the checkpoints' shapes only)."""
    global _EVERY_TRAINER
    _EVERY_TRAINER = enabled


def load_pretrained_weights(network: nn.Module, fname: str, verbose: bool = False) -> None:
    """What ``nnUNetv2_train -pretrained_weights`` calls: a ``WarmStart`` trainer's network loads whole (a one-line
    ``nnUNetv2_train: error:`` and exit code 2 when the checkpoint does not fit); any other goes to nnU-Net's own
    function, which skips the output layers, unless ``warm_start_every_trainer`` was called."""
    reference = _WARM_START_TRAINERS.get(unwrapped(network))
    trainer = reference() if reference is not None else None
    if trainer is None and not _EVERY_TRAINER:
        return _nnunet_pretrained.load_pretrained_weights(network, fname, verbose)
    try:
        if trainer is not None:
            trainer.load_warm_start(fname)
        else:
            load_whole(network, fname, None, f"network {type(unwrapped(network)).__name__}")
            print(f"Warm start: every layer of {fname} loaded, output layers included.")
    except SemiInputError as error:
        print(f"nnUNetv2_train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def install() -> None:
    """Put the dispatcher where ``nnUNetv2_train`` looks ``load_pretrained_weights`` up (idempotent)."""
    from nnunetv2.run import run_training

    run_training.load_pretrained_weights = load_pretrained_weights


install()

