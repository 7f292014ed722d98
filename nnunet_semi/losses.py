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


def hard_pseudo_label_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the hard labels of another prediction (cross pseudo supervision).

    Args:
        logits: (B, C, *spatial) raw outputs that receive gradient.
        teacher_probs: (B, C, *spatial) probabilities of the other network; only their hard decision is used.
        regions: independent sigmoid channels (nnU-Net's region-based training): binary CE against
            ``teacher_probs > 0.5`` per channel. Otherwise softmax CE against ``argmax`` over channels.

    Returns:
        Scalar mean over voxels (and channels for regions).
    """
    if logits.shape != teacher_probs.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} vs probabilities {tuple(teacher_probs.shape)}")
    logits = logits.float()
    if regions:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, (teacher_probs > 0.5).float())
    return torch.nn.functional.cross_entropy(logits, teacher_probs.argmax(1).detach())
