"""Pseudo-label construction and fusion from softmax predictions (B, C, *spatial): the union of two predictions,
uncertainty-weighted fusion of several, and dual-confidence voxel weights of two heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from nnunet_semi.components.uncertainty import normalized_entropy, prediction_uncertainty


def union_pseudo_label(probs_a: torch.Tensor, probs_b: torch.Tensor) -> torch.Tensor:
    """Hard pseudo label that keeps the foreground either of two networks predicts (the dual network's union target).

    For two classes this is ``argmax_a OR argmax_b``. With more classes: where both agree, that class; where one
    predicts background (class 0), the other's class; where they predict different foreground classes, the class of
    the more confident network (higher max probability).

    Args:
        probs_a, probs_b: softmax probabilities (B, C, *spatial).

    Returns:
        (B, 1, *spatial) long.
    """
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"shape mismatch: {tuple(probs_a.shape)} vs {tuple(probs_b.shape)}")
    confidence_a, label_a = probs_a.detach().max(1, keepdim=True)
    confidence_b, label_b = probs_b.detach().max(1, keepdim=True)
    take_b = (label_a == 0) | ((label_b != 0) & (confidence_b > confidence_a))
    return torch.where(take_b, label_b, label_a)


class FusedPseudoLabel(NamedTuple):
    """Uncertainty-weighted fusion of K predictions.

    probs: (B, C, *spatial) fused probabilities; labels: (B, 1, *spatial) their argmax; voxel_weight:
    (B, 1, *spatial) 1 - uncertainty of the fused probabilities; source_weights: (K, B, 1, *spatial), summing to 1
    over K.
    """

    probs: torch.Tensor
    labels: torch.Tensor
    voxel_weight: torch.Tensor
    source_weights: torch.Tensor


@torch.no_grad()
def uncertainty_weighted_fusion(probs: Sequence[torch.Tensor], temperature: float = 0.5,
                                measure: str = "margin") -> FusedPseudoLabel:
    """Fuse predictions by their certainty instead of thresholding them: per voxel and source k,
    ``alpha_k = softmax_k(-u(p_k) / T)``, ``p = sum_k alpha_k p_k``, weight ``1 - u(p)``, with ``u`` the
    ``prediction_uncertainty`` (default the top-2 margin's complement, so weights mean the same for any C).

    Args:
        probs: K probability maps (B, C, *spatial) (detached here).
        temperature: T > 0; small T follows the most certain source, large T averages.
        measure: see ``prediction_uncertainty``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    stacked = torch.stack([p.detach().float() for p in probs])  # (K, B, C, *spatial)
    uncertainty = torch.stack([prediction_uncertainty(p, measure) for p in stacked])  # (K, B, 1, *spatial)
    source_weights = torch.softmax(-uncertainty / temperature, 0)
    fused = (source_weights * stacked).sum(0)
    return FusedPseudoLabel(fused, fused.argmax(1, keepdim=True), 1 - prediction_uncertainty(fused, measure),
                            source_weights)


DUAL_CONFIDENCE_RULES = ("product", "min", "agreement")


CONFIDENCE_MEASURES = ("pseudo_label_prob", "max_prob", "entropy")


def dual_confidence_weights(seg_probs: torch.Tensor, np_probs: torch.Tensor, rule: str = "agreement",
                            tau: float = 0.2, measure: str = "pseudo_label_prob",
                            pseudo_label: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voxel weights of pseudo supervision from two confidences of different mechanisms, on one scale.

    Confidence of each head (``measure``): ``"pseudo_label_prob"`` its probability of the pseudo label, so a head
    that confidently predicts another class gives a low confidence; ``"max_prob"`` its max probability (blind to
    class disagreement: (0.05, 0.95) and (0.95, 0.05) are equally confident); ``"entropy"`` 1 - H(p) / ln C (also
    blind to it). Rules: ``"product"`` ``c_seg * c_np``; ``"min"`` ``min(c_seg, c_np)``; ``"agreement"``
    ``exp(-|c_seg - c_np| / tau) * min(c_seg, c_np)``, which explicitly down-weights voxels where one is confident
    and the other is not.

    Args:
        seg_probs, np_probs: (B, C, *spatial).
        pseudo_label: (B, 1, *spatial) class indices; required for ``"pseudo_label_prob"``.

    Returns:
        weights, c_seg, c_np, each (B, 1, *spatial), detached.
    """
    if rule not in DUAL_CONFIDENCE_RULES:
        raise ValueError(f"rule must be one of {DUAL_CONFIDENCE_RULES}, got {rule!r}")
    if measure not in CONFIDENCE_MEASURES:
        raise ValueError(f"measure must be one of {CONFIDENCE_MEASURES}, got {measure!r}")
    seg_probs, np_probs = seg_probs.detach().float(), np_probs.detach().float()
    if measure == "pseudo_label_prob":
        if pseudo_label is None:
            raise ValueError('measure "pseudo_label_prob" needs the pseudo_label')
        c_seg = torch.gather(seg_probs, 1, pseudo_label.long())
        c_np = torch.gather(np_probs, 1, pseudo_label.long())
    elif measure == "max_prob":
        c_seg, c_np = seg_probs.max(1, keepdim=True).values, np_probs.max(1, keepdim=True).values
    else:
        c_seg, c_np = 1 - normalized_entropy(seg_probs), 1 - normalized_entropy(np_probs)
    if rule == "product":
        weights = c_seg * c_np
    elif rule == "min":
        weights = torch.minimum(c_seg, c_np)
    else:
        weights = torch.exp(-(c_seg - c_np).abs() / tau) * torch.minimum(c_seg, c_np)
    return weights, c_seg, c_np


def largest_component_per_class(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """Each foreground class of each sample reduced to its largest connected component (face connectivity); the
    other components become background (BCP's pseudo labels; for two classes its "largest connected component of
    the foreground"). 2D and 3D.

    Args:
        labels: hard labels (B, 1, *spatial), integer, values in [0, num_classes).
        num_classes: C, background 0 included.

    Returns:
        (the filtered labels, same shape, dtype and device; the share of foreground voxels kept, 1.0 without any).
    """
    from scipy import ndimage

    array = labels.detach().cpu().numpy()
    kept = array.copy()
    before = int((array > 0).sum())
    for b in range(array.shape[0]):
        for label in range(1, num_classes):
            components, count = ndimage.label(array[b, 0] == label)
            if count > 1:
                sizes = np.bincount(components.ravel())[1:]
                kept[b, 0][(components > 0) & (components != 1 + int(sizes.argmax()))] = 0
    share = float((kept > 0).sum() / before) if before else 1.0
    return torch.as_tensor(kept, device=labels.device), share
