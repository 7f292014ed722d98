"""Cross-image refinement at the bottleneck: ambiguous features of unlabeled images updated by attention to
labeled images' features or class prototypes. Shapes (B, C, *spatial), 2D or 3D."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from nnunet_semi.components.prototypes import adaptive_avg_pool, class_prototypes

ATTENTION_KINDS = ("spatial", "channel")


KEY_KINDS = ("features", "prototypes")


UPDATE_SCALES = ("feature_norm", "none")


def ambiguous_positions(entropy: torch.Tensor, shape: Sequence[int], fraction: float,
                        min_entropy: float = 0.0) -> torch.Tensor:
    """The most ambiguous positions of a feature grid: per sample the ``fraction`` of positions with the highest
    mean uncertainty of the voxels they cover, among those above ``min_entropy``.

    Args:
        entropy: voxel uncertainty (B, 1, *spatial), e.g. ``prediction_uncertainty`` of the weak-view prediction.
        shape: spatial shape of the feature grid (e.g. the bottleneck).
        fraction: in [0, 1].
        min_entropy: positions at or below this are never ambiguous.

    Returns:
        (B, 1, *shape) bool.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    pooled = adaptive_avg_pool(entropy.float(), shape)
    flat = pooled.flatten(1)
    count = round(fraction * flat.shape[1])
    selected = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        selected.scatter_(1, flat.topk(count, dim=1).indices, True)
    return (selected & (flat > min_entropy)).view(pooled.shape)


class CrossImageRefinement(nn.Module):
    """Cross-image feature perturbation: ambiguous unlabeled features attend to labeled ones,
    ``F_u' = F_u + gamma * Attention(Q = F_u, K = V = labeled)`` at the ambiguous positions only.

    Args:
        channels: C of the features (the bottleneck's ``features_per_stage[-1]``).
        attention: ``"spatial"`` (tokens are positions: each unlabeled position attends to every labeled position
            of the batch, or to the class prototypes) or ``"channel"`` (each unlabeled sample's channels attend to the
            channels of a labeled partner, C x C affinity over positions; cheaper on large grids, but the affinity
            pairs grid position n of one patient with position n of another, which have no anatomical
            correspondence: an ablation, not a recommended setting).
        keys: ``"features"`` (labeled feature tokens) or ``"prototypes"`` (per-class masked averages of the labeled
            features, more stable with 1-2 labeled samples; spatial attention only).
        num_heads: attention heads (spatial); must divide ``channels``.
        gamma: initial residual scale (learned).
        update_scale: ``"feature_norm"``: each position's attention update is rescaled to the norm of the feature it
            updates, so ``gamma`` is the relative size of the perturbation (at initialisation the attention is near
            uniform and its raw update, about the mean labeled token, is tiny: the stream would perturb nothing, and
            gamma's gradient, proportional to that update, would barely move it). ``"none"``: the raw update.

    ``last_update_ratio`` holds the mean ||F_u' - F_u|| / ||F_u|| over the refined positions of the last forward
    (detached; NaN when nothing was refined), for logging.
    """

    def __init__(self, channels: int, attention: str = "spatial", keys: str = "features", num_heads: int = 1,
                 gamma: float = 0.1, update_scale: str = "feature_norm"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if keys not in KEY_KINDS:
            raise ValueError(f"keys must be one of {KEY_KINDS}, got {keys!r}")
        if update_scale not in UPDATE_SCALES:
            raise ValueError(f"update_scale must be one of {UPDATE_SCALES}, got {update_scale!r}")
        if attention == "channel" and keys == "prototypes":
            raise ValueError("channel attention needs labeled feature maps as keys, not prototypes")
        self.attention, self.keys, self.update_scale = attention, keys, update_scale
        self.last_update_ratio = float("nan")
        self.norm = nn.LayerNorm(channels)
        if attention == "spatial":
            self.attend = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        else:
            self.query, self.key, self.value = (nn.Linear(channels, channels) for _ in range(3))
        self.gamma = nn.Parameter(torch.tensor(float(gamma)))

    def forward(self, unlabeled: torch.Tensor, labeled: torch.Tensor, ambiguous: torch.Tensor,
                labeled_labels: torch.Tensor | None = None, num_classes: int | None = None) -> torch.Tensor:
        """
        Args:
            unlabeled: (B_u, C, *grid) features to refine.
            labeled: (B_l, C, *grid) labeled features of the same batch (same grid: same patch size).
            ambiguous: (B_u, 1, *grid) bool, where to refine.
            labeled_labels, num_classes: (B_l, 1, *spatial) labels and class count, for prototype keys.

        Returns:
            (B_u, C, *grid): refined at ambiguous positions, unchanged elsewhere.
        """
        queries = self.norm(unlabeled.flatten(2).transpose(1, 2))  # (B_u, N, C)
        if self.keys == "prototypes":
            if labeled_labels is None or num_classes is None:
                raise ValueError("prototype keys need labeled_labels and num_classes")
            prototypes, present = class_prototypes(labeled, labeled_labels, num_classes)
            tokens = self.norm(prototypes[present])[None].expand(unlabeled.shape[0], -1, -1)
        else:
            tokens = self.norm(labeled.flatten(2).transpose(1, 2))  # (B_l, N, C)
        if self.attention == "spatial":
            if self.keys == "features":  # every labeled position of the batch
                tokens = tokens.reshape(1, -1, tokens.shape[-1]).expand(unlabeled.shape[0], -1, -1)
            update = self.attend(queries, tokens, tokens, need_weights=False)[0]
        else:
            partners = tokens[torch.arange(unlabeled.shape[0], device=tokens.device) % tokens.shape[0]]
            q, k, v = self.query(queries), self.key(partners), self.value(partners)  # (B_u, N, C)
            affinity = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), -1)  # (B_u, C, C)
            update = (affinity @ v.transpose(1, 2)).transpose(1, 2)  # (B_u, N, C)
        update = update.transpose(1, 2).reshape(unlabeled.shape)
        feature_norm = unlabeled.norm(dim=1, keepdim=True)
        if self.update_scale == "feature_norm":
            update = update * (feature_norm / update.norm(dim=1, keepdim=True).clamp_min(1e-6))
        step = self.gamma * update
        with torch.no_grad():
            ratio = step.norm(dim=1, keepdim=True) / feature_norm.clamp_min(1e-6)
            self.last_update_ratio = float(ratio[ambiguous].mean()) if ambiguous.any() else float("nan")
        return torch.where(ambiguous, unlabeled + step, unlabeled)
