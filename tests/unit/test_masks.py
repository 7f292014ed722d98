"""components.masks: ambiguity, SGRS's synergy regions, entropy-percentile and cross-reliable masks."""

from __future__ import annotations

import pytest
import torch

from nnunet_semi.components.masks import ambiguity_mask, cross_reliable_mask, entropy_percentile_mask, synergy_regions
from nnunet_semi.components.uncertainty import normalized_entropy


def _two_class(p_background: list[float], spatial=(1, 4)) -> torch.Tensor:
    """(1, 2, *spatial) probabilities from background probabilities."""
    p0 = torch.tensor(p_background).reshape(1, 1, *spatial)
    return torch.cat([p0, 1 - p0], 1)


def _probs(*columns):
    """(1, C, N) probabilities from per-voxel class distributions."""
    return torch.tensor(columns, dtype=torch.float32).T[None]


@pytest.mark.parametrize("measure", ["margin", "entropy", "max_prob"])
def test_binary_ambiguity_is_tau_below_background_below_one_minus_tau(measure):
    probs = _two_class([0.42, 0.43, 0.5, 0.57, 0.58, 0.9], spatial=(6,))
    expected = torch.tensor([False, True, True, True, False, False]).reshape(1, 1, 6)
    assert torch.equal(ambiguity_mask(probs, 0.425, measure), expected)


def test_multiclass_ambiguity_measures():
    probs = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.98, 0.01, 0.01], [0.5, 0.3, 0.2]]).T.reshape(1, 3, 3, 1)
    # normalised entropies: 1.0; 0.1119/ln3 = 0.102; 1.0297/ln3 = 0.937 (below H_2(0.425) = 0.9837)
    torch.testing.assert_close(normalized_entropy(probs).flatten(), torch.tensor([1.0, 0.1019, 0.9373]), atol=1e-3,
                               rtol=0)
    assert ambiguity_mask(probs, measure="entropy").flatten().tolist() == [True, False, False]
    # max probability below 1 - tau = 0.575: the third voxel (0.5) is ambiguous here
    assert ambiguity_mask(probs, measure="max_prob").flatten().tolist() == [True, False, True]
    # top-2 margin below 1 - 2 tau = 0.15: the uniform voxel only (0.5 vs 0.3 is a clear enough winner)
    assert ambiguity_mask(probs, measure="margin").flatten().tolist() == [True, False, False]
    assert ambiguity_mask(probs).flatten().tolist() == [True, False, False]  # the default
    with pytest.raises(ValueError, match="measure"):
        ambiguity_mask(probs, measure="variance")
    with pytest.raises(ValueError, match="tau"):
        ambiguity_mask(probs, tau=0.6)


def test_margin_is_the_papers_rule_for_two_classes_and_flags_two_class_ties_for_four():
    p_background = torch.rand(1, 1, 1000, generator=torch.Generator().manual_seed(0))
    two_class = torch.cat([p_background, 1 - p_background], 1)
    paper = (0.425 < p_background) & (p_background < 0.575)
    assert torch.equal(ambiguity_mask(two_class, 0.425, "margin"), paper)
    # four classes, a 50/50 tie between two of them: ambiguous by the margin; normalised entropy 0.5 misses it
    tie = torch.tensor([0.5, 0.5, 0.0, 0.0]).reshape(1, 4, 1)
    assert ambiguity_mask(tie, measure="margin").item() and not ambiguity_mask(tie, measure="entropy").item()
    clear = torch.tensor([0.7, 0.1, 0.1, 0.1]).reshape(1, 4, 1)
    assert not ambiguity_mask(clear, measure="margin").item()


def test_synergy_regions_by_hand():
    plain = _two_class([0.9, 0.9, 0.5, 0.1])  # argmax 0, 0, 0 (tie -> first), 1; ambiguous: voxel 2
    mixed = _two_class([0.8, 0.2, 0.9, 0.45])  # argmax 0, 1, 0, 1;                  ambiguous: voxel 3
    regions = synergy_regions(plain, mixed)
    assert regions.agree_certain.flatten().tolist() == [True, False, False, False]
    assert regions.disagree_certain.flatten().tolist() == [False, True, False, False]
    assert regions.ambiguous.flatten().tolist() == [False, False, True, True]
    assert regions.agree_ambiguous.flatten().tolist() == [False, False, True, True]
    released = synergy_regions(plain, mixed, ambiguity_from_both_views=False)  # plain view only
    assert released.agree_certain.flatten().tolist() == [True, False, False, True]


def test_synergy_regions_are_per_sample_and_3d():
    plain = torch.cat([_two_class([0.9] * 8, (2, 2, 2)), _two_class([0.1] * 8, (2, 2, 2))])
    mixed = torch.cat([_two_class([0.9] * 8, (2, 2, 2)), _two_class([0.9] * 8, (2, 2, 2))])
    regions = synergy_regions(plain, mixed)
    assert regions.agree_certain.shape == (2, 1, 2, 2, 2)
    # sample 0 agrees everywhere, sample 1 disagrees everywhere: no mixing of masks across the batch
    assert regions.agree_certain[0].all() and not regions.agree_certain[1].any()
    assert regions.disagree_certain[1].all() and not regions.disagree_certain[0].any()


def test_entropy_percentile_mask_keeps_voxels_confident_for_either_network():
    # 5 voxels, 2 classes. The 40th percentile of 5 values is the 2nd lowest (nearest rank), and a voxel is kept when
    # its entropy is strictly below it: net a keeps only voxel 0 (p = 0.99), net b only voxel 4.
    p_a = torch.tensor([0.99, 0.6, 0.55, 0.5, 0.7])
    p_b = torch.tensor([0.5, 0.55, 0.6, 0.7, 0.99])
    probs_a = torch.stack([p_a, 1 - p_a]).reshape(1, 2, 5)
    probs_b = torch.stack([p_b, 1 - p_b]).reshape(1, 2, 5)
    keep = entropy_percentile_mask(probs_a, probs_b, percent=40)
    assert keep.shape == (1, 1, 5)
    assert keep.flatten().tolist() == [True, False, False, False, True]


def test_cross_reliable_mask_marks_voxels_where_exactly_one_network_is_confidently_foreground():
    a = _probs([0.3, 0.7], [0.3, 0.7], [0.45, 0.55], [0.9, 0.1])
    b = _probs([0.3, 0.7], [0.8, 0.2], [0.2, 0.8], [0.9, 0.1])
    # both confident fg | only a | a is fg but below 0.6, b confident | both background
    assert cross_reliable_mask(a, b, 0.6)[0, 0].tolist() == [False, True, True, False]


def test_cross_reliable_mask_selects_confident_disagreement_between_two_foreground_classes():
    a = _probs([0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1])
    b = _probs([0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.9, 0.05, 0.05])
    # a confidently class 1, b confidently class 2 | both confidently class 1 | only a confident | both background
    assert cross_reliable_mask(a, b, 0.6)[0, 0].tolist() == [True, False, True, False]
