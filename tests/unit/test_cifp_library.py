"""Library pieces of CIFP (issue #8): encoder/decoder split, channel dropout, ambiguous positions, class prototypes,
cross-image refinement (spatial and channel attention, feature and prototype keys), entropy-weighted fusion and the
weighted CE + Dice. Tiny tensors; gradient flow is asserted."""

from __future__ import annotations

import pytest
import torch

from helpers import plain_unet_architecture
from nnunet_semi.components.cross_image import CrossImageRefinement, ambiguous_positions
from nnunet_semi.components.feature_perturbation import channel_dropout, dropout_skips, encoder_and_decoder
from nnunet_semi.components.losses import weighted_ce_dice_loss
from nnunet_semi.components.mixing import cutmix_boxes, paste_from_partners
from nnunet_semi.components.networks import build_network
from nnunet_semi.components.prototypes import class_prototypes
from nnunet_semi.components.pseudo_labels import uncertainty_weighted_fusion
from nnunet_semi.components.uncertainty import normalized_entropy, prediction_uncertainty


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


def test_class_prototypes_average_features_per_class_under_pooled_labels():
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


def test_class_prototypes_find_a_structure_that_nearest_neighbour_downsampling_misses():
    features = torch.arange(1.0, 5.0).view(1, 1, 2, 2)
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[0, 0, 1:3, 1:3] = 1  # inside the first 4x4 cell, off the pixels nearest-neighbour sampling reads
    prototypes, present = class_prototypes(features, labels, num_classes=2)
    assert present.tolist() == [True, True] and prototypes[1, 0].item() == pytest.approx(1.0)
    labels[0, 0, 3:5, 3:5] = 1  # now also one pixel in each of the four cells
    prototypes, _ = class_prototypes(features, labels, num_classes=2)
    assert prototypes[1, 0].item() == pytest.approx((5 * 1 + 2 + 3 + 4) / 8)  # cell pixel counts 5, 1, 1, 1


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


def test_weighted_ce_dice_ignores_zero_weight_voxels():
    logits = torch.randn(1, 2, 4, requires_grad=True)
    labels = torch.tensor([[[0, 1, 1, 0]]])
    weight = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    for normalization in ("weights", "voxels"):
        logits.grad = None
        loss = weighted_ce_dice_loss(logits, labels, weight, normalization)
        loss.backward()
        assert torch.isfinite(loss) and (logits.grad[0, :, 2:] == 0).all() and logits.grad[0, :, :2].abs().sum() > 0
    perfect = torch.tensor([[[9.0, -9.0, -9.0, 9.0], [-9.0, 9.0, 9.0, -9.0]]])
    assert weighted_ce_dice_loss(perfect, labels, torch.ones(1, 1, 4)).item() < 1e-3
    with pytest.raises(ValueError, match="normalization must be one of"):
        weighted_ce_dice_loss(logits, labels, weight, "sum")


def test_a_uniformly_uncertain_batch_trains_weakly_only_under_voxel_normalization():
    logits = torch.randn(2, 3, 5, 5)
    labels = torch.randint(0, 3, (2, 1, 5, 5))
    weight = torch.rand(2, 1, 5, 5)
    by_weights = weighted_ce_dice_loss(logits, labels, weight, "weights")
    assert weighted_ce_dice_loss(logits, labels, 0.01 * weight, "weights").item() == pytest.approx(by_weights.item(),
                                                                                               rel=1e-4)
    by_voxels = weighted_ce_dice_loss(logits, labels, weight, "voxels")
    assert weighted_ce_dice_loss(logits, labels, 0.01 * weight, "voxels").item() == pytest.approx(
        0.01 * by_voxels.item(), rel=1e-4)


def test_cutmix_boxes_and_pasting_from_partners():
    torch.manual_seed(0)
    boxes = cutmix_boxes(64, (8, 10, 12), probability=0.5, fraction=0.5)
    with_box = boxes.flatten(1).any(1)
    assert 20 < with_box.sum() < 44  # about half of the samples
    assert (boxes[with_box].flatten(1).sum(1) == 4 * 5 * 6).all()  # half the side along every axis
    assert not cutmix_boxes(4, (8, 8), probability=0.0).any()
    values = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8)
    box = cutmix_boxes(4, (8, 8), probability=1.0)
    mixed = paste_from_partners(values, box, torch.tensor([1, 2, 3, 0]))
    assert (mixed[0][box[0]] == 1).all() and (mixed[0][~box[0]] == 0).all()
    with pytest.raises(ValueError, match="probability must be in"):
        cutmix_boxes(2, (8, 8), probability=1.5)


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
