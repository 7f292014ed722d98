"""Feature-level perturbation of nnU-Net networks: the encoder/decoder split and channel dropout on encoder
features (skips). Shapes (B, C, *spatial), 2D or 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def encoder_and_decoder(network: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The encoder and decoder of an nnU-Net network whose forward is ``decoder(encoder(x))`` (PlainConvUNet,
    ResidualEncoderUNet); ``encoder(x)`` returns the skips, bottleneck last."""
    encoder, decoder = getattr(network, "encoder", None), getattr(network, "decoder", None)
    if encoder is None or decoder is None or not getattr(encoder, "return_skips", False):
        raise TypeError(f"{type(network).__name__} has no encoder returning skips and decoder; feature perturbation "
                        f"needs an nnU-Net U-Net (PlainConvUNet or ResidualEncoderUNet).")
    return encoder, decoder


def channel_dropout(features: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero whole channels of each sample with probability ``p`` and rescale the rest by 1 / (1 - p)
    (Dropout2d/3d semantics for any number of spatial dimensions).

    Args:
        features: (B, C, *spatial).
        p: drop probability in [0, 1).
        generator: random source on ``features``' device (None: torch's global one).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    keep = torch.bernoulli(torch.full(features.shape[:2] + (1,) * (features.ndim - 2), 1 - p,
                                      device=features.device, dtype=features.dtype), generator=generator)
    return features * keep / (1 - p)


def dropout_skips(skips: Sequence[torch.Tensor], p: float, generator: torch.Generator | None = None
                  ) -> list[torch.Tensor]:
    """``channel_dropout`` on every encoder output (UniMatch's feature perturbation)."""
    return [channel_dropout(s, p, generator) for s in skips]
