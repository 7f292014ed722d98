"""Semi-supervised building blocks by concept: functions and modules on tensors (B, C, *spatial), 2D and 3D,
any number of classes; they take explicit arguments and hold no nnU-Net trainer state."""
