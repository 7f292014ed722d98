"""Voxel masks from probability maps: ambiguity (top-2 margin, entropy or max probability), SGRS-Net's
synergy regions of a plain and a mixed view, entropy-percentile and cross-reliable masks of two predictions. Shapes
(B, C, *spatial), 2D or 3D."""

from __future__ import annotations

from typing import NamedTuple

import torch

from nnunet_semi.components.uncertainty import binary_entropy, normalized_entropy, percentile, top2_margin

AMBIGUITY_MEASURES = ("margin", "entropy", "max_prob")


def ambiguity_mask(probs: torch.Tensor, tau: float = 0.425, measure: str = "margin") -> torch.Tensor:
    """Voxels whose prediction is ambiguous, (B, 1, *spatial) bool.

    Args:
        probs: softmax probabilities (B, C, *spatial), C >= 2.
        tau: SGRS-Net's binary threshold: a two-class voxel is ambiguous when tau < p_background < 1 - tau.
        measure: ``"margin"``: the top-2 margin p_(1) - p_(2) < 1 - 2 tau. For two classes this is exactly the
            paper's rule (its "log10 entropy > 0.296" is H_10(0.425)), and for any C it flags a near-tie between
            two classes. ``"entropy"``: normalised entropy above that of (tau, 1 - tau), i.e. H(p)/ln C > H_2(tau):
            exact for two classes, but a 50/50 tie between two of C >= 3 classes (normalised entropy 0.63 for C = 3,
            0.5 for C = 4) is never flagged. ``"max_prob"``: max_c p_c < 1 - tau, exact for two classes; for more it
            also flags a clear but diffuse winner.
    """
    if not 0.0 < tau < 0.5:
        raise ValueError(f"tau must be in (0, 0.5), got {tau}")
    if measure == "margin":
        return top2_margin(probs) < 1 - 2 * tau
    if measure == "entropy":
        return normalized_entropy(probs) > binary_entropy(tau, base=2)
    if measure == "max_prob":
        return probs.float().max(1, keepdim=True).values < 1 - tau
    raise ValueError(f"measure must be one of {AMBIGUITY_MEASURES}, got {measure!r}")


class SynergyRegions(NamedTuple):
    """SGRS-Net's partition of voxels, each (B, 1, *spatial) bool; every voxel is in exactly one of the three
    (``agree_ambiguous`` is the part of ``ambiguous`` where the two predictions agree)."""

    agree_certain: torch.Tensor
    disagree_certain: torch.Tensor
    ambiguous: torch.Tensor
    agree_ambiguous: torch.Tensor


def synergy_regions(probs_plain: torch.Tensor, probs_mixed: torch.Tensor, tau: float = 0.425,
                    measure: str = "margin", ambiguity_from_both_views: bool = True) -> SynergyRegions:
    """Partition voxels by the student's predictions before and after mixing (SGRS-Net's synergy evaluation).

    Args:
        probs_plain: probabilities on the unlabeled image (B, C, *spatial).
        probs_mixed: probabilities on the mixed image, same shape.
        tau, measure: see ``ambiguity_mask``.
        ambiguity_from_both_views: ambiguous if either view is ambiguous (the paper and the current release).
            False: the plain view only (the release's first upload, fixed in its commit ebccd19).
    """
    if probs_plain.shape != probs_mixed.shape:
        raise ValueError(f"shape mismatch: {tuple(probs_plain.shape)} vs {tuple(probs_mixed.shape)}")
    agree = probs_plain.argmax(1, keepdim=True) == probs_mixed.argmax(1, keepdim=True)
    ambiguous = ambiguity_mask(probs_plain, tau, measure)
    if ambiguity_from_both_views:
        ambiguous = ambiguous | ambiguity_mask(probs_mixed, tau, measure)
    return SynergyRegions(agree & ~ambiguous, ~agree & ~ambiguous, ambiguous, agree & ambiguous)


def entropy_percentile_mask(probs_a: torch.Tensor, probs_b: torch.Tensor, percent: float = 20.0,
                            max_samples: int = 2**22, generator: torch.Generator | None = None) -> torch.Tensor:
    """Voxels that are confident for at least one of two networks: normalised entropy below that network's
    ``percent``-th percentile over the batch (the dual network's adaptive entropy masking, on probabilities).

    Args:
        probs_a, probs_b: softmax probabilities (B, C, *spatial) of the two networks.
        percent: percentile of each network's entropy distribution below which a voxel counts as reliable.

    Returns:
        (B, 1, *spatial) bool, True where the voxel is kept.
    """
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"shape mismatch: {tuple(probs_a.shape)} vs {tuple(probs_b.shape)}")
    entropy_a, entropy_b = normalized_entropy(probs_a.detach()), normalized_entropy(probs_b.detach())
    return (entropy_a < percentile(entropy_a, percent, max_samples, generator)) | \
        (entropy_b < percentile(entropy_b, percent, max_samples, generator))


def cross_reliable_mask(probs_a: torch.Tensor, probs_b: torch.Tensor, confidence: float = 0.6) -> torch.Tensor:
    """Voxels where the two networks' confident foreground decisions differ (the dual network's cross-reliable
    region): each network's decision is its argmax class where that is foreground with max p >= t, else "none";
    a voxel is selected where the two decisions differ and at least one is a class.

    For two classes this is the release's ``[argmax_a = 1 and max p_a >= t] XOR [argmax_b = 1 and max p_b >= t]``.
    With more classes it also selects confident disagreement between two foreground classes (network A confidently
    right ventricle, network B confidently left ventricle), which a XOR of "confidently foreground" misses.

    Args:
        probs_a, probs_b: softmax probabilities (B, C, *spatial).
        confidence: t.

    Returns:
        (B, 1, *spatial) bool.
    """
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"shape mismatch: {tuple(probs_a.shape)} vs {tuple(probs_b.shape)}")

    def confident_foreground_class(probs):  # 0: no confident foreground decision
        value, label = probs.detach().max(1, keepdim=True)
        return torch.where(value >= confidence, label, torch.zeros_like(label))

    decision_a, decision_b = confident_foreground_class(probs_a), confident_foreground_class(probs_b)
    return decision_a != decision_b
