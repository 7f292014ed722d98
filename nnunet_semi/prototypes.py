"""Class prototypes of decoder features, kept as EMA buffers (saved in ``state_dict``), and decoder-feature access."""

from __future__ import annotations

import torch
from torch import nn


class PrototypeBank(nn.Module):
    """One feature prototype per class, updated by exponential moving average of class-mean features.

    Args:
        num_classes: C.
        feature_dim: D, the channel count of the features (e.g. ``features_per_stage[0]`` of nnU-Net's plans).
        momentum: prototype <- momentum * prototype + (1 - momentum) * batch class mean; a class seen for the first
            time takes its batch mean directly.
    """

    def __init__(self, num_classes: int, feature_dim: int, momentum: float = 0.99):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("prototypes", torch.zeros(num_classes, feature_dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """features (N, D), labels (N,): EMA of the mean feature of every class present."""
        features = features.detach().float()
        for c in labels.unique().tolist():
            mean = features[labels == c].mean(0)
            if self.initialized[c]:
                self.prototypes[c].lerp_(mean, 1 - self.momentum)
            else:
                self.prototypes[c].copy_(mean)
                self.initialized[c] = True


class DecoderFeatures:
    """Captures the full-resolution decoder features of an nnU-Net network (input of its last segmentation layer).

    ``with DecoderFeatures(network) as captured: network(x)``, then ``captured.features`` is (B, F, *spatial), with
    F = ``features_per_stage[0]``, whether deep supervision is on or off. Works for PlainConvUNet and
    ResidualEncoderUNet (both keep ``decoder.stages``).
    """

    def __init__(self, network: nn.Module):
        self.stage = network.decoder.stages[-1]
        self.features: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> "DecoderFeatures":
        self._handle = self.stage.register_forward_hook(self._capture)
        return self

    def _capture(self, module, inputs, output) -> None:
        self.features = output

    def __exit__(self, *exc) -> None:
        self._handle.remove()
