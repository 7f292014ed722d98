"""Network outputs as nnU-Net returns them: a list of scales under deep supervision, else one tensor."""

from __future__ import annotations

import torch
from torch import nn


def take_samples(output, n: int):
    """The first ``n`` samples of a network output (a list of scales under deep supervision, else a tensor)."""
    return [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]


def full_resolution(output) -> torch.Tensor:
    """The full-resolution output (the first scale under deep supervision)."""
    return output[0] if isinstance(output, (list, tuple)) else output


class RecordingForward(nn.Module):
    """Calls ``network`` and keeps its last output."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network, self.output = network, None

    def forward(self, x):
        self.output = self.network(x)
        return self.output
