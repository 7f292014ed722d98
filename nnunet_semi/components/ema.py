"""The EMA teacher: a frozen copy of the student whose weights follow the student's by exponential averaging."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` in eval mode (no gradients, never in an optimizer)."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_momentum(step: int, max_momentum: float) -> float:
    """min(1 - 1/(step + 1), max_momentum): a plain average early on, then the fixed momentum (Mean Teacher)."""
    return min(1.0 - 1.0 / (step + 1), max_momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student for floating parameters and buffers.

    Integer buffers (counters) are copied. Both modules must have the same architecture.
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        if t_buf.dtype.is_floating_point:
            t_buf.lerp_(s_buf, 1.0 - momentum)
        else:
            t_buf.copy_(s_buf)
