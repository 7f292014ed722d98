"""SemiSupervisedTrainerBase: the one nnUNetTrainer subclass that owns the semi-supervised machinery.

It adds, once for every method: one optimizer step per iteration over named, declared loss terms, weighted here
only (``term_weights``, ``unsup_weight``, the ramp), the EMA teacher and the auxiliary modules beside the student.
Its parts, each an nnUNetTrainer subclass that overrides nnU-Net's hooks through ``super()``:

- ``unlabeled_data.UnlabeledData``: the unlabeled cases and the loader of their two views;
- ``epoch_logs.EpochLogs``: per-step statistics, per-epoch logs, ``progress_semi.png``;
- ``deployment.ValidationAndDeployment``: the models validated beside the student, the deployed one;
- ``checkpoint_state.CheckpointState``: ``semi_state`` in nnU-Net's checkpoints, robust resume;
- ``warm_start.WarmStart``: ``-pretrained_weights`` loaded whole, output layers included (a warm start).

A method subclasses the base, declares its terms and statistics, and implements ``compute_losses`` (documentation/extending.md, "Adding
a method" is the contract).

``self.network`` stays the stock nnU-Net network. The teacher and any other module live in ``self.auxiliary`` and
are saved under ``checkpoint["semi_state"]``; ``network_weights`` is what ``nnUNetv2_predict`` loads.
"""

from __future__ import annotations

import numpy as np
import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from nnunet_semi.components.ema import ema_momentum, ema_update, make_teacher
from nnunet_semi.components.schedules import sigmoid_rampup
from nnunet_semi.data.loaders import UNLABELED_VIEWS, ImageOnlyDataset
from nnunet_semi.trainer.checkpoint_state import SEMI_STATE_KEY, CheckpointState
from nnunet_semi.trainer.ddp import average_gradients_over_ranks
from nnunet_semi.trainer.deployment import BEST_VALIDATED, ValidationAndDeployment
from nnunet_semi.trainer.epoch_logs import EpochLogs
from nnunet_semi.trainer.outputs import full_resolution, take_samples
from nnunet_semi.trainer.unlabeled_data import UnlabeledData
from nnunet_semi.trainer.warm_start import WarmStart, unwrapped

# one random stream per device type, derived from the run's seed
_STREAM_OFFSETS = {"cpu": 0, "cuda": 1, "mps": 2}

# names the methods and older code import from here
__all__ = ["BEST_VALIDATED", "SEMI_STATE_KEY", "SemiSupervisedTrainerBase", "average_gradients_over_ranks",
           "full_resolution", "take_samples"]


class SemiSupervisedTrainerBase(UnlabeledData, EpochLogs, ValidationAndDeployment, CheckpointState, WarmStart):
    """Shared base of all nnunet-semi trainers. Subclasses implement ``compute_losses``.

    Class attributes (the hyperparameters; a variant is a subclass that overrides some):
        unlabeled_batch_size: unlabeled samples per step and GPU; None = the labeled batch size.
        unsup_weight: weight of the unsupervised terms (the ramped ones reach it at the end of their ramp).
        unsup_rampup_iterations: length of the sigmoid ramp in optimizer steps, the same whatever the number of
            epochs (a method declares its paper's; the benchmark may set one length for every method).
        ramped_terms: the unsupervised terms that the ramp multiplies; None: all of them. The others enter with
            ``unsup_weight`` from the first step, as their papers have them.
        teacher_momentum: EMA momentum of the teacher; None = no teacher.
        strong_view_always_changed: draw the student's photometric pipeline again until the crop has changed (nnU-Net's
            transforms each fire with their own probability and leave about a third of crops untouched).
        unlabeled_views: the unlabeled views ``compute_losses`` reads, of ("weak", "strong"); only these are built.
        grad_clip_norm: gradient clipping norm (nnU-Net's 12).
        unsup_uses_deep_supervision: whether the unsupervised terms use every deep-supervision scale (else only the
            full-resolution output); the contract tests check it.
        confidence_threshold: teacher probability above which a voxel counts as confident in the statistics.
        loss_terms: names of the terms ``compute_losses`` returns, each unweighted (it is logged as returned).
        supervised_terms: the terms of ``loss_terms`` that enter the total without ``unsup_weight`` or the ramp.
        term_weights: fixed factor of a term, applied by ``combine_losses`` only (the term is logged raw and
            weighted): a number, or the name of the numeric attribute that holds it (so that a variant overriding
            that attribute is one line). A term not named here has factor 1.
        deployed_model: what ``checkpoint_final.pth`` deploys as ``network_weights``: "student" (``self.network``),
            a model of ``validated_models()`` (e.g. "teacher"), or "best_validated", the one with the best
            validation pseudo Dice over the last ``deploy_selection_epochs`` epochs. Each method declares its
            paper's; "best_validated" is opt-in because it selects on the fold's validation cases, which a benchmark
            may also score.
        deploy_selection_epochs: epochs at the end of training over which validation Dice is averaged for
            "best_validated" (and logged for every run).
    """

    unlabeled_batch_size: int | None = None
    unsup_weight: float = 1.0
    unsup_rampup_iterations: int = 6000  # UA-MT's 40 x 150 iterations, which most of the LA literature keeps
    ramped_terms: tuple[str, ...] | None = None
    teacher_momentum: float | None = 0.99
    strong_view_always_changed: bool = True
    unlabeled_views: tuple[str, ...] = UNLABELED_VIEWS
    grad_clip_norm: float = 12.0
    unsup_uses_deep_supervision: bool = False
    confidence_threshold: float = 0.9
    loss_terms: tuple[str, ...] = ("sup",)
    supervised_terms: tuple[str, ...] = ("sup",)
    term_weights: dict[str, float | str] = {}
    deployed_model: str = "student"
    deploy_selection_epochs: int = 10
    statistics: tuple[str, ...] = ()

    # nnU-Net sets its schedule as instance attributes in __init__; these class-level overrides are applied after it
    # so that a length variant is one line (None keeps nnU-Net's value)
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None

    supports_regions: bool = True
    supports_ignore_label: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # nnU-Net's __init__ assigns these on the instance, so a class-level value would be silently overwritten
        for nnunet_name, ours in (("num_epochs", "epochs"), ("num_iterations_per_epoch", "iterations_per_epoch"),
                                  ("num_val_iterations_per_epoch", "val_iterations_per_epoch")):
            if nnunet_name in cls.__dict__:
                raise TypeError(f"{cls.__name__} sets `{nnunet_name}`, which nnU-Net's __init__ overwrites: set "
                                f"`{ours}` instead.")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attribute, override in (("num_epochs", self.epochs),
                                    ("num_iterations_per_epoch", self.iterations_per_epoch),
                                    ("num_val_iterations_per_epoch", self.val_iterations_per_epoch)):
            if override is not None:
                setattr(self, attribute, override)
        self.auxiliary = nn.ModuleDict()
        self.ddp_wrapped_auxiliary: set[str] = set()  # auxiliary modules whose forward runs through their own DDP
        self.dataloader_unlabeled = None
        self.unlabeled_pool: ImageOnlyDataset | None = None
        self.deployed_weights = "student"
        self._iteration_in_epoch = 0
        self._teacher_restored = False
        self._step_statistics: dict[str, float] = {}
        self._generators: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------------------------------------ set-up
    def initialize(self):
        self._refuse_unsupported_modes()
        super().initialize()
        self.auxiliary = self.build_auxiliary_modules().to(self.device)
        trainable = [p for p in self.auxiliary.parameters() if p.requires_grad]
        if trainable:
            # one optimizer, one parameter group per network: nnU-Net's poly LR and GradScaler drive both
            self.optimizer.add_param_group({"params": trainable})
        self.deployment_candidates()  # a misspelt deployed_model fails now, not after training
        self.check_loss_declarations()
        self._register_log_keys()

    def _refuse_unsupported_modes(self) -> None:
        if self.is_cascaded:
            raise NotImplementedError(
                f"{self.__class__.__name__} does not support cascade configurations ({self.configuration_name}): "
                f"unlabeled cases have no segmentation from the previous stage. Use 3d_fullres, 3d_lowres or 2d.")
        if self.label_manager.has_regions and not self.supports_regions:
            raise NotImplementedError(f"{self.__class__.__name__} does not support region-based training.")
        if self.label_manager.has_ignore_label and not self.supports_ignore_label:
            raise NotImplementedError(f"{self.__class__.__name__} does not support the ignore label.")

    def unwrapped_network(self) -> nn.Module:
        """``self.network`` without DDP and torch.compile wrappers."""
        return unwrapped(self.network)

    def build_auxiliary_modules(self) -> nn.ModuleDict:
        """Modules beside ``self.network`` (never inside it), saved in ``semi_state``. Default: the EMA teacher, if
        ``teacher_momentum``. Parameters with ``requires_grad`` (a second network, heads) join the optimizer as
        their own parameter group."""
        modules = nn.ModuleDict()
        if self.teacher_momentum is not None:
            modules["teacher"] = make_teacher(self.unwrapped_network())
            decoder = getattr(modules["teacher"], "decoder", None)
            if hasattr(decoder, "deep_supervision"):  # every teacher reader takes the full-resolution output only
                decoder.deep_supervision = False
        return modules

    def random_generator(self, device: torch.device | str) -> torch.Generator:
        """The run's generator on ``device`` (its type): every random draw of a method's library calls takes it.

        Seeded once from the run's torch seed (``torch.initial_seed()``: the benchmark's ``--seed``, or whatever
        nnU-Net's process was seeded with), one stream per device type, and saved in ``semi_state``: a seeded run
        draws the same pseudo-label noise, mixing partners and voxel samples, and a resumed one continues them.
        """
        device = torch.device(device)
        if device.type not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed((torch.initial_seed() + _STREAM_OFFSETS.get(device.type, 7)) % 2**63)
            self._generators[device.type] = generator
        return self._generators[device.type]

    def semi_state(self) -> dict:
        return super().semi_state() | {"generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_semi_state(self, state: dict) -> None:
        super().load_semi_state(state)
        for device_type, generator_state in state.get("generators", {}).items():  # none in older checkpoints
            device = self.device if self.device.type == device_type else torch.device(device_type)
            self.random_generator(device).set_state(generator_state)

    @property
    def teacher(self) -> nn.Module | None:
        return self.auxiliary["teacher"] if "teacher" in self.auxiliary else None

    # --------------------------------------------------------------------------------------- unlabeled data

    # ---------------------------------------------------------------------------------------- training step
    @property
    def global_step(self) -> int:
        """Steps taken so far, derived from the epoch (restored by ``--c``) and the step within the epoch."""
        return self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch

    # class methods: the loss declarations are class attributes, so the benchmark can describe a trainer unbuilt
    @classmethod
    def unsupervised_terms(cls) -> tuple[str, ...]:
        return tuple(t for t in cls.loss_terms if t not in cls.supervised_terms)

    @classmethod
    def ramped_unsupervised_terms(cls) -> tuple[str, ...]:
        if cls.ramped_terms is None:
            return cls.unsupervised_terms()
        unknown = set(cls.ramped_terms) - set(cls.unsupervised_terms())
        if unknown:
            raise ValueError(f"{cls.__name__}.ramped_terms names {sorted(unknown)}, which are not "
                             f"unsupervised terms of loss_terms {cls.loss_terms}")
        return tuple(cls.ramped_terms)

    def check_loss_declarations(self) -> None:
        """``supervised_terms``, ``ramped_terms`` and ``term_weights`` name terms of ``loss_terms``, and every
        weight is a number or names a numeric attribute; raises ValueError naming the declaration otherwise."""
        name = type(self).__name__
        for declaration in ("supervised_terms", "term_weights"):
            unknown = set(getattr(self, declaration)) - set(self.loss_terms)
            if unknown:
                raise ValueError(f"{name}.{declaration} names {sorted(unknown)}, which are not in its loss_terms "
                                 f"{self.loss_terms}")
        self.ramped_unsupervised_terms()
        for term in self.term_weights:
            self.term_weight(term)

    def term_weight(self, term: str) -> float:
        """The fixed factor ``term_weights`` declares for ``term`` (1 where it names none)."""
        weight = self.term_weights.get(term, 1.0)
        if isinstance(weight, str):
            if not isinstance(getattr(self, weight, None), (int, float)):
                raise ValueError(f"{type(self).__name__}.term_weights[{term!r}] names the attribute {weight!r}, "
                                 f"which is not a number on this trainer.")
            weight = getattr(self, weight)
        return float(weight)

    def effective_term_weights(self, ramp: float) -> dict[str, float]:
        """Each term's factor in the total at this step: its ``term_weight``, times ``ramp`` for the ramped
        unsupervised terms and ``unsup_weight`` for the other unsupervised ones."""
        ramped = self.ramped_unsupervised_terms()

        def schedule(term: str) -> float:
            return 1.0 if term in self.supervised_terms else ramp if term in ramped else self.unsup_weight
        return {term: schedule(term) * self.term_weight(term) for term in self.loss_terms}

    @classmethod
    def describe_ramp(cls, rampup_iterations: int | None = None) -> str:
        """Which unsupervised terms the sigmoid ramp multiplies and which enter from the first step, e.g.
        "sigmoid ramp over 600 iterations for consistency" (``rampup_iterations``: None, the class's own)."""
        ramped = cls.ramped_unsupervised_terms()
        constant = [t for t in cls.unsupervised_terms() if t not in ramped]
        length = cls.unsup_rampup_iterations if rampup_iterations is None else rampup_iterations
        text = f"sigmoid ramp over {length} iterations for {', '.join(ramped)}" if ramped else "no ramp"
        return text + (f"; from the first step for {', '.join(constant)}" if constant and ramped else "")

    def unsupervised_ramp(self) -> float:
        """The weight of the ramped unsupervised terms at this step: ``unsup_weight`` times the sigmoid ramp."""
        return self.unsup_weight * sigmoid_rampup(self.global_step, self.unsup_rampup_iterations)

    def compute_losses(self, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
        """The method's loss terms for one step; called inside autocast.

        Args:
            labeled: ``data`` (B, C, *patch) on the device and ``target`` (list of (B, 1, *scale) with deep
                supervision, else one tensor).
            unlabeled: ``data_weak`` and/or ``data_strong`` (those of ``unlabeled_views``), each (B_u, C, *patch),
                on the device.

        Returns:
            term name -> unweighted scalar tensor, one entry per name in ``loss_terms``. ``combine_losses`` weights
            them: ``supervised_terms`` enter with their ``term_weights`` factor, the ``ramped_terms`` also times
            ``unsupervised_ramp()``, the other unsupervised terms times ``unsup_weight``.
        """
        raise NotImplementedError

    def combine_losses(self, terms: dict[str, torch.Tensor], ramp: float) -> torch.Tensor:
        """The total loss: every term times its ``effective_term_weights`` factor. The only place a weight is
        applied."""
        weights = self.effective_term_weights(ramp)
        return sum(weights[k] * v for k, v in terms.items())

    def train_step(self, batch: dict) -> dict:
        unlabeled = next(self.dataloader_unlabeled)
        labeled = {"data": batch["data"].to(self.device, non_blocking=True),
                   "target": _to_device(batch["target"], self.device)}
        unlabeled = {k: v.to(self.device, non_blocking=True) for k, v in unlabeled.items() if k != "keys"}
        self._step_statistics = {}

        ramp = self.unsupervised_ramp()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            terms = self.compute_losses(labeled, unlabeled)
            self._check_terms(terms)
            total = self.combine_losses(terms, ramp)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self._average_auxiliary_gradients()
            self.grad_scaler.unscale_(self.optimizer)
            self._clip_gradients()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            self._average_auxiliary_gradients()
            self._clip_gradients()
            self.optimizer.step()
        self.after_optimizer_step()
        self._iteration_in_epoch += 1

        # the weight of the ramped terms, or where nothing is ramped the constant one (not a ramp that weighs nothing)
        logged_weight = ramp if self.ramped_unsupervised_terms() else self.unsup_weight
        out = {"loss": total.detach().cpu().numpy(), "unsup_weight": np.float64(logged_weight)}
        weights = self.effective_term_weights(ramp)
        for k, v in terms.items():
            out[f"loss_{k}"] = v.detach().float().cpu().numpy()
            out[f"weighted_{k}"] = weights[k] * out[f"loss_{k}"]
        out.update({f"stat_{k}": np.float64(v) for k, v in self._step_statistics.items()})
        return out

    def _check_terms(self, terms: dict) -> None:
        """``compute_losses`` returns exactly the declared ``loss_terms``: an undeclared term would train unlogged,
        a missing one would break the epoch's log."""
        if set(terms) != set(self.loss_terms):
            raise ValueError(f"{type(self).__name__}.compute_losses returned the terms {sorted(terms)}, but its "
                             f"`loss_terms` declares {list(self.loss_terms)}: make them the same.")

    def _average_auxiliary_gradients(self) -> None:
        """Under DDP, average the gradients of trainable auxiliary modules (heads) that no DDP wrapper syncs, so
        that they stay identical on every rank."""
        if not self.is_ddp:
            return
        parameters = [p for name, module in self.auxiliary.items() if name not in self.ddp_wrapped_auxiliary
                      for p in module.parameters() if p.requires_grad]
        average_gradients_over_ranks(parameters)

    def _clip_gradients(self) -> None:
        # per network (parameter group), as nnU-Net clips its single network
        for group in self.optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], self.grad_clip_norm)

    def after_optimizer_step(self) -> None:
        """Default: one EMA update of the teacher per optimizer step."""
        if self.teacher is not None:
            ema_update(self.teacher, self.unwrapped_network(), ema_momentum(self.global_step, self.teacher_momentum))

    @torch.no_grad()
    def teacher_probabilities(self, data: torch.Tensor) -> torch.Tensor:
        """Teacher probabilities (B, C, *patch), float32, full resolution only (softmax, or sigmoid for regions)."""
        return self.probabilities(full_resolution(self.teacher(data)))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # entropy/threshold maths in float32, also under autocast
        return torch.sigmoid(logits) if self.label_manager.has_regions else torch.softmax(logits, 1)

    def supervised_loss(self, output, target) -> torch.Tensor:
        """nnU-Net's own loss (deep supervision, ignore label, regions) on the labeled part of the output."""
        return self.loss(output, target)

    # ------------------------------------------------------------------------------- epochs and validation
    def on_train_start(self):
        super().on_train_start()
        if self.teacher is not None and not self._teacher_restored:
            # a copy of the student as it starts: random, or warm-started (-pretrained_weights, loaded by then)
            self.teacher.load_state_dict(self.unwrapped_network().state_dict())

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._iteration_in_epoch = 0
        for module in self.auxiliary.values():  # trained modules train, frozen ones (the teacher) stay in eval
            module.train(any(p.requires_grad for p in module.parameters()))

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.auxiliary.eval()


def _to_device(value, device):
    if isinstance(value, list):
        return [v.to(device, non_blocking=True) for v in value]
    return value.to(device, non_blocking=True)


