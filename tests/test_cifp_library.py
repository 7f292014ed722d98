"""Library pieces of CIFP (issue #8): encoder/decoder split, channel dropout, ambiguous positions, class prototypes,
cross-image refinement (spatial and channel attention, feature and prototype keys), entropy-weighted fusion and the
weighted CE + Dice. Tiny tensors; gradient flow is asserted."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_semi.feature_perturbation import (
    CrossImageRefinement,
    ambiguous_positions,
    channel_dropout,
    class_prototypes,
    dropout_skips,
    encoder_and_decoder,
    entropy_weighted_fusion,
)
from nnunet_semi.losses import weighted_ce_dice_loss
from nnunet_semi.networks import build_network

from conftest import plain_unet_architecture


@pytest.mark.parametrize("dim", [2, 3])
def test_encoder_then_decoder_is_the_network_and_dropped_skips_change_only_the_decoded_output(dim):
    network = build_network(plain_unet_architecture(dim), 1, 3, deep_supervision=False).eval()
    encoder, decoder = encoder_and_decoder(network)
    x = torch.randn(2, 1, *([8] * dim))
    skips = encoder(x)
    assert [s.shape[1] for s in skips] == [4, 8, 16]
    torch.testing.assert_close(decoder(skips), network(x))
    assert not torch.allclose(decoder(dropout_skips(skips, 0.5)), network(x))
    with pytest.raises(TypeError, match="encoder returning skips"):
        encoder_and_decoder(torch.nn.Conv3d(1, 1, 1))


def test_channel_dropout_drops_whole_channels_and_keeps_the_expectation():
    torch.manual_seed(0)
    features = torch.ones(64, 32, 3, 3, 3)
    dropped = channel_dropout(features, 0.5)
    per_channel = dropped.flatten(2)
    assert ((per_channel == 0).all(2) | (per_channel == 2).all(2)).all()  # a channel is dropped entirely or x2
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="p must be"):
        channel_dropout(features, 1.0)


def test_ambiguous_positions_are_the_top_fraction_of_pooled_entropy_per_sample():
    entropy = torch.zeros(1, 1, 4, 4)
    entropy[0, 0, :2, :2] = 0.9  # top-left 2x2 cell
    entropy[0, 0, 2:, 2:] = 0.4  # bottom-right cell
    mask = ambiguous_positions(entropy, (2, 2), fraction=0.5)
    assert mask.shape == (1, 1, 2, 2) and mask[0, 0].tolist() == [[True, False], [False, True]]
    assert ambiguous_positions(entropy, (2, 2), 0.5, min_entropy=0.5)[0, 0].tolist() == [[True, False],
                                                                                         [False, False]]
    assert not ambiguous_positions(entropy, (2, 2), 0.0).any()


def test_class_prototypes_average_features_per_downsampled_label():
    features = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])  # (1, 1, 2, 2)
    labels = torch.tensor([[[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]]])  # (1, 1, 4, 4)
    prototypes, present = class_prototypes(features, labels, num_classes=4)
    assert prototypes[:3, 0].tolist() == [1.0, 3.0, 6.0] and present.tolist() == [True, True, True, False]


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


def test_entropy_weighted_fusion_follows_the_certain_source():
    certain = torch.tensor([0.98, 0.02])[None, :, None]  # (1, 2, 1)
    unsure = torch.tensor([0.45, 0.55])[None, :, None]
    fused = entropy_weighted_fusion([certain, unsure], temperature=0.1)
    weights = fused.source_weights[:, 0, 0, 0]
    assert weights.sum().item() == pytest.approx(1.0) and weights[0] > 0.99
    assert fused.labels.item() == 0
    entropy = -(fused.probs * fused.probs.log()).sum() / math.log(2)
    assert fused.voxel_weight.item() == pytest.approx(1 - entropy.item(), abs=1e-6)
    # equal certainty: the plain average
    even = entropy_weighted_fusion([certain, certain.flip(1)], temperature=1.0)
    torch.testing.assert_close(even.probs, torch.full_like(certain, 0.5))
    assert even.voxel_weight.item() == pytest.approx(0.0, abs=1e-6)


def test_weighted_ce_dice_ignores_zero_weight_voxels():
    logits = torch.randn(1, 2, 4, requires_grad=True)
    labels = torch.tensor([[[0, 1, 1, 0]]])
    weight = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    loss = weighted_ce_dice_loss(logits, labels, weight)
    loss.backward()
    assert torch.isfinite(loss) and (logits.grad[0, :, 2:] == 0).all() and logits.grad[0, :, :2].abs().sum() > 0
    perfect = torch.tensor([[[9.0, -9.0, -9.0, 9.0], [-9.0, 9.0, 9.0, -9.0]]])
    assert weighted_ce_dice_loss(perfect, labels, torch.ones(1, 1, 4)).item() < 1e-3
