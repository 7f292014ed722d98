"""Per-voxel uncertainty of softmax predictions (B, C, *spatial): normalized entropy, top-2 margin, the
measure by name, and percentiles of large tensors."""

from __future__ import annotations

import math

import torch


def binary_entropy(p: float, base: float = math.e) -> float:
    """Entropy of a Bernoulli(p) distribution in the given logarithm base."""
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(base)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over the channel axis divided by ln(C): (B, C, *spatial) -> (B, 1, *spatial) in [0, 1]."""
    probs = probs.float()
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1, keepdim=True)
    return entropy / math.log(probs.shape[1])


def top2_margin(probs: torch.Tensor) -> torch.Tensor:
    """p_(1) - p_(2), the gap between the two largest class probabilities: (B, C, *spatial) -> (B, 1, *spatial) in
    [0, 1]. A 50/50 tie between two classes is 0 and a one-hot prediction 1, whatever the number of classes C
    (unlike 1 - H(p) / ln C, which gives such a tie 0 for two classes and 0.5 for four)."""
    top2 = probs.float().topk(2, dim=1).values
    return top2[:, :1] - top2[:, 1:2]


def percentile(values: torch.Tensor, percent: float, max_samples: int = 2**22,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``percent``-th percentile of all elements, exact up to ``max_samples`` elements, else of a uniform random
    subset of that size: a full 3D patch batch can exceed ``torch.quantile``'s input limit (2^24 elements in many
    torch releases), and the subset bounds the cost.

    Args:
        values: any shape; flattened.
        percent: in [0, 100].
        max_samples: subset size for large inputs.
        generator: randomness of the subset (CPU generator; None: the global one).

    Returns:
        0-d tensor (nearest-rank percentile via ``kthvalue``).
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    flat = values.detach().reshape(-1).float()
    if flat.numel() > max_samples:
        index = torch.randint(0, flat.numel(), (max_samples,), generator=generator).to(flat.device)
        flat = flat[index]
    k = min(flat.numel(), max(1, round(percent / 100 * flat.numel())))
    return flat.kthvalue(k).values


UNCERTAINTY_MEASURES = ("margin", "entropy")


def prediction_uncertainty(probs: torch.Tensor, measure: str = "margin") -> torch.Tensor:
    """Voxel uncertainty in [0, 1], (B, C, *spatial) -> (B, 1, *spatial): ``"margin"``: 1 - (p_(1) - p_(2)), the same
    for any number of classes (a tie between two classes is 1); ``"entropy"``: H(p) / ln C, which depends on C (a
    tie between two of four classes is 0.5)."""
    if measure == "margin":
        return 1 - top2_margin(probs)
    if measure == "entropy":
        return normalized_entropy(probs)
    raise ValueError(f"measure must be one of {UNCERTAINTY_MEASURES}, got {measure!r}")
