"""Batch-level mixing on device tensors; every random choice is drawn from an optional ``torch.Generator``."""

from __future__ import annotations

import numpy as np
import torch


def mixup_with_labeled_partners(unlabeled: torch.Tensor, labeled: torch.Tensor, alpha: float = 0.75,
                                generator: torch.Generator | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MixUp of each unlabeled sample with a labeled partner, the unlabeled image dominating (SGRS-Net).

    lambda ~ Beta(alpha, alpha) per pair, then lambda <- max(lambda, 1 - lambda);
    mixed = lambda * unlabeled + (1 - lambda) * partner. Partners are a random permutation modulo the labeled batch
    size, so they are distinct whenever there are at least as many labeled as unlabeled samples.

    Args:
        unlabeled: (B_u, C, *spatial).
        labeled: (B_l, C, *spatial), same C and spatial shape.
        alpha: Beta concentration (> 0).
        generator: source of randomness (a CPU generator; None: torch's global one).

    Returns:
        (mixed (B_u, C, *spatial), lambdas (B_u,), partner indices into ``labeled`` (B_u,)).
    """
    if unlabeled.shape[1:] != labeled.shape[1:]:
        raise ValueError(f"shape mismatch: unlabeled {tuple(unlabeled.shape)} vs labeled {tuple(labeled.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    num_unlabeled, num_labeled = unlabeled.shape[0], labeled.shape[0]
    order = torch.randperm(max(num_unlabeled, num_labeled), generator=generator)[:num_unlabeled]
    partners = order % num_labeled
    # torch has no generator-driven Beta sampler: seed numpy's from the generator so the draw stays reproducible
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lambdas = np.random.default_rng(seed).beta(alpha, alpha, size=num_unlabeled)
    lambdas = torch.as_tensor(np.maximum(lambdas, 1 - lambdas), dtype=unlabeled.dtype, device=unlabeled.device)
    shape = (num_unlabeled,) + (1,) * (unlabeled.ndim - 1)
    mixed = lambdas.view(shape) * unlabeled + (1 - lambdas.view(shape)) * labeled[partners.to(labeled.device)]
    return mixed, lambdas, partners


def mixup_targets(pseudo_labels: torch.Tensor, partner_labels: torch.Tensor, lambdas: torch.Tensor,
                  num_classes: int, ignore_label: int | None = None) -> torch.Tensor:
    """The target of a MixUp of an unlabeled image with a labeled partner: lambda * one-hot(pseudo label) +
    (1 - lambda) * one-hot(partner's ground truth), per voxel (SGRS-Net's release computes it and discards it).

    Args:
        pseudo_labels: hard labels of the unlabeled images (B_u, 1, *spatial).
        partner_labels: ground truth of each one's partner (B_u, 1, *spatial), e.g. ``labels[partners]``.
        lambdas: (B_u,) the MixUp weights of ``mixup_with_labeled_partners``.
        num_classes: C.
        ignore_label: where the partner is unannotated, the target is the pseudo label alone.

    Returns:
        (B_u, C, *spatial) float32, summing to 1 over C.
    """
    if pseudo_labels.shape != partner_labels.shape:
        raise ValueError(f"shape mismatch: {tuple(pseudo_labels.shape)} vs {tuple(partner_labels.shape)}")

    def onehot(labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()

    partner = partner_labels
    if ignore_label is not None:
        partner = torch.where(partner_labels == ignore_label, pseudo_labels.to(partner_labels.dtype), partner_labels)
    weight = lambdas.float().view((-1,) + (1,) * (pseudo_labels.ndim - 1)).to(pseudo_labels.device)
    return weight * onehot(pseudo_labels) + (1 - weight) * onehot(partner.to(pseudo_labels.device))


def clipped_gaussian_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """x + clip(N(0, std^2), -clip, clip), the noise drawn where ``x`` lives (``generator`` must be on that device).
    """
    noise = (std * torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device)).clamp_(-clip, clip)
    return x + noise.to(x.dtype)


def cutmix_boxes(batch_size: int, spatial_shape, probability: float = 0.5, fraction: float = 0.5,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Random CutMix boxes, one per sample: with ``probability`` a box of ``fraction`` of the patch along every axis at
    a uniform random position, else none (UniMatch draws its 2D box with p = 0.5).

    Args:
        batch_size: B.
        spatial_shape: the patch's spatial shape (2 or 3 entries).
        probability: chance that a sample gets a box.
        fraction: box side over patch side, per axis.
        generator: source of randomness (a CPU generator; None: torch's global one).

    Returns:
        (B, 1, *spatial_shape) bool, True inside each sample's box.
    """
    if not 0.0 <= probability <= 1.0 or not 0.0 < fraction <= 1.0:
        raise ValueError(f"probability must be in [0, 1] and fraction in (0, 1], got {probability}, {fraction}")
    boxes = torch.zeros(batch_size, 1, *spatial_shape, dtype=torch.bool)
    for b in range(batch_size):
        if float(torch.rand(1, generator=generator)) >= probability:
            continue
        region = [slice(None), slice(None)]
        for size in spatial_shape:
            side = max(1, round(fraction * size))
            start = int(torch.randint(0, size - side + 1, (1,), generator=generator))
            region.append(slice(start, start + side))
        boxes[b][tuple(region[1:])] = True
    return boxes.to(device)


def paste_from_partners(values: torch.Tensor, boxes: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """``values`` with each sample's box taken from sample ``partners[b]`` of the same batch (CutMix).

    Args:
        values: (B, C, *spatial) images, labels or weights.
        boxes: (B, 1, *spatial) bool.
        partners: (B,) indices into the batch.
    """
    return torch.where(boxes, values[partners.to(values.device)], values)


def cube_mask(spatial_shape, ratio: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One axis-aligned box of ``int(ratio * edge)`` voxels along every axis at a uniform random position (BCP's
    context mask: a cube of 2/3 of each patch edge on LA).

    Args:
        spatial_shape: the patch's spatial shape (2 or 3 entries).
        ratio: box edge over patch edge, in (0, 1).
        generator: source of randomness (a CPU generator; None: torch's global one).

    Returns:
        (1, 1, *spatial_shape) bool, True inside the box.

    Raises:
        ValueError: a ratio outside (0, 1), or an axis too short for a box of at least one voxel (naming both).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"the cube ratio is {ratio}; it must lie in (0, 1).")
    sides = [int(ratio * size) for size in spatial_shape]
    if min(sides) < 1:
        raise ValueError(f"a cube of {ratio} of the patch {tuple(spatial_shape)} is empty along an axis "
                         f"({sides}); give a larger ratio or a larger patch.")
    box = torch.zeros(1, 1, *spatial_shape, dtype=torch.bool)
    region = []
    for size, side in zip(spatial_shape, sides):
        start = int(torch.randint(0, size - side + 1, (1,), generator=generator))
        region.append(slice(start, start + side))
    box[(slice(None), slice(None), *region)] = True
    return box.to(device)
