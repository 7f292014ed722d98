"""Re-exports of nnunet-semi's trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (classes live in nnunet_semi)."""

from nnunet_semi.methods import *  # noqa: F401,F403
