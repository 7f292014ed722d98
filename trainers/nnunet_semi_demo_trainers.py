"""Re-exports of the demo's trainers (``nnUNetv2_semi_demo``) for nnU-Net's ``nnUNet_extTrainer`` lookup; they are
tools, kept out of ``nnunet_semi.methods``."""

from nnunet_semi.tools.demo_trainers import *  # noqa: F401,F403
