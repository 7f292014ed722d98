"""components.cross_image: ambiguous positions and the cross-image refinement module."""

from __future__ import annotations

import pytest
import torch

from helpers import plain_unet_architecture
from nnunet_semi.components.cross_image import CrossImageRefinement, ambiguous_positions
from nnunet_semi.components.feature_perturbation import dropout_skips, encoder_and_decoder
from nnunet_semi.components.networks import build_network
from nnunet_semi.components.uncertainty import prediction_uncertainty


def test_ambiguous_positions_are_the_top_fraction_of_pooled_entropy_per_sample():
    entropy = torch.zeros(1, 1, 4, 4)
    entropy[0, 0, :2, :2] = 0.9  # top-left 2x2 cell
    entropy[0, 0, 2:, 2:] = 0.4  # bottom-right cell
    mask = ambiguous_positions(entropy, (2, 2), fraction=0.5)
    assert mask.shape == (1, 1, 2, 2) and mask[0, 0].tolist() == [[True, False], [False, True]]
    assert ambiguous_positions(entropy, (2, 2), 0.5, min_entropy=0.5)[0, 0].tolist() == [[True, False],
                                                                                         [False, False]]
    assert not ambiguous_positions(entropy, (2, 2), 0.0).any()


@pytest.mark.parametrize("attention,keys", [("spatial", "features"), ("spatial", "prototypes"),
                                            ("channel", "features")])
def test_cross_image_refinement_changes_only_ambiguous_positions_and_trains(attention, keys):
    torch.manual_seed(0)
    refine = CrossImageRefinement(8, attention, keys, num_heads=2 if attention == "spatial" else 1)
    unlabeled = torch.randn(2, 8, 3, 3, 3, requires_grad=True)
    labeled = torch.randn(1, 8, 3, 3, 3, requires_grad=True)
    labels = torch.randint(0, 3, (1, 1, 6, 6, 6))
    ambiguous = torch.zeros(2, 1, 3, 3, 3, dtype=torch.bool)
    ambiguous[0, 0, 1, 1, 1] = ambiguous[1, 0, 0] = True
    refined = refine(unlabeled, labeled, ambiguous, labels, num_classes=3)
    changed = (refined != unlabeled).any(1, keepdim=True)
    assert (changed == ambiguous).all()
    refined.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in refine.parameters())
    assert labeled.grad.abs().sum() > 0  # labeled features guide the refinement


def test_cross_image_refinement_rejects_unknown_choices():
    with pytest.raises(ValueError, match="attention must be"):
        CrossImageRefinement(8, "global")
    with pytest.raises(ValueError, match="channel attention needs labeled feature maps"):
        CrossImageRefinement(8, "channel", "prototypes")


def test_feature_norm_scaling_makes_gamma_the_relative_size_of_the_update():
    torch.manual_seed(0)
    unlabeled, labeled = torch.randn(2, 16, 3, 3, 3), torch.randn(2, 16, 3, 3, 3)
    ambiguous = torch.rand(2, 1, 3, 3, 3) > 0.5
    refine = CrossImageRefinement(16, gamma=0.7)
    refined = refine(unlabeled, labeled, ambiguous)
    ratio = (refined - unlabeled).norm(dim=1, keepdim=True) / unlabeled.norm(dim=1, keepdim=True)
    torch.testing.assert_close(ratio[ambiguous], torch.full_like(ratio[ambiguous], 0.7))
    assert refine.last_update_ratio == pytest.approx(0.7, abs=1e-5)
    raw = CrossImageRefinement(16, gamma=0.7, update_scale="none")
    raw.load_state_dict(refine.state_dict())
    raw(unlabeled, labeled, ambiguous)
    assert raw.last_update_ratio < 0.7
    with pytest.raises(ValueError, match="update_scale must be one of"):
        CrossImageRefinement(16, update_scale="unit")


def test_the_cross_image_stream_flips_a_real_share_of_argmaxes_at_initialisation():
    torch.manual_seed(0)
    network = build_network(plain_unet_architecture(3), 1, 2, deep_supervision=False).eval()
    encoder, decoder = encoder_and_decoder(network)
    images = torch.nn.functional.avg_pool3d(torch.randn(4, 1, 32, 32, 32), 5, 1, 2) * 5  # smooth, image-like
    with torch.no_grad():
        labeled_skips, skips = encoder(images[:2]), encoder(images[2:])
        plain = decoder(skips).argmax(1)
        ambiguous = ambiguous_positions(prediction_uncertainty(torch.softmax(decoder(skips), 1)),
                                        skips[-1].shape[2:], 0.5)

        def flipped(update_scale, gamma):
            torch.manual_seed(1)
            refine = CrossImageRefinement(16, gamma=gamma, update_scale=update_scale)
            refined = refine(skips[-1], labeled_skips[-1], ambiguous)
            return (decoder(skips[:-1] + [refined]).argmax(1) != plain).float().mean().item()

        default, before = flipped("feature_norm", 1.0), flipped("none", 0.1)
        dropout = (decoder(dropout_skips(skips, 0.5)).argmax(1) != plain).float().mean().item()
    # the stream is a perturbation of the size of channel dropout's order, not a rounding error
    assert default > 0.005 and default > 3 * before and dropout > default / 20
