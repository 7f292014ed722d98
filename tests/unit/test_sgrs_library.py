"""SGRS-Net's library pieces on tiny hand-made tensors, expected values worked out in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_semi.components.losses import masked_soft_dice_loss, voxel_cross_entropy
from nnunet_semi.components.masks import ambiguity_mask, synergy_regions
from nnunet_semi.components.mixing import clipped_gaussian_noise, mixup_with_labeled_partners
from nnunet_semi.components.uncertainty import binary_entropy, normalized_entropy


def _two_class(p_background: list[float], spatial=(1, 4)) -> torch.Tensor:
    """(1, 2, *spatial) probabilities from background probabilities."""
    p0 = torch.tensor(p_background).reshape(1, 1, *spatial)
    return torch.cat([p0, 1 - p0], 1)


def test_paper_threshold_is_the_log10_entropy_of_tau():
    # -(0.425 log10 0.425 + 0.575 log10 0.575) = 0.15793 + 0.13819
    assert binary_entropy(0.425, base=10) == pytest.approx(0.29612, abs=1e-5)
    assert binary_entropy(0.5, base=2) == pytest.approx(1.0)


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


@pytest.mark.parametrize("spatial", [(6, 6), (4, 4, 4)])
def test_mixup_with_labeled_partners(spatial):
    unlabeled = torch.rand(2, 1, *spatial)
    labeled = torch.rand(2, 1, *spatial) + 10.0
    mixed, lambdas, partners = mixup_with_labeled_partners(unlabeled, labeled, 0.75, torch.Generator().manual_seed(3))
    again = mixup_with_labeled_partners(unlabeled, labeled, 0.75, torch.Generator().manual_seed(3))
    torch.testing.assert_close(mixed, again[0])
    assert mixed.shape == unlabeled.shape and (lambdas >= 0.5).all() and (lambdas <= 1).all()
    assert sorted(partners.tolist()) == [0, 1]  # 2 + 2: distinct partners
    for i in range(2):
        torch.testing.assert_close(mixed[i], lambdas[i] * unlabeled[i] + (1 - lambdas[i]) * labeled[partners[i]])
    other = mixup_with_labeled_partners(unlabeled, labeled, 0.75, torch.Generator().manual_seed(4))
    assert not torch.equal(other[1], lambdas)
    # more unlabeled than labeled samples: partners wrap around the labeled batch
    _, _, wrapped = mixup_with_labeled_partners(torch.rand(5, 1, *spatial), labeled, 0.75)
    assert wrapped.max() < 2 and wrapped.shape == (5,)
    with pytest.raises(ValueError, match="shape mismatch"):
        mixup_with_labeled_partners(unlabeled, torch.rand(2, 2, *spatial))


def test_clipped_noise_stays_within_the_clip():
    x = torch.zeros(1000)
    noisy = clipped_gaussian_noise(x, std=0.1, clip=0.2, generator=torch.Generator().manual_seed(0))
    assert noisy.abs().max() <= 0.2 and noisy.std() == pytest.approx(0.1, rel=0.15)


def test_clipped_noise_is_drawn_on_the_tensors_device(monkeypatch):
    import nnunet_semi.components.mixing

    devices = []
    original = torch.randn
    monkeypatch.setattr(nnunet_semi.components.mixing.torch, "randn", lambda *a, **k: (devices.append(k.get("device")),
                                                                            original(*a, **k))[1])
    x = torch.zeros(2, 3, device="meta")
    assert clipped_gaussian_noise(x).device == x.device
    assert devices == [x.device]
