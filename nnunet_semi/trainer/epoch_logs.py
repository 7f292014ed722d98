"""What a semi-supervised trainer logs: per-step statistics, averaged per epoch over steps and DDP ranks into
nnU-Net's logger (so that they are saved in the checkpoint and resume with it), a line per epoch in the training
log, and ``progress_semi.png``.

Keys: ``semi_loss_<term>`` (a term as returned), ``semi_weighted_<term>`` (as it entered the total),
``semi_<statistic>``, ``semi_unsup_weight`` and ``semi_<model>_dice`` for every validated model. They come from the
base's declarations (``loss_terms``, ``statistics``, ``validated_models``).
"""

from __future__ import annotations

from os.path import join

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunet_semi.trainer.ddp import mean_over_ranks


class EpochLogs(nnUNetTrainer):
    """Per-step statistics and per-epoch logs of every declared term and statistic."""

    def log_step_statistic(self, name: str, value: torch.Tensor | float) -> None:
        """Record a per-step statistic (averaged per epoch and plotted); names must be in ``statistics``."""
        if name not in self.statistics:  # else it would be averaged nowhere and vanish from the logs
            raise ValueError(f"{type(self).__name__} logs the statistic {name!r}, which its `statistics` "
                             f"{self.statistics} does not declare: add it there.")
        self._step_statistics[name] = float(value)

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

    def _log_keys(self) -> list[str]:
        keys = [f"semi_{kind}_{t}" for kind in ("loss", "weighted") for t in self.loss_terms]
        keys += [f"semi_{s}" for s in self.statistics]
        return keys + ["semi_unsup_weight"] + [f"semi_{m}_dice" for m in self.validated_models()]

    def _register_log_keys(self) -> None:
        """Register every key in nnU-Net's local logger, which accepts only keys present in its dict. After a
        resume from a checkpoint logged with fewer keys (an older version), a missing key is NaN for the epochs
        before, so that its list stays aligned with the epochs."""
        store = self.logger.local_logger.my_fantastic_logging
        for key in self._log_keys():
            store.setdefault(key, [float("nan")] * self.current_epoch)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for term in self.loss_terms:
            for kind in ("loss", "weighted"):
                self.logger.log(f"semi_{kind}_{term}", mean_over_ranks(outputs[f"{kind}_{term}"], self.is_ddp),
                                self.current_epoch)
        for stat in self.statistics:
            self.logger.log(f"semi_{stat}", mean_over_ranks(outputs[f"stat_{stat}"], self.is_ddp), self.current_epoch)
        self.logger.log("semi_unsup_weight", mean_over_ranks(outputs["unsup_weight"], self.is_ddp), self.current_epoch)

    def on_epoch_end(self):
        epoch = self.current_epoch
        def last(key: str) -> float:
            return self.logger.get_value(key, step=-1)
        # each term as returned and as it entered the total
        terms = [f"loss_{t}: {last(f'semi_loss_{t}'):.4f} (weighted {last(f'semi_weighted_{t}'):.4f})"
                 for t in self.loss_terms]
        others = [f"{k.removeprefix('semi_')}: {last(k):.4f}" for k in self._log_keys()
                  if not k.startswith(("semi_loss_", "semi_weighted_"))]
        self.print_to_log_file(f"Semi-supervised: {', '.join(terms + others)}")
        super().on_epoch_end()
        if self.local_rank == 0:
            from nnunet_semi.trainer.plotting import plot_semi_progress

            plot_semi_progress(self.logger.local_logger.my_fantastic_logging, self._log_keys(), epoch,
                               join(self.output_folder, "progress_semi.png"))
