"""The deployable model of a dual-network trainer: two networks and which of them (or their ensemble) predicts."""

from __future__ import annotations

import math

import torch
from torch import nn

DEPLOYED_MEMBERS = ("first", "second", "ensemble")


def is_ensemble_state(state_dict: dict) -> bool:
    """Whether a state dict is a ``DualNetworkEnsemble``'s (else a single network's)."""
    return "deployed_member" in state_dict


def member_state(state_dict: dict, member: str) -> dict:
    """The state dict of one network (``"first"`` or ``"second"``) out of a ``DualNetworkEnsemble`` state dict."""
    prefix = f"{member}."
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class DualNetworkEnsemble(nn.Module):
    """Two segmentation networks deployed as one module for nnU-Net's predictor.

    ``deployed_member`` (a buffer, so it travels in ``network_weights``) selects what ``forward`` returns: the first
    network's logits, the second's, or the ensemble ``log(0.5 * (softmax(z_1) + softmax(z_2)))``, whose softmax is
    the average of the two networks' softmax (what nnU-Net's predictor applies to the logits it accumulates).

    ``load_state_dict`` also accepts the weights of a single network (nnU-Net's ``network_weights`` of a checkpoint
    written during training): they go into the first network, which is then deployed alone.
    """

    def __init__(self, first: nn.Module, second: nn.Module, deployed: str = "ensemble"):
        super().__init__()
        self.first = first
        self.second = second
        self.register_buffer("deployed_member", torch.tensor(DEPLOYED_MEMBERS.index(deployed)))

    @property
    def deployed(self) -> str:
        return DEPLOYED_MEMBERS[int(self.deployed_member)]

    def forward(self, x: torch.Tensor):
        deployed = self.deployed
        if deployed == "first":
            return self.first(x)
        if deployed == "second":
            return self.second(x)
        first, second = self.first(x), self.second(x)
        if isinstance(first, (list, tuple)):  # deep supervision: every scale
            return [_log_mean_softmax(a, b) for a, b in zip(first, second)]
        return _log_mean_softmax(first, second)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if is_ensemble_state(state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = self.first.load_state_dict(state_dict, strict=strict, assign=assign)
        self.deployed_member.fill_(DEPLOYED_MEMBERS.index("first"))
        return result


def _log_mean_softmax(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack([torch.log_softmax(logits_a.float(), 1), torch.log_softmax(logits_b.float(), 1)])
    return torch.logsumexp(stacked, 0) - math.log(2.0)
