"""Test-only trainers: the plugin's trainers on a schedule of a few iterations (found through nnUNet_extTrainer)."""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunet_semi.methods
from nnunet_semi.methods import nnUNetTrainerDualCCE, nnUNetTrainerMeanTeacher
from nnunet_semi.tools.progress import EpochProgressFile


class _TinySchedule:
    """2 epochs of 3 iterations, 1 validation iteration; deployment decided over both epochs."""

    epochs = 2
    iterations_per_epoch = 3
    val_iterations_per_epoch = 1
    deploy_selection_epochs = 2


class nnUNetTrainerMeanTeacherTiny(EpochProgressFile, _TinySchedule, nnUNetTrainerMeanTeacher):
    pass


class nnUNetTrainerTiny(EpochProgressFile, nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 3, 1


# every method on the tiny schedule, found from the methods package: a new method needs no line here
for _name in nnunet_semi.methods.__all__:
    if "_" not in _name and _name not in ("nnUNetTrainerMeanTeacher", "nnUNetTrainerDualCCE"):
        globals()[f"{_name}Tiny"] = type(f"{_name}Tiny", (_TinySchedule, getattr(nnunet_semi.methods, _name)),
                                         {"__module__": __name__})


class nnUNetTrainerDualCCETiny(_TinySchedule, nnUNetTrainerDualCCE):
    deployed_model = "best_validated"

    def validation_scores(self):
        # pinned, so that the end-to-end test runs the ensemble deployment and exports the better single network, the
        # peer (2 tiny epochs decide nothing)
        return {"student": 0.5, "peer": 0.6, "ensemble": 0.7}


class nnUNetTrainerMeanTeacherSlowCheckpoints(nnUNetTrainerMeanTeacher):
    """The kill test's trainer: 10 epochs of 3 iterations, a checkpoint every epoch, a short visible ramp, and each
    checkpoint's complete temporary file kept for a second before its rename, so that a kill can land inside the
    write. 10 epochs, not fewer: on a fast machine the timed kills advance the run by two or three epochs each, and
    with 6 the last start finished before its kill could land."""

    epochs = 10
    iterations_per_epoch = 3
    val_iterations_per_epoch = 1
    deploy_selection_epochs = 2
    unsup_rampup_iterations = 12

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1

    def write_checkpoint(self, checkpoint, filename):
        import time

        from nnunet_semi.trainer.checkpoints import atomic_torch_save

        atomic_torch_save(checkpoint, filename, before_replace=lambda: time.sleep(1.0))


class nnUNetTrainerTinyFinetune(nnUNetTrainerTiny):
    """The self-training test's fine-tuning trainer: the tiny schedule under a name of its own."""


class nnUNetTrainerBroken(nnUNetTrainer):
    """Fails at its first training step, after nnU-Net has begun its log: the failed-run report's test."""

    def train_step(self, batch: dict) -> dict:
        raise RuntimeError("broken on purpose")
