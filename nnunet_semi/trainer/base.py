"""SemiSupervisedTrainerBase: the one nnUNetTrainer subclass that owns the semi-supervised machinery.

It adds, once for every method: the unlabeled case pool and its two-view loader, one optimizer step per iteration
over named loss terms, the ramp-up of the unsupervised weight, the EMA teacher, per-epoch logging of every term and
of pseudo-label statistics (training log, nnU-Net's logger, ``progress_semi.png``) and checkpoint state under its
own key. A method subclasses it and implements ``compute_losses`` (and optionally ``build_auxiliary_modules``).

``self.network`` stays the stock nnU-Net network. The teacher and any other module live in ``self.auxiliary`` and
are saved under ``checkpoint["semi_state"]``; ``network_weights`` is what ``nnUNetv2_predict`` loads.
"""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import contextmanager
from os.path import isdir, isfile, join

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunet_semi.components.ema import ema_momentum, ema_update, make_teacher
from nnunet_semi.components.schedules import sigmoid_rampup
from nnunet_semi.data.dataset_io import UNLABELED_SUFFIX, load_json
from nnunet_semi.data.loaders import (
    UNLABELED_VIEWS,
    ImageOnlyDataset,
    PerturbedUntilChanged,
    TwoViewUnlabeledLoader,
    split_spatial_and_photometric,
)
from nnunet_semi.data.splits import UNLABELED_KEY
from nnunet_semi.data.unlabeled import unlabeled_preprocessing_is_current
from nnunet_semi.trainer.checkpoints import CHECKPOINT_FILES, DamagedCheckpointError, atomic_torch_save, read_checkpoint

SEMI_STATE_KEY = "semi_state"
BEST_VALIDATED = "best_validated"


class SemiSupervisedTrainerBase(nnUNetTrainer):
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
        loss_terms: names of the terms ``compute_losses`` returns; terms named ``sup*`` are supervised, the rest are
            unsupervised and weighted by the ramp.
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

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attribute, override in (("num_epochs", self.epochs), ("num_iterations_per_epoch", self.iterations_per_epoch),
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
        module = self.network.module if self.is_ddp else self.network
        return module._orig_mod if isinstance(module, OptimizedModule) else module

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

    @property
    def teacher(self) -> nn.Module | None:
        return self.auxiliary["teacher"] if "teacher" in self.auxiliary else None

    # --------------------------------------------------------------------------------------- unlabeled data
    def unlabeled_case_folders(self) -> dict[str, str]:
        """Case id -> preprocessed folder of every unlabeled case of this fold.

        The fold's ``unlabeled`` split entry (cases of the labeled folder whose labels are never read) plus all
        preprocessed ``imagesUnlabeled`` cases; in fold ``all``, every labeled case plus ``imagesUnlabeled``.
        """
        labeled_folder = self.preprocessed_dataset_folder
        pool = {}
        if self.fold == "all":
            pool.update({c: labeled_folder for c in self.dataset_class.get_identifiers(labeled_folder)})
        else:
            splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
            if isfile(splits_file):
                splits = load_json(splits_file)
                if self.fold < len(splits):
                    pool.update({c: labeled_folder for c in splits[self.fold].get(UNLABELED_KEY, [])})
        unlabeled_folder = labeled_folder + UNLABELED_SUFFIX
        raw_unlabeled = join(os.environ.get("nnUNet_raw", ""), self.plans_manager.dataset_name, "imagesUnlabeled")
        if isdir(unlabeled_folder):
            if not unlabeled_preprocessing_is_current(unlabeled_folder, self.plans_manager.plans,
                                                      self.configuration_name, self.dataset_json):
                raise RuntimeError(
                    f"{unlabeled_folder} was preprocessed with other plans than {self.plans_manager.plans_name} "
                    f"now holds. Run nnUNetv2_semi_preprocess -d {self.plans_manager.dataset_name} -c "
                    f"{self.configuration_name} -plans_name {self.plans_manager.plans_name} again.")
            pool.update({c: unlabeled_folder for c in self.dataset_class.get_identifiers(unlabeled_folder)})
        elif isdir(raw_unlabeled):
            raise RuntimeError(
                f"{raw_unlabeled} exists but {unlabeled_folder} does not. Run nnUNetv2_semi_preprocess -d "
                f"{self.plans_manager.dataset_name} -c {self.configuration_name} first.")
        if not pool:
            raise RuntimeError(
                f"{self.__class__.__name__} found no unlabeled cases for fold {self.fold}: add image-only cases to "
                f"imagesUnlabeled and run nnUNetv2_semi_preprocess, or declare a labeled subset with "
                f"nnUNetv2_semi_split.")
        return pool

    def build_weak_transforms(self) -> ComposeTransforms:
        """Photometric pipeline of the teacher's view. Default: none (the crop after the shared spatial transform)."""
        return ComposeTransforms([])

    def build_strong_transforms(self, nnunet_photometric: ComposeTransforms) -> ComposeTransforms:
        """Photometric pipeline of the student's view. Default: nnU-Net's own intensity augmentations."""
        return nnunet_photometric

    def get_dataloaders(self):
        total_workers = get_allowed_n_proc_DA()
        # split the worker budget between labeled and unlabeled loading instead of doubling the processes; nnU-Net
        # 2.8's get_dataloaders reads its worker count only from get_allowed_n_proc_DA() (nnUNet_n_proc_DA), so the
        # variable is set for that one call rather than copying the method
        labeled_workers = (total_workers + 1) // 2 if total_workers > 1 else total_workers
        with _env("nnUNet_n_proc_DA", str(labeled_workers)):
            dataloader_train, dataloader_val = super().get_dataloaders()
        self.dataloader_unlabeled = self._build_unlabeled_dataloader(max(0, total_workers - labeled_workers))
        return dataloader_train, dataloader_val

    def _build_unlabeled_dataloader(self, num_workers: int):
        self.unlabeled_pool = ImageOnlyDataset(self.unlabeled_case_folders())
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        nnunet_pipeline = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        spatial, photometric, mask_for_norm = split_spatial_and_photometric(nnunet_pipeline)
        strong = self.build_strong_transforms(photometric)
        if self.strong_view_always_changed:
            strong = PerturbedUntilChanged(strong)
        loader = TwoViewUnlabeledLoader(
            self.unlabeled_pool, self.unlabeled_batch_size or self.batch_size, initial_patch_size,
            self.configuration_manager.patch_size, self.label_manager, spatial, self.build_weak_transforms(),
            strong, mask_for_norm, self.unlabeled_views)
        self.print_to_log_file(
            f"Unlabeled cases: {len(self.unlabeled_pool)}, unlabeled batch size: {loader.batch_size}, "
            f"unsupervised weight: {self.unsup_weight} ({self._describe_ramp()}), "
            f"teacher momentum: {self.teacher_momentum}")
        if num_workers == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, num_workers, max(2, num_workers), seeds=None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    # ---------------------------------------------------------------------------------------- training step
    @property
    def global_step(self) -> int:
        """Steps taken so far, derived from the epoch (restored by ``--c``) and the step within the epoch."""
        return self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch

    def unsupervised_terms(self) -> tuple[str, ...]:
        return tuple(t for t in self.loss_terms if not t.startswith("sup"))

    def ramped_unsupervised_terms(self) -> tuple[str, ...]:
        if self.ramped_terms is None:
            return self.unsupervised_terms()
        unknown = set(self.ramped_terms) - set(self.unsupervised_terms())
        if unknown:
            raise ValueError(f"{self.__class__.__name__}.ramped_terms names {sorted(unknown)}, which are not "
                             f"unsupervised terms of loss_terms {self.loss_terms}")
        return tuple(self.ramped_terms)

    def _describe_ramp(self) -> str:
        ramped = self.ramped_unsupervised_terms()
        constant = [t for t in self.unsupervised_terms() if t not in ramped]
        text = f"sigmoid ramp over {self.unsup_rampup_iterations} iterations for {', '.join(ramped)}" if ramped \
            else "no ramp"
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
            term name -> scalar tensor, one entry per name in ``loss_terms``. Terms named ``sup*`` enter the total
            as they are; the ``ramped_terms`` are multiplied by ``unsupervised_ramp()``, the other unsupervised
            terms by ``unsup_weight``.
        """
        raise NotImplementedError

    def loss_term_weights(self) -> dict[str, float]:
        """Fixed weights of terms that ``compute_losses`` returns unweighted (so that they are logged unweighted);
        a term not named here enters with weight 1 (besides the ramp)."""
        return {}

    def combine_losses(self, terms: dict[str, torch.Tensor], ramp: float) -> torch.Tensor:
        """Supervised terms, plus ``ramp`` times the ramped unsupervised terms, plus ``unsup_weight`` times the
        others, each also times its ``loss_term_weights`` entry."""
        ramped = self.ramped_unsupervised_terms()
        fixed = self.loss_term_weights()

        def weight(name: str) -> float:
            return 1.0 if name.startswith("sup") else ramp if name in ramped else self.unsup_weight
        return sum(weight(k) * fixed.get(k, 1.0) * v for k, v in terms.items())

    def log_step_statistic(self, name: str, value: torch.Tensor | float) -> None:
        """Record a per-step statistic (averaged per epoch and plotted); names must be in ``statistics``."""
        if name not in self.statistics:  # else it would be averaged nowhere and vanish from the logs
            raise ValueError(f"{type(self).__name__} logs the statistic {name!r}, which its `statistics` "
                             f"{self.statistics} does not declare: add it there.")
        self._step_statistics[name] = float(value)

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

        out = {"loss": total.detach().cpu().numpy(), "unsup_weight": np.float64(ramp)}
        out.update({f"loss_{k}": v.detach().float().cpu().numpy() for k, v in terms.items()})
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

    @torch.no_grad()
    def log_confidence_and_agreement(self, reference: torch.Tensor, other: torch.Tensor, agreement_name: str) -> None:
        """Log ``confident_fraction`` (voxels where ``reference`` exceeds ``confidence_threshold``) and the fraction
        of voxels where the hard decisions of two probability maps (B, C, *spatial) agree, as ``agreement_name``."""
        if self.label_manager.has_regions:  # independent sigmoids: per region channel
            confident = torch.maximum(reference, 1 - reference) > self.confidence_threshold
            agreement = (reference > 0.5) == (other > 0.5)
        else:
            confident = reference.max(1).values > self.confidence_threshold
            agreement = reference.argmax(1) == other.argmax(1)
        self.log_step_statistic("confident_fraction", confident.float().mean())
        self.log_step_statistic(agreement_name, agreement.float().mean())

    def supervised_loss(self, output, target) -> torch.Tensor:
        """nnU-Net's own loss (deep supervision, ignore label, regions) on the labeled part of the output."""
        return self.loss(output, target)

    # ------------------------------------------------------------------------------- epochs and validation
    def on_train_start(self):
        super().on_train_start()
        if self.teacher is not None and not self._teacher_restored:
            # created after pretrained weights were loaded into the student (nnUNetv2_train -pretrained_weights)
            self.teacher.load_state_dict(self.unwrapped_network().state_dict())

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._iteration_in_epoch = 0
        if self.teacher is not None:
            self.teacher.eval()

    def _log_keys(self) -> list[str]:
        keys = [f"semi_loss_{t}" for t in self.loss_terms] + [f"semi_{s}" for s in self.statistics]
        return keys + ["semi_unsup_weight"] + [f"semi_{m}_dice" for m in self.validated_models()]

    def _register_log_keys(self) -> None:
        # nnU-Net's local logger accepts only keys present in its dict and plots the shortest list: register once
        store = self.logger.local_logger.my_fantastic_logging
        for key in self._log_keys():
            store.setdefault(key, [])

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for term in self.loss_terms:
            self.logger.log(f"semi_loss_{term}", self._mean_over_ranks(outputs[f"loss_{term}"]), self.current_epoch)
        for stat in self.statistics:
            self.logger.log(f"semi_{stat}", self._mean_over_ranks(outputs[f"stat_{stat}"]), self.current_epoch)
        self.logger.log("semi_unsup_weight", self._mean_over_ranks(outputs["unsup_weight"]), self.current_epoch)

    def _gather_over_ranks(self, value) -> list:
        """``value`` from every DDP rank (a one-element list without DDP)."""
        if not self.is_ddp:
            return [value]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered

    def _mean_over_ranks(self, values) -> float:
        values = np.concatenate([np.atleast_1d(v) for v in self._gather_over_ranks(values)]).astype(np.float64)
        # statistics that are undefined in a step (e.g. nothing to compare yet) are NaN there and skipped
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    def validated_models(self) -> tuple[str, ...]:
        """Models validated beside ``self.network`` every epoch (``semi_<name>_dice``), in the order in which they
        are candidates for deployment. Default: the teacher, if any."""
        return ("teacher",) if self.teacher is not None else ()

    @torch.no_grad()
    def validation_probabilities(self, data: torch.Tensor, network_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-resolution probabilities (B, C, *patch) of every model in ``validated_models`` on a validation
        batch; ``network_logits`` are ``self.network``'s full-resolution logits on it (from nnU-Net's own validation
        forward, so a model built on them does not run the network again)."""
        return {"teacher": self.teacher_probabilities(data)} if self.teacher is not None else {}

    def validation_step(self, batch: dict) -> dict:
        if not self.validated_models():
            return super().validation_step(batch)
        # nnU-Net's step may zero ignore-label voxels of the target in place
        target = full_resolution(batch["target"]).to(self.device).clone()
        network, recorder = self.network, _RecordingForward(self.network)
        self.network = recorder  # nnU-Net's step calls self.network once; keep its output
        try:
            result = super().validation_step(batch)
        finally:
            self.network = network
        data = batch["data"].to(self.device)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            probabilities = self.validation_probabilities(data, full_resolution(recorder.output))
        recorder.output = None
        for name, probs in probabilities.items():
            result.update(self._hard_tp_fp_fn(probs, target, name))
        return result

    @torch.no_grad()
    def _hard_tp_fp_fn(self, probs: torch.Tensor, target: torch.Tensor, name: str) -> dict:
        """Hard tp/fp/fn of a probability map's decision against the labels of a validation batch, per class."""
        mask = None
        if self.label_manager.has_regions:
            prediction = (probs > 0.5).long()
            if self.label_manager.has_ignore_label:
                mask, target = 1 - target[:, -1:], target[:, :-1]
        else:
            prediction = torch.zeros_like(probs).scatter_(1, probs.argmax(1, keepdim=True), 1)
            if self.label_manager.has_ignore_label:
                mask = (target != self.label_manager.ignore_label).float()
                target = torch.where(target == self.label_manager.ignore_label, 0, target)
        tp, fp, fn, _ = get_tp_fp_fn_tn(prediction, target, axes=[0] + list(range(2, probs.ndim)), mask=mask)
        first = 0 if self.label_manager.has_regions else 1  # no background Dice
        return {f"{name}_{n}": v[first:].cpu().numpy() for n, v in (("tp", tp), ("fp", fp), ("fn", fn))}

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        if not self.validated_models():
            return
        outputs = collate_outputs(val_outputs)
        for name in self.validated_models():
            tp, fp, fn = (self._sum_over_ranks(np.sum(outputs[f"{name}_{n}"], 0)) for n in ("tp", "fp", "fn"))
            with np.errstate(invalid="ignore", divide="ignore"):
                dice = np.nanmean(2 * tp / (2 * tp + fp + fn))
            self.logger.log(f"semi_{name}_dice", float(dice), self.current_epoch)

    def _sum_over_ranks(self, value: np.ndarray) -> np.ndarray:
        return np.sum(self._gather_over_ranks(value), 0)

    def on_epoch_end(self):
        epoch = self.current_epoch
        line = ", ".join(f"{k.removeprefix('semi_')}: {self.logger.get_value(k, step=-1):.4f}"
                         for k in self._log_keys())
        self.print_to_log_file(f"Semi-supervised: {line}")
        super().on_epoch_end()
        if self.local_rank == 0:
            from nnunet_semi.trainer.plotting import plot_semi_progress

            plot_semi_progress(self.logger.local_logger.my_fantastic_logging, self._log_keys(), epoch,
                               join(self.output_folder, "progress_semi.png"))

    # ------------------------------------------------------------------------------------------ checkpoints
    def semi_state(self) -> dict:
        """What ``checkpoint["semi_state"]`` holds: plain tensors and numbers only (no plugin objects)."""
        return {"auxiliary": self.auxiliary.state_dict(), "deployed_weights": self.deployed_weights}

    def load_semi_state(self, state: dict) -> None:
        if "student" not in self.auxiliary and any(k.startswith("student.") for k in state["auxiliary"]):
            self.auxiliary["student"] = make_teacher(self.unwrapped_network())  # final checkpoint deploying the teacher
        self.auxiliary.load_state_dict(state["auxiliary"])
        self.deployed_weights = state.get("deployed_weights", "student")
        self._teacher_restored = True

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus ``semi_state`` (and the deployed weights), written once and moved into place
        atomically: a kill at any instant leaves the previous complete file or the new one, never a partial one."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        buffer = io.BytesIO()
        super().save_checkpoint(buffer)  # nnU-Net builds its checkpoint dict and torch.saves it into memory
        buffer.seek(0)
        checkpoint = torch.load(buffer, map_location="cpu", weights_only=False)
        checkpoint[SEMI_STATE_KEY] = self.semi_state()
        deployed = self.deployed_network_state()
        if deployed is not None:
            checkpoint["network_weights"] = deployed
        self.write_checkpoint(checkpoint, filename)

    def write_checkpoint(self, checkpoint: dict, filename: str) -> None:
        """The one write of a checkpoint file (``checkpoints.atomic_torch_save``)."""
        atomic_torch_save(checkpoint, filename)

    def deployed_network_state(self) -> dict | None:
        """``network_weights`` to write instead of ``self.network``'s state (a deployable module that
        ``build_network_architecture`` builds at inference); None: ``self.network``'s."""
        return None

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's load plus ``semi_state``, robust to damaged files.

        A file that cannot be read (cut short by a crash before crash-safe writes, a full disk, a truncated copy) is
        named in the log, and the newest readable of ``checkpoint_latest``/``checkpoint_best`` in the same folder is
        loaded instead; with none readable, training starts fresh. A checkpoint without ``semi_state`` (stock
        nnU-Net's) loads the network, optimizer and logs; the teacher is rebuilt from the student and the other
        modules start fresh, as the log says.
        """
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, dict):
            source, checkpoint = None, filename_or_checkpoint
        else:
            source, checkpoint = self._readable_checkpoint(filename_or_checkpoint)
            if checkpoint is None:
                return
        semi_state = checkpoint.get(SEMI_STATE_KEY)
        loadable = self.prepare_loaded_checkpoint(checkpoint)
        if semi_state is None:
            loadable = self._with_auxiliary_optimizer_groups(loadable)
        if loadable is checkpoint and source is not None:
            super().load_checkpoint(source)
        else:  # nnU-Net's load_checkpoint reads files only: hand it the converted checkpoint as one
            with tempfile.TemporaryDirectory() as folder:
                converted = join(folder, "checkpoint.pth")
                torch.save(loadable, converted)
                super().load_checkpoint(converted)
        if semi_state is None:
            self.print_to_log_file(
                f"{source or 'the checkpoint'} has no '{SEMI_STATE_KEY}' (written by stock nnU-Net or another "
                f"trainer): network, optimizer and logs resumed at epoch {self.current_epoch}; the teacher is rebuilt "
                f"from the student and {sorted(set(self.auxiliary) - {'teacher'}) or 'no other module'} start fresh.")
            return
        self.load_semi_state(semi_state)

    def prepare_loaded_checkpoint(self, checkpoint: dict) -> dict:
        """The checkpoint as nnU-Net's ``load_checkpoint`` should see it (a method may convert its
        ``network_weights``); return the same object when nothing changes."""
        return checkpoint

    def _readable_checkpoint(self, filename: str) -> tuple[str | None, dict | None]:
        """``filename`` and its checkpoint, or, if it is damaged, the newest readable checkpoint beside it; (None,
        None) when no checkpoint there can be read."""
        try:
            return filename, read_checkpoint(filename)
        except DamagedCheckpointError as error:
            self.print_to_log_file(f"WARNING: damaged checkpoint, not resumed from: {error}")
        folder, damaged = os.path.dirname(os.path.abspath(filename)), os.path.abspath(filename)
        readable = []
        for name in CHECKPOINT_FILES[1:]:  # latest, best
            candidate = join(folder, name)
            if candidate == damaged or not isfile(candidate):
                continue
            try:
                readable.append((read_checkpoint(candidate), candidate))
            except DamagedCheckpointError as error:
                self.print_to_log_file(f"WARNING: damaged checkpoint, not resumed from: {error}")
        if not readable:
            self.print_to_log_file(f"WARNING: no readable checkpoint in {folder}: starting a new training from "
                                   f"epoch 0 (the damaged files are overwritten by the next saves).")
            return None, None
        checkpoint, chosen = max(readable, key=lambda item: item[0].get("current_epoch", 0))
        self.print_to_log_file(f"Resuming from {chosen} instead (epoch {checkpoint.get('current_epoch', 0)}).")
        return chosen, checkpoint

    def _with_auxiliary_optimizer_groups(self, checkpoint: dict) -> dict:
        """A checkpoint of the plain network alone has one optimizer parameter group; keep this trainer's groups
        for the auxiliary modules (fresh state) so that nnU-Net's optimizer load accepts it."""
        saved = checkpoint.get("optimizer_state")
        current = self.optimizer.state_dict()
        if not saved or len(saved["param_groups"]) >= len(current["param_groups"]):
            return checkpoint
        groups = saved["param_groups"] + current["param_groups"][len(saved["param_groups"]):]
        return checkpoint | {"optimizer_state": {"state": saved["state"], "param_groups": groups}}

    def validation_scores(self) -> dict[str, float]:
        """Mean validation pseudo Dice over the last ``deploy_selection_epochs`` epochs: 'student' (``self.network``)
        and every model in ``validated_models``."""
        n = self.deploy_selection_epochs
        scores = {"student": float(np.nanmean(self.logger.get_value("mean_fg_dice", step=None)[-n:]))}
        for name in self.validated_models():
            scores[name] = float(np.nanmean(self.logger.get_value(f"semi_{name}_dice", step=None)[-n:]))
        self.print_to_log_file(f"Validation pseudo Dice over the last {n} epochs: "
                               + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores

    def choose_deployed_weights(self, scores: dict[str, float] | None = None) -> str:
        """The model with the best ``scores`` (default: ``validation_scores()``); a tie goes to the later one in
        ``validated_models`` (the teacher over the student). A NaN score is never chosen over a number."""
        scores = self.validation_scores() if scores is None else scores
        best = next(iter(scores))
        for name, score in scores.items():
            if not np.isnan(score) and (np.isnan(scores[best]) or score >= scores[best]):
                best = name
        return best

    def deployment_candidates(self) -> tuple[str, ...]:
        """The models ``deployed_model`` may name (besides "best_validated"); raises ValueError for another."""
        candidates = ("student",) + tuple(self.validated_models())
        if self.deployed_model not in candidates + (BEST_VALIDATED,):
            raise ValueError(f"{self.__class__.__name__}.deployed_model is {self.deployed_model!r}; it must be one "
                             f"of {candidates + (BEST_VALIDATED,)}")
        return candidates

    def declared_deployment(self, scores: dict[str, float]) -> str:
        """What ``deployed_model`` deploys: the declared model, or under "best_validated" the best of ``scores``."""
        self.deployment_candidates()
        return self.choose_deployed_weights(scores) if self.deployed_model == BEST_VALIDATED else self.deployed_model

    def finalize_deployed_weights(self) -> None:
        """Put the teacher into ``self.network`` when it is what ``deployed_model`` deploys, keeping the student in
        ``auxiliary``.

        Idempotent: a run resumed from ``checkpoint_final.pth`` that already deploys the teacher is left as it is.
        """
        if self.deployed_weights == "student" and self.declared_deployment(self.validation_scores()) == "teacher":
            student = make_teacher(self.unwrapped_network())
            self.unwrapped_network().load_state_dict(self.teacher.state_dict())
            self.auxiliary["student"] = student
            self.deployed_weights = "teacher"
        self.print_to_log_file(f"network_weights in checkpoint_final.pth: the {self.deployed_weights}")

    def on_train_end(self):
        # decide what checkpoint_final.pth deploys before nnU-Net writes it and validates self.network
        self.finalize_deployed_weights()
        super().on_train_end()
        if self.dataloader_unlabeled is not None and isinstance(self.dataloader_unlabeled,
                                                                NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()


def average_gradients_over_ranks(parameters: list[torch.nn.Parameter]) -> None:
    """All-reduce the mean of the parameters' gradients over the DDP process group; a parameter without gradient on
    a rank (unused in its step) counts as zero there, so every rank joins the same collective."""
    if not parameters:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in parameters:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


class _RecordingForward(nn.Module):
    """Calls ``network`` and keeps its last output."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network, self.output = network, None

    def forward(self, x):
        self.output = self.network(x)
        return self.output


def take_samples(output, n: int):
    """The first ``n`` samples of a network output (a list of scales under deep supervision, else a tensor)."""
    return [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]


def full_resolution(output) -> torch.Tensor:
    """The full-resolution output (the first scale under deep supervision)."""
    return output[0] if isinstance(output, (list, tuple)) else output


def _to_device(value, device):
    if isinstance(value, list):
        return [v.to(device, non_blocking=True) for v in value]
    return value.to(device, non_blocking=True)


@contextmanager
def _env(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
