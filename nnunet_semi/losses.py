"""Loss functions on probabilities; shapes (B, C, *spatial), 2D or 3D."""

from __future__ import annotations

import torch


def probability_mse(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean squared error between two probability maps (Mean Teacher's consistency loss).

    Args:
        student_probs: (B, C, *spatial) probabilities that receive gradient.
        teacher_probs: (B, C, *spatial) target probabilities (detached here).

    Returns:
        Scalar mean over every element; 0 when both are equal.
    """
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(f"shape mismatch: student {tuple(student_probs.shape)} vs teacher {tuple(teacher_probs.shape)}")
    return torch.mean((student_probs - teacher_probs.detach()) ** 2)
