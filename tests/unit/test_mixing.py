"""components.mixing: MixUp with labeled partners, CutMix boxes and pasting, clipped noise."""

from __future__ import annotations

import pytest
import torch

from nnunet_semi.components.mixing import (
    clipped_gaussian_noise,
    cutmix_boxes,
    mixup_with_labeled_partners,
    paste_from_partners,
)


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


@pytest.mark.parametrize("spatial", [(3, 3), (2, 3, 3)])
def test_mixup_targets_weigh_pseudo_label_and_partner_truth_by_lambda(spatial):
    from nnunet_semi.components.mixing import mixup_targets

    pseudo = torch.randint(0, 3, (2, 1, *spatial))
    partner = torch.randint(0, 3, (2, 1, *spatial))
    partner[0].view(-1)[0] = 9  # unannotated (ignore label 9): the pseudo label alone
    target = mixup_targets(pseudo, partner, torch.tensor([0.7, 1.0]), 3, ignore_label=9)
    assert target.shape == (2, 3, *spatial)
    torch.testing.assert_close(target.sum(1), torch.ones(2, *spatial))
    p, q, t = pseudo[0, 0].flatten(), partner[0, 0].flatten(), target[0].flatten(1)
    for v in range(p.numel()):
        expected = torch.zeros(3)
        if q[v] == 9:
            expected[p[v]] = 1.0
        else:
            expected[p[v]] += 0.7
            expected[q[v]] += 0.3
        torch.testing.assert_close(t[:, v], expected)
    # lambda 1: the pseudo label alone
    torch.testing.assert_close(target[1], torch.nn.functional.one_hot(pseudo[1, 0], 3).movedim(-1, 0).float())


@pytest.mark.parametrize("spatial", [(6, 9), (24, 40, 48)])
def test_cube_mask_is_one_box_of_the_ratio_of_every_edge(spatial):
    from nnunet_semi.components.mixing import cube_mask

    box = cube_mask(spatial, 2 / 3, generator=torch.Generator().manual_seed(0))
    assert box.shape == (1, 1, *spatial) and box.dtype == torch.bool
    sides = [int(2 / 3 * s) for s in spatial]
    assert int(box.sum()) == int(torch.tensor(sides).prod())
    for axis, side in enumerate(sides):  # one contiguous run of `side` voxels along every axis
        along = box[0, 0].any(dim=tuple(a for a in range(len(spatial)) if a != axis))
        positions = torch.nonzero(along).flatten()
        assert len(positions) == side and int(positions[-1] - positions[0]) == side - 1
    again = cube_mask(spatial, 2 / 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(box, again)


@pytest.mark.parametrize("ratio, spatial, message", [
    (0.0, (8, 8), r"must lie in \(0, 1\)"), (1.0, (8, 8), "must lie in"), (1.5, (8, 8, 8), "1.5"),
    (0.1, (4, 40), "empty along an axis"),
])
def test_cube_mask_refuses_a_ratio_outside_0_1_or_a_patch_too_small(ratio, spatial, message):
    from nnunet_semi.components.mixing import cube_mask

    with pytest.raises(ValueError, match=message):
        cube_mask(spatial, ratio)
