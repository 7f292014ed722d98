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


class ChannelDropoutOnOutputs:
    """``channel_dropout`` on the outputs of given submodules, only inside ``with dropout.active(generator):``: a
    network without dropout layers (nnU-Net's U-Net, an EMA teacher in eval mode) made stochastic where a method
    wants it, e.g. SGRS-Net's teacher, whose V-Net drops bottleneck and last decoder channels (p = 0.5).

    The forward hooks stay registered and are inert outside ``with``; the module's weights and state are untouched.
    """

    def __init__(self, modules: Sequence[nn.Module], p: float):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p, self._generator, self._active = p, None, False
        self._handles = [m.register_forward_hook(self._drop) for m in modules]

    def active(self, generator: torch.Generator | None = None) -> "ChannelDropoutOnOutputs":
        self._generator = generator
        return self

    def __enter__(self):
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False

    def _drop(self, module, inputs, output):
        if self._active and self.p > 0 and isinstance(output, torch.Tensor):
            return channel_dropout(output, self.p, self._generator)
        return None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
