"""Library pieces of the dual-network method (issue #7): entropy-percentile masks, KL-weighted pseudo supervision,
prototype bank and InfoNCE, decoder features. Tiny hand-made tensors; gradient flow is asserted for every term."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_semi.losses import kl_weighted_pseudo_label_loss, prototype_infonce
from nnunet_semi.masks import entropy_percentile_mask, percentile
from nnunet_semi.prototypes import DecoderFeatures, PrototypeBank


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
    # the hook is removed afterwards
    captured.features = None
    network(x)
    assert captured.features is None
