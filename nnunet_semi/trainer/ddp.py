"""DDP helpers of the semi-supervised trainers: values gathered over ranks, gradients of modules that no DDP wrapper
syncs. Every function is a no-op without an initialised process group (``is_ddp`` False)."""

from __future__ import annotations

import numpy as np
import torch
from torch import distributed as dist


def gather_over_ranks(value, is_ddp: bool) -> list:
    """``value`` from every DDP rank (a one-element list without DDP)."""
    if not is_ddp:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_ranks(values, is_ddp: bool) -> float:
    """The mean of per-step values (arrays or scalars) over every rank; values undefined in a step (NaN, e.g.
    nothing to compare yet) are skipped, and NaN comes back only when every value is."""
    values = np.concatenate([np.atleast_1d(v) for v in gather_over_ranks(values, is_ddp)]).astype(np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def sum_over_ranks(value: np.ndarray, is_ddp: bool) -> np.ndarray:
    """The elementwise sum of ``value`` over every rank (e.g. per-class tp/fp/fn counts)."""
    return np.sum(gather_over_ranks(value, is_ddp), 0)


def average_gradients_over_ranks(parameters: list[torch.nn.Parameter]) -> None:
    """All-reduce the mean of the parameters' gradients over the DDP process group; a parameter without gradient on
    a rank (unused in its step) counts as zero there, so every rank joins the same collective."""
    if not parameters:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in parameters:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()
