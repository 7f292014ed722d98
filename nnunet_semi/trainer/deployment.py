"""Which models a semi-supervised trainer validates beside ``self.network``, and which one it deploys.

Every epoch each model of ``validated_models()`` (the teacher by default; a method may add its peer or an ensemble)
is scored on nnU-Net's validation batches beside the student, as ``semi_<model>_dice``. At the end of training the
model that ``deployed_model`` declares (or, under "best_validated", the best over the last epochs) becomes
``network_weights`` in ``checkpoint_final.pth``, before nnU-Net writes it and runs its final validation.
"""

from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_semi.components.ema import make_teacher
from nnunet_semi.trainer.checkpoint_state import SEMI_STATE_KEY
from nnunet_semi.trainer.ddp import sum_over_ranks
from nnunet_semi.trainer.outputs import RecordingForward, full_resolution

BEST_VALIDATED = "best_validated"


class ValidationAndDeployment(nnUNetTrainer):
    """The validated models' Dice every epoch, and the deployed model at the end.

    What a trained checkpoint holds is said by two class methods, the one place that knows a method's members
    (the benchmark, the export and deployment ask them): ``member_weights`` (every network, as weights of the
    deployable model that ``nnUNetv2_predict`` builds) and ``exportable_networks`` (the single networks vanilla
    nnU-Net can run, for ``nnUNetv2_semi_export``).
    """

    @classmethod
    def member_weights(cls, checkpoint: dict) -> dict[str, dict]:
        """Every network ``checkpoint`` holds, by name, as weights that make this trainer's deployable network
        predict with it alone; the deployed one's are ``network_weights``. Default: the student and the EMA teacher
        ({} where the checkpoint has no teacher beside the deployed network)."""
        state = checkpoint.get(SEMI_STATE_KEY)
        if state is None or state.get("deployed_weights") not in ("student", "teacher"):
            return {}
        deployed = state["deployed_weights"]
        other = "teacher" if deployed == "student" else "student"
        weights = _prefixed(state["auxiliary"], other)
        return {deployed: checkpoint["network_weights"], other: weights} if weights else {}

    @classmethod
    def exportable_networks(cls, checkpoint: dict) -> dict[str, tuple[dict, dict | None]]:
        """The single networks of ``checkpoint`` that vanilla nnU-Net runs, by name: (weights, the network's plans
        architecture, or None for the plans' own). Default: the deployed network alone."""
        deployed = (checkpoint.get(SEMI_STATE_KEY) or {}).get("deployed_weights", "network")
        return {deployed: (checkpoint["network_weights"], None)}

    @classmethod
    def default_export(cls, checkpoint: dict) -> str:
        """Which of ``exportable_networks`` ``nnUNetv2_semi_export`` writes unless told (default: the deployed)."""
        return next(iter(cls.exportable_networks(checkpoint)))

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
        network, recorder = self.network, RecordingForward(self.network)
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
            tp, fp, fn = (sum_over_ranks(np.sum(outputs[f"{name}_{n}"], 0), self.is_ddp) for n in ("tp", "fp", "fn"))
            with np.errstate(invalid="ignore", divide="ignore"):
                dice = np.nanmean(2 * tp / (2 * tp + fp + fn))
            self.logger.log(f"semi_{name}_dice", float(dice), self.current_epoch)

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


def _prefixed(state_dict: dict, prefix: str) -> dict:
    """The entries of ``state_dict`` under ``prefix.``, the prefix removed (one module of a ModuleDict's state)."""
    return {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
