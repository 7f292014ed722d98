"""nnUNet_extTrainer shim for the test-only trainers (re-exports only, as the plugin's own shim)."""

from tiny_trainers import *  # noqa: F401,F403
