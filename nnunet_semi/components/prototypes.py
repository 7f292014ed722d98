"""Class prototypes of features: class-mean keys from (average-pooled) one-hot labels, an EMA prototype bank
(buffers, saved in ``state_dict``) and per-class voxel gathering. Shapes (B, C, *spatial), 2D or 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch._dynamo
from torch import nn

from nnunet_semi.components.losses import prototype_infonce


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling of features per class, with soft masks: the one-hot labels average-pooled to the
    feature grid (the fraction of each cell's voxels in each class), so a structure smaller than a cell or off the
    cell centres still gets a prototype (nearest-neighbour label downsampling can miss it entirely).

    Args:
        features: (B, C, *grid) features of labeled images.
        labels: (B, 1, *spatial) integer labels at image resolution; values outside [0, num_classes) (nnU-Net's
            ignore label) are left out.

    Returns:
        (num_classes, C) prototypes (zero where absent) and (num_classes,) bool, which classes are present.
    """
    onehot = torch.stack([(labels[:, 0] == c) for c in range(num_classes)], 1).to(features.dtype)
    soft = adaptive_avg_pool(onehot, features.shape[2:])  # (B, K, *grid), class fractions per cell
    mass = soft.flatten(2).sum((0, 2))
    sums = torch.einsum("bkn,bcn->kc", soft.flatten(2), features.flatten(2))
    return sums / mass.clamp_min(1e-6)[:, None], mass > 0


class PrototypeBank(nn.Module):
    """One feature prototype per class, updated by exponential moving average of class-mean features.

    Args:
        num_classes: C.
        feature_dim: D, the channel count of the features (e.g. ``features_per_stage[0]`` of nnU-Net's plans).
        momentum: prototype <- momentum * prototype + (1 - momentum) * batch class mean; a class seen for the first
            time takes its batch mean directly.
    """

    def __init__(self, num_classes: int, feature_dim: int, momentum: float = 0.99):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("prototypes", torch.zeros(num_classes, feature_dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """features (N, D), labels (N,): EMA of the mean feature of every class present."""
        features = features.detach().float()
        for c in labels.unique().tolist():
            mean = features[labels == c].mean(0)
            if self.initialized[c]:
                self.prototypes[c].lerp_(mean, 1 - self.momentum)
            else:
                self.prototypes[c].copy_(mean)
                self.initialized[c] = True


    def contrast_loss(self, features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
        """InfoNCE of features against the initialised prototypes (``losses.prototype_infonce``).

        Features of classes without a prototype yet are left out; with fewer than two initialised classes there is
        nothing to contrast and the loss is 0 (with gradient graph).

        Args:
            features: (N, D), receive gradient.
            labels: (N,) class indices.
        """
        available = self.initialized.nonzero()[:, 0]
        if available.numel() < 2:
            return features.sum() * 0.0
        # class index -> row of the available prototypes (-1: no prototype)
        row = torch.full((self.prototypes.shape[0],), -1, dtype=torch.long, device=labels.device)
        row[available.to(labels.device)] = torch.arange(available.numel(), device=labels.device)
        rows = row[labels.long()]
        keep = rows >= 0
        return prototype_infonce(features[keep], rows[keep], self.prototypes[available], temperature)

    @torch.no_grad()
    def similarity_to_own_class(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean cosine similarity of features (N, D) to their class's prototype (NaN if none can be compared)."""
        keep = self.initialized[labels.long()]
        if not keep.any():
            return float("nan")
        prototypes = self.prototypes[labels.long()[keep]]
        return float(torch.nn.functional.cosine_similarity(features[keep].float(), prototypes, dim=1).mean())


def gather_voxels(features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  max_per_class: int | None = None, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature vectors and labels of the voxels in ``mask``, optionally at most ``max_per_class`` of each class (a
    uniform random subset per class, as the dual network's release draws class-balanced counts): a uniform subset
    over all voxels would be mostly background on small structures, and the bound keeps memory fixed on 3D patches.

    Args:
        features: (B, D, *spatial).
        labels: (B, 1, *spatial) class indices.
        mask: (B, 1, *spatial) bool.
        max_per_class: keep at most this many voxels of every class (None: all).
        generator: random source of the subsets, on the device of ``mask`` (None: torch's global one).

    Returns:
        (N, D) features (gradient flows back to ``features``) and (N,) labels, grouped by class when subsampled.
    """
    index = mask[:, 0].reshape(-1).nonzero()[:, 0]
    flat_labels = labels[:, 0].reshape(-1)
    if max_per_class is not None:
        chosen = []
        selected_labels = flat_labels[index]
        for c in selected_labels.unique():
            of_class = index[selected_labels == c]
            if of_class.numel() > max_per_class:
                order = torch.randperm(of_class.numel(), device=of_class.device, generator=generator)
                of_class = of_class[order[:max_per_class]]
            chosen.append(of_class)
        index = torch.cat(chosen) if chosen else index
    flat_features = features.movedim(1, -1).reshape(-1, features.shape[1])
    return flat_features[index], flat_labels[index]


def adaptive_avg_pool(values: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Average-pool (B, C, *spatial) to (B, C, *shape), 2D or 3D."""
    pool = torch.nn.functional.adaptive_avg_pool3d if values.ndim == 5 else torch.nn.functional.adaptive_avg_pool2d
    return pool(values, tuple(shape))
