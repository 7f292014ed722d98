"""components.uncertainty: entropies, the top-2 margin, percentiles of large inputs."""

from __future__ import annotations

import pytest
import torch

from nnunet_semi.components.uncertainty import binary_entropy, percentile, prediction_uncertainty


def test_paper_threshold_is_the_log10_entropy_of_tau():
    # -(0.425 log10 0.425 + 0.575 log10 0.575) = 0.15793 + 0.13819
    assert binary_entropy(0.425, base=10) == pytest.approx(0.29612, abs=1e-5)
    assert binary_entropy(0.5, base=2) == pytest.approx(1.0)


def test_top2_margin_uncertainty_is_the_same_for_any_class_count_and_entropy_is_not():
    tie_of_two = torch.tensor([0.5, 0.5])[None, :, None]
    tie_of_two_in_four = torch.tensor([0.5, 0.5, 0.0, 0.0])[None, :, None]
    for probs in (tie_of_two, tie_of_two_in_four):
        assert prediction_uncertainty(probs).item() == pytest.approx(1.0)
    assert prediction_uncertainty(tie_of_two_in_four, "entropy").item() == pytest.approx(0.5)
    one_hot = torch.tensor([0.0, 1.0, 0.0])[None, :, None]
    assert prediction_uncertainty(one_hot).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="measure must be one of"):
        prediction_uncertainty(one_hot, "variance")


def test_percentile_matches_nearest_rank_and_estimates_large_inputs_from_a_subset():
    values = torch.arange(1.0, 11.0)  # 1..10: the 20th percentile (nearest rank 2) is 2
    assert percentile(values, 20).item() == 2.0 and percentile(values, 100).item() == 10.0
    big = torch.rand(2**24 + 10)  # beyond torch.quantile's historical 2^24-element limit
    estimate = percentile(big, 20, generator=torch.Generator().manual_seed(0)).item()
    assert estimate == pytest.approx(0.2, abs=0.005)
    with pytest.raises(ValueError, match="percent"):
        percentile(values, 120)
