"""components.losses: the pseudo-label CE / Dice / MSE / KL variants and cosine consistency, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_semi.components.losses import (
    cosine_consistency_loss,
    kl_weighted_pseudo_label_loss,
    masked_probability_mse,
    masked_pseudo_label_cross_entropy,
    masked_soft_dice_loss,
    voxel_cross_entropy,
    weighted_ce_dice_loss,
)


def _probs(*columns):
    """(1, C, N) probabilities from per-voxel class distributions."""
    return torch.tensor(columns, dtype=torch.float32).T[None]


def test_voxel_cross_entropy_with_label_smoothing():
    logits = torch.tensor([[math.log(9.0), 0.0]]).reshape(1, 2, 1, 1)  # p = (0.9, 0.1)
    label = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    assert voxel_cross_entropy(logits, label).item() == pytest.approx(-math.log(0.9))  # 0.10536
    # eps = 0.2 on 2 classes: targets (0.9, 0.1): -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.09482 + 0.23026
    assert voxel_cross_entropy(logits, label, 0.2).item() == pytest.approx(0.32508, abs=1e-5)
    assert voxel_cross_entropy(logits, label).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        voxel_cross_entropy(logits, torch.zeros(1, 2, 1, 1, dtype=torch.long))


def test_masked_soft_dice_by_hand():
    p1 = torch.tensor([1.0, 0.5, 0.0, 0.8]).reshape(1, 1, 1, 4)
    probs = torch.cat([1 - p1, p1], 1)
    labels = torch.tensor([1, 1, 0, 0]).reshape(1, 1, 1, 4)
    mask = torch.tensor([1, 1, 1, 0], dtype=torch.bool).reshape(1, 1, 1, 4)
    # class 1 inside the mask: tp 1.5, fp 0, fn 0.5 -> (3 + 1) / (3 + 0.5 + 1) = 0.8889
    # class 0 inside the mask: tp 1, fp 0.5, fn 0 -> (2 + 1) / (2 + 0.5 + 1) = 0.8571
    assert masked_soft_dice_loss(probs, labels, mask, smooth=1.0).item() == pytest.approx(
        1 - (4 / 4.5 + 3 / 3.5) / 2, abs=1e-6)
    assert masked_soft_dice_loss(probs, labels, mask, smooth=1.0, include_background=False).item() == \
        pytest.approx(1 - 4 / 4.5, abs=1e-6)
    # heavier smoothing is gentler: (3 + 20) / (3.5 + 20) and (2 + 20) / (2.5 + 20)
    assert masked_soft_dice_loss(probs, labels, mask, smooth=20.0).item() == pytest.approx(
        1 - (23 / 23.5 + 22 / 22.5) / 2, abs=1e-6)
    # an empty mask costs nothing and gives no NaN
    empty = torch.zeros_like(mask)
    assert masked_soft_dice_loss(probs, labels, empty).item() == 0.0


def test_masked_soft_dice_gradient_reaches_masked_voxels_only():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 4, 4))
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[0, :, :2] = True
    masked_soft_dice_loss(torch.softmax(logits, 1), labels, mask).backward()
    assert logits.grad[0, :, :2].abs().sum() > 0
    assert logits.grad[0, :, 2:].abs().sum() == 0 and logits.grad[1].abs().sum() == 0


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


def test_a_one_hot_distribution_target_gives_the_hard_labels_losses_and_a_mixed_one_lies_between():
    from nnunet_semi.components.losses import masked_soft_dice_loss, voxel_cross_entropy

    logits = torch.randn(2, 3, 4, 4, 4)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    other = (labels + 1) % 3
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    mask = torch.rand(2, 1, 4, 4, 4) > 0.3
    for smoothing in (0.0, 0.2):
        torch.testing.assert_close(voxel_cross_entropy(logits, onehot, smoothing),
                                   voxel_cross_entropy(logits, labels, smoothing))
    probs = logits.softmax(1)
    torch.testing.assert_close(masked_soft_dice_loss(probs, onehot, mask), masked_soft_dice_loss(probs, labels, mask))
    # CE is linear in the target: a 0.7 / 0.3 mixture of two labels is the same mixture of their losses
    mixed = 0.7 * onehot + 0.3 * torch.nn.functional.one_hot(other[:, 0], 3).movedim(-1, 1).float()
    torch.testing.assert_close(voxel_cross_entropy(logits, mixed),
                               0.7 * voxel_cross_entropy(logits, labels) + 0.3 * voxel_cross_entropy(logits, other))
