"""``python -m nnunet_semi.tools.warm_train ARGS``: ``nnUNetv2_train ARGS`` whose ``-pretrained_weights`` loads every
layer, output layers included, whatever the trainer (stock ones too); the self-training command's fine-tuning runs
so. Same arguments and output as ``nnUNetv2_train``; a checkpoint that does not fit is a one-line error."""

from __future__ import annotations


def main() -> None:
    from nnunetv2.run.run_training import run_training_entry

    from nnunet_semi.trainer.warm_start import warm_start_every_trainer

    warm_start_every_trainer()
    run_training_entry()


if __name__ == "__main__":
    main()
