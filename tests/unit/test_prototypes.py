"""components.prototypes: class prototypes, the EMA prototype bank, per-class voxel gathering."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_semi.components.losses import (
    prototype_infonce,
)
from nnunet_semi.components.prototypes import PrototypeBank, class_prototypes, gather_voxels


def test_class_prototypes_average_features_per_class_under_pooled_labels():
    features = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])  # (1, 1, 2, 2)
    labels = torch.tensor([[[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]]])  # (1, 1, 4, 4)
    prototypes, present = class_prototypes(features, labels, num_classes=4)
    assert prototypes[:3, 0].tolist() == [1.0, 3.0, 6.0] and present.tolist() == [True, True, True, False]


def test_class_prototypes_find_a_structure_that_nearest_neighbour_downsampling_misses():
    features = torch.arange(1.0, 5.0).view(1, 1, 2, 2)
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[0, 0, 1:3, 1:3] = 1  # inside the first 4x4 cell, off the pixels nearest-neighbour sampling reads
    prototypes, present = class_prototypes(features, labels, num_classes=2)
    assert present.tolist() == [True, True] and prototypes[1, 0].item() == pytest.approx(1.0)
    labels[0, 0, 3:5, 3:5] = 1  # now also one pixel in each of the four cells
    prototypes, _ = class_prototypes(features, labels, num_classes=2)
    assert prototypes[1, 0].item() == pytest.approx((5 * 1 + 2 + 3 + 4) / 8)  # cell pixel counts 5, 1, 1, 1


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
