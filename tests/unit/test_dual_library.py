"""Library pieces of the dual-network method (issue #7): entropy-percentile masks, KL-weighted pseudo supervision,
prototype bank and InfoNCE, decoder features. Tiny hand-made tensors; gradient flow is asserted for every term."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import plain_unet_architecture
from nnunet_semi.components.ensemble import DualNetworkEnsemble, is_ensemble_state, member_state
from nnunet_semi.components.feature_capture import DecoderFeatures
from nnunet_semi.components.losses import (
    cosine_consistency_loss,
    kl_weighted_pseudo_label_loss,
    masked_probability_mse,
    masked_pseudo_label_cross_entropy,
    prototype_infonce,
)
from nnunet_semi.components.masks import cross_reliable_mask, entropy_percentile_mask
from nnunet_semi.components.networks import RESIDUAL_ENCODER_UNET, build_network, residual_encoder_sibling
from nnunet_semi.components.prototypes import PrototypeBank, gather_voxels
from nnunet_semi.components.pseudo_labels import union_pseudo_label
from nnunet_semi.components.uncertainty import percentile


def test_percentile_matches_nearest_rank_and_estimates_large_inputs_from_a_subset():
    values = torch.arange(1.0, 11.0)  # 1..10: the 20th percentile (nearest rank 2) is 2
    assert percentile(values, 20).item() == 2.0 and percentile(values, 100).item() == 10.0
    big = torch.rand(2**24 + 10)  # beyond torch.quantile's historical 2^24-element limit
    estimate = percentile(big, 20, generator=torch.Generator().manual_seed(0)).item()
    assert estimate == pytest.approx(0.2, abs=0.005)
    with pytest.raises(ValueError, match="percent"):
        percentile(values, 120)


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


def test_kl_weighted_loss_values_and_gradient():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 2, 1).requires_grad_(True)
    same = torch.softmax(logits.detach(), 1)
    loss, kl = kl_weighted_pseudo_label_loss(logits, same)
    # identical predictions: KL 0, weight 1, loss = CE against own argmax
    ce = -torch.log_softmax(logits.detach(), 1).max(1).values.mean()
    assert kl.item() == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(ce.item(), rel=1e-5)
    other = torch.tensor([[0.1, 0.9], [0.1, 0.9]]).T.reshape(1, 2, 2, 1)
    loss, kl = kl_weighted_pseudo_label_loss(logits, other)
    assert kl.item() > 0
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_prototype_bank_ema_and_state_dict():
    bank = PrototypeBank(num_classes=2, feature_dim=3, momentum=0.5)
    features = torch.tensor([[1.0, 0, 0], [3.0, 0, 0], [0, 2.0, 0]])
    bank.update(features, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(bank.prototypes, torch.tensor([[2.0, 0, 0], [0, 2.0, 0]]))  # first sight: the mean
    bank.update(torch.tensor([[4.0, 0, 0]]), torch.tensor([0]))
    torch.testing.assert_close(bank.prototypes[0], torch.tensor([3.0, 0, 0]))  # 0.5 * 2 + 0.5 * 4
    torch.testing.assert_close(bank.prototypes[1], torch.tensor([0, 2.0, 0]))  # class 1 absent: unchanged
    assert set(bank.state_dict()) == {"prototypes", "initialized"}
    restored = PrototypeBank(2, 3)
    restored.load_state_dict(bank.state_dict())
    torch.testing.assert_close(restored.prototypes, bank.prototypes)


def test_prototype_infonce_pulls_features_to_their_own_prototype():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[0.6, 0.8], [0.8, 0.6]], requires_grad=True)
    labels = torch.tensor([0, 1])  # both start closer to the wrong prototype
    optimizer = torch.optim.SGD([features], lr=0.5)
    before = prototype_infonce(features, labels, prototypes, temperature=0.5)
    before.backward()
    optimizer.step()
    after = prototype_infonce(features, labels, prototypes, temperature=0.5)
    assert after < before  # the correct sign: minimising moves each feature toward its class prototype
    cos = torch.nn.functional.cosine_similarity(features.detach(), prototypes[labels], dim=1)
    assert (cos > torch.tensor([0.6, 0.6])).all()
    assert prototype_infonce(torch.zeros(0, 2, requires_grad=True), torch.zeros(0), prototypes).item() == 0.0
    # uniform similarities: loss ln C
    flat = torch.tensor([[1.0, 1.0]])
    assert prototype_infonce(flat, torch.tensor([0]), prototypes).item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("dim", [2, 3])
def test_decoder_features_are_the_full_resolution_input_of_the_last_head(dim):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    conv = torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d
    norm = torch.nn.InstanceNorm2d if dim == 2 else torch.nn.InstanceNorm3d
    network = PlainConvUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), True, norm,
                            {"affine": True}, None, None, torch.nn.LeakyReLU, None, deep_supervision=True)
    x = torch.randn(2, 1, *([16] * dim))
    with DecoderFeatures(network) as captured:
        outputs = network(x)
    assert captured.features.shape == (2, 4, *([16] * dim))
    # the last segmentation layer applied to the captured features is the full-resolution output
    torch.testing.assert_close(network.decoder.seg_layers[-1](captured.features), outputs[0])
    # take() hands the features over and keeps no reference
    assert captured.take().shape == (2, 4, *([16] * dim))
    with pytest.raises(RuntimeError, match=r"nothing was recorded from decoder.stages\[-1\]"):
        captured.features
    # outside 'with' nothing is recorded, and asking for features then is a clear error, not None
    with captured:
        pass
    network(x)
    with pytest.raises(RuntimeError, match=r"nothing was recorded from decoder.stages\[-1\]"):
        captured.features
    # an EMA copy of the network carries an inert hook
    copy.deepcopy(network)(x)
    with pytest.raises(RuntimeError):
        captured.features


def test_decoder_features_are_recorded_by_a_compiled_network_after_another_was_compiled_without_the_hook():
    """torch.compile reuses a graph traced for another instance of the class (nnU-Net's stock run before ours in one
    process) unless it guards on hooks; then the hook would silently never run."""
    import torch._dynamo
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    def unet():
        return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), True,
                             torch.nn.InstanceNorm3d, {"affine": True}, None, None, torch.nn.LeakyReLU, None,
                             deep_supervision=True)

    torch._dynamo.reset()
    x = torch.randn(1, 1, 16, 16, 16)
    torch.compile(unet(), backend="aot_eager")(x)  # a graph without the hook
    network = unet()
    captured = DecoderFeatures(network)
    compiled = torch.compile(network, backend="aot_eager")
    for _ in range(2):
        with captured:
            outputs = compiled(x)
        torch.testing.assert_close(network.decoder.seg_layers[-1](captured.features), outputs[0])


def _probs(*columns):
    """(1, C, N) probabilities from per-voxel class distributions."""
    return torch.tensor(columns, dtype=torch.float32).T[None]


def test_union_pseudo_label_is_the_foreground_union_and_resolves_foreground_conflicts_by_confidence():
    # binary: argmax_a OR argmax_b
    a = _probs([0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.3, 0.7])
    b = _probs([0.8, 0.2], [0.9, 0.1], [0.4, 0.6], [0.1, 0.9])
    assert union_pseudo_label(a, b)[0, 0].tolist() == [0, 1, 1, 1]
    # three classes: agreement, background vs foreground, and two foreground classes (the more confident wins)
    a = _probs([0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.1, 0.6, 0.3], [0.1, 0.9, 0.0])
    b = _probs([0.1, 0.7, 0.2], [0.1, 0.1, 0.8], [0.1, 0.2, 0.7], [0.1, 0.2, 0.7])
    assert union_pseudo_label(a, b)[0, 0].tolist() == [1, 2, 2, 1]


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


def test_masked_pseudo_label_cross_entropy_is_the_kept_voxel_mean_and_the_release_scale_is_n_over_n_kept():
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 5))
    kept = torch.rand(2, 1, 4, 5) > 0.6
    ignored = torch.where(kept, labels, torch.full_like(labels, 3))[:, 0]
    # PyTorch's CE with ignore_index already averages over the kept voxels
    kept_mean = torch.nn.functional.cross_entropy(logits, ignored, ignore_index=3)
    loss = masked_pseudo_label_cross_entropy(logits, labels, kept)
    torch.testing.assert_close(loss, kept_mean)
    # the release multiplies that by w = N / N_kept once more
    released = masked_pseudo_label_cross_entropy(logits, labels, kept, rescale_by_kept_fraction=True)
    torch.testing.assert_close(released, kept_mean * kept.numel() / kept.sum())
    assert released.item() > 2 * loss.item()  # about 40 % kept: 2.5 times
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert (logits.grad.movedim(1, -1)[~kept[:, 0]] == 0).all()  # ignored voxels get no gradient
    none_kept = masked_pseudo_label_cross_entropy(logits, labels, torch.zeros_like(kept))
    assert none_kept.item() == 0.0 and none_kept.requires_grad


def test_masked_probability_mse_is_the_foreground_error_by_hand_and_skips_ignore_voxels():
    probs = _probs([0.6, 0.4], [0.2, 0.8], [0.5, 0.5]).requires_grad_(True)
    labels = torch.tensor([[[1, 1, 0]]])
    mask = torch.tensor([[[True, True, True]]])
    # the release's (p_fg - y)^2: 0.36, 0.04, 0.25 (background not counted a second time)
    assert masked_probability_mse(probs, labels, mask).item() == pytest.approx((0.36 + 0.04 + 0.25) / 3)
    ignore = torch.tensor([[[False, False, True]]])
    loss = masked_probability_mse(probs, labels, mask, ignore)
    assert loss.item() == pytest.approx((0.36 + 0.04) / 2)
    loss.backward()
    assert (probs.grad[0, :, 2] == 0).all() and probs.grad[0, 1, :2].abs().sum() > 0
    # three classes: summed over the two foreground classes
    three = _probs([0.2, 0.5, 0.3])
    assert masked_probability_mse(three, torch.tensor([[[2]]]), mask[..., :1]).item() == pytest.approx(0.25 + 0.49)


def test_cosine_consistency_is_one_minus_the_cosine_over_classes_and_trains_both_networks():
    a = _probs([1.0, 0.0], [0.5, 0.5]).requires_grad_(True)
    b = _probs([0.0, 1.0], [0.5, 0.5]).requires_grad_(True)
    # orthogonal: 1; parallel: 0
    assert cosine_consistency_loss(a, b).item() == pytest.approx(0.5)
    c = _probs([0.8, 0.2], [0.3, 0.7]).requires_grad_(True)
    loss = cosine_consistency_loss(a, c)
    loss.backward()
    assert a.grad.abs().sum() > 0 and c.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shape mismatch"):
        cosine_consistency_loss(a, _probs([1.0, 0.0]))


def test_gather_voxels_takes_masked_voxels_with_gradient_and_bounds_each_class():
    features = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.randint(0, 2, (2, 1, 3, 3))
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1, 2] = mask[1, 0, 0, 0] = True
    gathered, gathered_labels = gather_voxels(features, labels, mask)
    torch.testing.assert_close(gathered, torch.stack([features[0, :, 1, 2], features[1, :, 0, 0]]))
    assert gathered_labels.tolist() == [labels[0, 0, 1, 2].item(), labels[1, 0, 0, 0].item()]
    gathered.sum().backward()
    assert features.grad[0, :, 1, 2].eq(1).all() and features.grad.sum() == 8
    # 90 background and 10 foreground candidates: a per-class bound keeps both classes balanced
    features = torch.randn(1, 4, 10, 10)
    labels = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    labels[0, 0, 0] = 1
    subset, subset_labels = gather_voxels(features, labels, torch.ones_like(labels, dtype=torch.bool),
                                          max_per_class=5)
    assert subset.shape == (10, 4) and sorted(subset_labels.tolist()) == [0] * 5 + [1] * 5
    few, few_labels = gather_voxels(features, labels, labels == 1, max_per_class=50)  # fewer than the bound: all
    assert few_labels.tolist() == [1] * 10


def test_prototype_bank_contrast_skips_classes_without_a_prototype_and_trains_features():
    bank = PrototypeBank(num_classes=3, feature_dim=2)
    features = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.5, 0.5]], requires_grad=True)
    assert bank.contrast_loss(features, torch.tensor([0, 1, 2])).item() == 0.0  # nothing to contrast yet
    bank.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    loss = bank.contrast_loss(features, torch.tensor([0, 1, 2]), temperature=0.5)
    # class 2 has no prototype: only the first two features count
    expected = prototype_infonce(features[:2], torch.tensor([0, 1]), bank.prototypes[:2], temperature=0.5)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert features.grad[:2].abs().sum() > 0 and (features.grad[2] == 0).all()
    assert bank.similarity_to_own_class(torch.tensor([[2.0, 0.0]]), torch.tensor([0])) == pytest.approx(1.0)
    assert math.isnan(bank.similarity_to_own_class(torch.tensor([[2.0, 0.0]]), torch.tensor([2])))


def test_residual_encoder_sibling_keeps_the_plans_geometry_with_residual_blocks():
    plain = plain_unet_architecture()
    sibling = residual_encoder_sibling(plain)
    assert sibling["network_class_name"] == RESIDUAL_ENCODER_UNET
    assert sibling["arch_kwargs"]["n_blocks_per_stage"] == [1, 3, 4]
    assert "n_conv_per_stage" not in sibling["arch_kwargs"] and "n_conv_per_stage" in plain["arch_kwargs"]
    assert {k: v for k, v in sibling["arch_kwargs"].items() if k != "n_blocks_per_stage"} == \
        {k: v for k, v in plain["arch_kwargs"].items() if k != "n_conv_per_stage"}
    assert residual_encoder_sibling(plain, None)["arch_kwargs"]["n_blocks_per_stage"] == [2, 2, 2]
    assert residual_encoder_sibling(sibling) == sibling
    network = build_network(sibling, 1, 3, deep_supervision=False)
    assert type(network).__name__ == "ResidualEncoderUNet"
    assert network(torch.randn(1, 1, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="PlainConvUNet plans only"):
        residual_encoder_sibling(plain | {"network_class_name": "my.Net"})


@pytest.mark.parametrize("dim", [2, 3])
def test_dual_network_ensemble_deploys_either_network_or_the_softmax_average(dim):
    first = build_network(plain_unet_architecture(dim), 1, 3, deep_supervision=False).eval()
    second = build_network(residual_encoder_sibling(plain_unet_architecture(dim)), 1, 3, deep_supervision=False).eval()
    x = torch.randn(2, 1, *([8] * dim))
    ensemble = DualNetworkEnsemble(first, second, "ensemble").eval()
    with torch.no_grad():
        averaged = (torch.softmax(first(x), 1) + torch.softmax(second(x), 1)) / 2
        torch.testing.assert_close(torch.softmax(ensemble(x), 1), averaged)
        state = ensemble.state_dict()
        assert is_ensemble_state(state) and state["deployed_member"].item() == 2

        # what nnUNetv2_predict does: build a fresh wrapper, load network_weights
        fresh = DualNetworkEnsemble(build_network(plain_unet_architecture(dim), 1, 3, False),
                                    build_network(residual_encoder_sibling(plain_unet_architecture(dim)), 1, 3, False)).eval()
        fresh.load_state_dict(DualNetworkEnsemble(first, second, "second").state_dict())
        assert fresh.deployed == "second"
        torch.testing.assert_close(fresh(x), second(x))
        # single-network weights (checkpoints written during training) deploy the first network
        fresh.load_state_dict(first.state_dict())
        assert fresh.deployed == "first"
        torch.testing.assert_close(fresh(x), first(x))
        torch.testing.assert_close(member_state(state, "second")["decoder.seg_layers.0.weight"],
                                   second.state_dict()["decoder.seg_layers.0.weight"])


def test_features_per_stage_expands_a_single_int():
    from types import SimpleNamespace

    from nnunet_semi.components.networks import features_per_stage

    assert features_per_stage(SimpleNamespace(network_arch_init_kwargs={"n_stages": 3, "features_per_stage": 8})) \
        == [8, 8, 8]
    assert features_per_stage(SimpleNamespace(network_arch_init_kwargs=plain_unet_architecture()["arch_kwargs"])) \
        == [4, 8, 16]
