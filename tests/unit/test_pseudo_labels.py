"""components.pseudo_labels: union of two predictions, uncertainty-weighted fusion, dual-confidence weights."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_semi.components.pseudo_labels import (
    dual_confidence_weights,
    uncertainty_weighted_fusion,
    union_pseudo_label,
)
from nnunet_semi.components.uncertainty import normalized_entropy


def _probs(*columns):
    """(1, C, N) probabilities from per-voxel class distributions."""
    return torch.tensor(columns, dtype=torch.float32).T[None]


def test_uncertainty_weighted_fusion_follows_the_certain_source():
    certain = torch.tensor([0.98, 0.02])[None, :, None]  # (1, 2, 1)
    unsure = torch.tensor([0.45, 0.55])[None, :, None]
    fused = uncertainty_weighted_fusion([certain, unsure], temperature=0.1)
    weights = fused.source_weights[:, 0, 0, 0]
    assert weights.sum().item() == pytest.approx(1.0) and weights[0] > 0.99
    assert fused.labels.item() == 0
    # voxel weight: the fused prediction's top-2 margin
    assert fused.voxel_weight.item() == pytest.approx((fused.probs[0, 0] - fused.probs[0, 1]).item(), abs=1e-6)
    entropic = uncertainty_weighted_fusion([certain, unsure], temperature=0.1, measure="entropy")
    entropy = normalized_entropy(entropic.probs)
    assert entropic.voxel_weight.item() == pytest.approx(1 - entropy.item(), abs=1e-6)
    # equal certainty: the plain average
    even = uncertainty_weighted_fusion([certain, certain.flip(1)], temperature=1.0)
    torch.testing.assert_close(even.probs, torch.full_like(certain, 0.5))
    assert even.voxel_weight.item() == pytest.approx(0.0, abs=1e-6)
    # a two-class tie among four classes weighs 0, as for two classes
    tie = torch.tensor([0.5, 0.5, 0.0, 0.0])[None, :, None]
    assert uncertainty_weighted_fusion([tie]).voxel_weight.item() == pytest.approx(0.0, abs=1e-6)


def test_union_pseudo_label_is_the_foreground_union_and_resolves_foreground_conflicts_by_confidence():
    # binary: argmax_a OR argmax_b
    a = _probs([0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.3, 0.7])
    b = _probs([0.8, 0.2], [0.9, 0.1], [0.4, 0.6], [0.1, 0.9])
    assert union_pseudo_label(a, b)[0, 0].tolist() == [0, 1, 1, 1]
    # three classes: agreement, background vs foreground, and two foreground classes (the more confident wins)
    a = _probs([0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.1, 0.6, 0.3], [0.1, 0.9, 0.0])
    b = _probs([0.1, 0.7, 0.2], [0.1, 0.1, 0.8], [0.1, 0.2, 0.7], [0.1, 0.2, 0.7])
    assert union_pseudo_label(a, b)[0, 0].tolist() == [1, 2, 2, 1]


def test_dual_confidence_rules_down_weight_one_sided_confidence():
    # voxel 0: both confident; voxel 1: segmentation confident, NP not; voxel 2: both unsure (pseudo label 0)
    seg = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45]]).T[None]
    np_ = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.5, 0.5]]).T[None]
    pseudo = torch.zeros(1, 1, 3, dtype=torch.long)
    product, c_seg, _ = dual_confidence_weights(seg, np_, "product", pseudo_label=pseudo)
    assert c_seg[0, 0].tolist() == pytest.approx([0.95, 0.95, 0.55])
    assert product[0, 0].tolist() == pytest.approx([0.855, 0.5225, 0.275])
    minimum, _, _ = dual_confidence_weights(seg, np_, "min", pseudo_label=pseudo)
    assert minimum[0, 0].tolist() == pytest.approx([0.9, 0.55, 0.5])
    agreement, _, _ = dual_confidence_weights(seg, np_, "agreement", tau=0.2, pseudo_label=pseudo)
    assert agreement[0, 0].tolist() == pytest.approx([math.exp(-0.25) * 0.9, math.exp(-2.0) * 0.55,
                                                     math.exp(-0.25) * 0.5])
    assert agreement[0, 0, 1] < agreement[0, 0, 2]  # one-sided confidence ranks below shared doubt
    with pytest.raises(ValueError, match="rule must be"):
        dual_confidence_weights(seg, np_, "mean", pseudo_label=pseudo)
    with pytest.raises(ValueError, match="needs the pseudo_label"):
        dual_confidence_weights(seg, np_)


@pytest.mark.parametrize("rule", ["product", "min", "agreement"])
def test_confidently_disagreeing_heads_get_a_small_weight_and_agreeing_ones_a_large_one(rule):
    # the segmentation head says (0.05, 0.95), the NP head (0.95, 0.05); the pseudo label is the NP head's class 0
    seg = torch.tensor([[0.05, 0.95], [0.95, 0.05]]).T[None]
    np_ = torch.tensor([[0.95, 0.05], [0.95, 0.05]]).T[None]
    pseudo = torch.zeros(1, 1, 2, dtype=torch.long)
    weights, c_seg, c_np = dual_confidence_weights(seg, np_, rule, pseudo_label=pseudo)
    assert c_seg[0, 0].tolist() == pytest.approx([0.05, 0.95]) and c_np[0, 0].tolist() == pytest.approx([0.95, 0.95])
    assert weights[0, 0, 0] <= 0.05 and weights[0, 0, 1] >= 0.9
    # the max-probability measure cannot tell the two voxels apart
    blind, _, _ = dual_confidence_weights(seg, np_, rule, measure="max_prob")
    assert blind[0, 0, 0].item() == pytest.approx(blind[0, 0, 1].item())
    # the entropy measure is applied to both heads: two agreeing heads are on one scale
    entropy, c_seg_entropy, c_np_entropy = dual_confidence_weights(np_, np_, rule, measure="entropy")
    torch.testing.assert_close(c_seg_entropy, c_np_entropy)


def test_largest_component_per_class_keeps_each_class_biggest_blob_in_2d_and_3d():
    from nnunet_semi.components.pseudo_labels import largest_component_per_class

    labels = torch.zeros(2, 1, 10, 10, dtype=torch.long)
    labels[0, 0, 0:3, 0:3] = 1  # class 1: 9 voxels, kept
    labels[0, 0, 6:8, 6:8] = 1  # class 1: 4 voxels, dropped
    labels[0, 0, 0:2, 6:9] = 2  # class 2: 6 voxels, kept
    labels[0, 0, 9, 0] = 2  # class 2: 1 voxel, dropped
    labels[1, 0, 4:6, 4:6] = 1  # sample 2: one blob, kept whole
    kept, share = largest_component_per_class(labels, 3)
    expected = labels.clone()
    expected[0, 0, 6:8, 6:8] = 0
    expected[0, 0, 9, 0] = 0
    assert torch.equal(kept, expected) and share == pytest.approx((9 + 6 + 4) / (9 + 4 + 6 + 1 + 4))
    volume = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    volume[0, 0, :2, :2, :2], volume[0, 0, 4:, 4:, 4:] = 1, 1
    volume[0, 0, 0, 0, 0] = 1
    kept, _ = largest_component_per_class(volume, 2)
    assert int(kept.sum()) == 8  # the two 8-voxel cubes tie: one of them kept, not both
    assert largest_component_per_class(torch.zeros(1, 1, 4, 4, dtype=torch.long), 2)[1] == 1.0
