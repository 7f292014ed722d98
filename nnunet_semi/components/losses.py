"""Loss functions on probabilities; shapes (B, C, *spatial), 2D or 3D."""

from __future__ import annotations

import torch


def probability_mse(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean squared error between two probability maps (Mean Teacher's consistency loss).

    Args:
        student_probs: (B, C, *spatial) probabilities that receive gradient.
        teacher_probs: (B, C, *spatial) target probabilities (detached here).

    Returns:
        Scalar mean over every element; 0 when both are equal.
    """
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(f"shape mismatch: student {tuple(student_probs.shape)} "
                         f"vs teacher {tuple(teacher_probs.shape)}")
    return torch.mean((student_probs - teacher_probs.detach()) ** 2)


def hard_pseudo_label_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the hard labels of another prediction (cross pseudo supervision).

    Args:
        logits: (B, C, *spatial) raw outputs that receive gradient.
        teacher_probs: (B, C, *spatial) probabilities of the other network; only their hard decision is used.
        regions: independent sigmoid channels (nnU-Net's region-based training): binary CE against
            ``teacher_probs > 0.5`` per channel. Otherwise softmax CE against ``argmax`` over channels.

    Returns:
        Scalar mean over voxels (and channels for regions).
    """
    if logits.shape != teacher_probs.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} vs probabilities {tuple(teacher_probs.shape)}")
    logits = logits.float()
    if regions:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, (teacher_probs > 0.5).float())
    return torch.nn.functional.cross_entropy(logits, teacher_probs.argmax(1).detach())


def _as_index_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) integer labels -> (B, *spatial) long."""
    if labels.ndim < 3 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, *spatial), got shape {tuple(labels.shape)}")
    return labels[:, 0].long()


def _is_distribution(target: torch.Tensor, num_classes: int) -> bool:
    """Whether ``target`` is a per-voxel class distribution (B, C, *spatial) rather than hard labels (B, 1, ...)."""
    return target.is_floating_point() and target.ndim >= 3 and target.shape[1] == num_classes > 1


def voxel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-voxel (optionally label-smoothed) cross-entropy, no reduction.

    Args:
        logits: (B, C, *spatial).
        labels: hard labels (B, 1, *spatial), values in [0, C); or a target distribution (B, C, *spatial), float,
            summing to 1 over C (e.g. a MixUp of two one-hot labels).
        label_smoothing: epsilon; the target is (1 - eps) times the label (or distribution) plus eps / C on every
            class (PyTorch's definition: for C = 2 and eps = 0.2, targets 0.9 / 0.1).

    Returns:
        (B, 1, *spatial) loss map, float32.
    """
    target = labels.float() if _is_distribution(labels, logits.shape[1]) else _as_index_labels(labels)
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="none",
                                             label_smoothing=label_smoothing)[:, None]


def masked_soft_dice_loss(probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0,
                          include_background: bool = True) -> torch.Tensor:
    """1 - mean over samples and classes of (2 TP + s) / (2 TP + FP + FN + s), counted inside ``mask`` only.

    Args:
        probs: probabilities (B, C, *spatial).
        labels: hard labels (B, 1, *spatial), or a target distribution (B, C, *spatial) (soft TP/FP/FN).
        mask: voxels that count, (B, 1, *spatial) bool or float.
        smooth: s; larger values soften the Dice of small regions. With s > 0 an empty mask gives 0 loss.
        include_background: keep class 0 in the mean.

    Returns:
        Scalar loss in [0, 1].
    """
    num_classes = probs.shape[1]
    onehot = labels.float() if _is_distribution(labels, num_classes) else \
        torch.nn.functional.one_hot(_as_index_labels(labels), num_classes).movedim(-1, 1).float()
    weight = mask.float()
    axes = tuple(range(2, probs.ndim))
    probs = probs.float()
    tp = (probs * onehot * weight).sum(axes)
    fp = (probs * (1 - onehot) * weight).sum(axes)
    fn = ((1 - probs) * onehot * weight).sum(axes)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8)
    if not include_background:
        dice = dice[:, 1:]
    return 1 - dice.mean()


def kl_weighted_pseudo_label_loss(student_logits: torch.Tensor, target_probs: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncertainty-rectified pseudo supervision (Zheng & Yang 2021): exp(-KL)-weighted CE plus the KL itself.

    Per voxel, KL = sum_c q_c (log q_c - log p_c) between the target network's probabilities q (detached) and the
    student's p; the CE against argmax q is down-weighted by exp(-KL) where the networks disagree, and the KL term
    pulls the student toward the target. The weight is detached, so disagreement cannot be "solved" by raising it.

    Args:
        student_logits: (B, C, *spatial), receive gradient.
        target_probs: (B, C, *spatial) probabilities of the other network.

    Returns:
        (loss scalar, mean KL scalar detached).
    """
    if student_logits.shape != target_probs.shape:
        raise ValueError(f"shape mismatch: {tuple(student_logits.shape)} vs {tuple(target_probs.shape)}")
    log_p = torch.log_softmax(student_logits.float(), 1)
    q = target_probs.detach().float()
    kl = (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(1)  # (B, *spatial)
    ce = torch.nn.functional.nll_loss(log_p, q.argmax(1), reduction="none")
    loss = (torch.exp(-kl.detach()) * ce).mean() + kl.mean()
    return loss, kl.detach().mean()


def prototype_infonce(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                      temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE of voxel features against class prototypes: each feature is pulled toward its class prototype and
    pushed from the others (cosine similarity / temperature, softmax over classes).

    Args:
        features: (N, D) voxel features, receive gradient.
        labels: (N,) class index of each feature.
        prototypes: (C, D) class prototypes (treated as constants).
        temperature: softmax temperature (> 0).

    Returns:
        Scalar; 0 for N = 0.
    """
    if features.shape[0] == 0:
        return features.sum() * 0.0
    similarity = torch.nn.functional.normalize(features.float(), dim=1) @ \
        torch.nn.functional.normalize(prototypes.detach().float(), dim=1).T
    return torch.nn.functional.cross_entropy(similarity / temperature, labels.long())


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * v) / sum(w) over all elements (weights bool or float, broadcastable to ``values``); 0 with gradient
    graph when every weight is 0."""
    weights = weights.float()
    return (values * weights).sum() / weights.sum().clamp_min(1e-6)


def masked_pseudo_label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                                      rescale_by_kept_fraction: bool = False) -> torch.Tensor:
    """Cross-entropy against hard pseudo labels averaged over the voxels in ``mask`` only.

    This is PyTorch's ``cross_entropy(ignore_index=...)`` with the ignored voxels outside ``mask``, whose mean is
    already over the kept voxels. The dual network's release multiplies that by ``w = N / N_kept`` once more
    (``rescale_by_kept_fraction``), so its term is N / N_kept times this mean (2.5 to 5 times at its 20-40 % kept).

    Args:
        logits: (B, C, *spatial), receive gradient.
        labels: hard pseudo labels (B, 1, *spatial).
        mask: kept voxels (B, 1, *spatial) bool.
        rescale_by_kept_fraction: multiply by N / N_kept as the release does.

    Returns:
        Scalar; 0 (with gradient graph) when no voxel is kept.
    """
    loss = weighted_mean(voxel_cross_entropy(logits, labels.detach()), mask)
    if rescale_by_kept_fraction:
        loss = loss * (mask.numel() / mask.sum().clamp_min(1))
    return loss


def masked_probability_mse(probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                           ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Squared difference between the foreground probabilities and the one-hot labels, summed over the foreground
    classes and averaged over the voxels in ``mask`` (the dual network's cross-reliable term; for two classes the
    release's ``(p_fg - y)^2``, background excluded as there).

    Args:
        probs: (B, C, *spatial), receive gradient.
        labels: (B, 1, *spatial) hard labels in [0, C).
        mask: (B, 1, *spatial) bool, voxels that count.
        ignore: optional (B, 1, *spatial) bool, voxels that never count (nnU-Net's ignore label).

    Returns:
        Scalar; 0 when no voxel counts.
    """
    if ignore is not None:
        mask = mask & ~ignore
        labels = torch.where(ignore, 0, labels)
    onehot = torch.nn.functional.one_hot(_as_index_labels(labels), probs.shape[1]).movedim(-1, 1).float()
    squared_error = (probs.float()[:, 1:] - onehot[:, 1:]) ** 2
    return weighted_mean(squared_error.sum(1, keepdim=True), mask)


def cosine_consistency_loss(probs_a: torch.Tensor, probs_b: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of 1 - cos(p_a, p_b), the cosine taken over the class axis (the dual network's output
    consistency). Both inputs receive gradient; 0 where the two distributions are parallel.

    Args:
        probs_a, probs_b: probabilities (B, C, *spatial).
    """
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"shape mismatch: {tuple(probs_a.shape)} vs {tuple(probs_b.shape)}")
    return (1 - torch.nn.functional.cosine_similarity(probs_a.float(), probs_b.float(), dim=1)).mean()


WEIGHT_NORMALIZATIONS = ("weights", "voxels")


def weighted_ce_dice_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                          normalization: str = "weights") -> torch.Tensor:
    """Voxel-weighted CE plus voxel-weighted soft Dice against hard pseudo labels (weights replace a confidence
    threshold).

    Args:
        logits: (B, C, *spatial), receive gradient.
        labels: (B, 1, *spatial) hard pseudo labels.
        weight: (B, 1, *spatial) voxel weights in [0, 1] (detached here).
        normalization: ``"weights"``: ``sum(w * CE) / sum(w)`` + the soft Dice weighted by ``w / mean(w)``, so the
            weights only rank voxels within the batch and scaling them all leaves the loss unchanged. ``"voxels"``:
            ``sum(w * CE) / N`` + ``mean(w)`` times that Dice, so a batch whose voxels are all uncertain trains
            weakly (a confidence threshold's masked mean over all voxels, made soft).

    Returns:
        Scalar.
    """
    if normalization not in WEIGHT_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {WEIGHT_NORMALIZATIONS}, got {normalization!r}")
    weight = weight.detach().float()
    ce_map = voxel_cross_entropy(logits, labels.detach())
    # the Dice sees weights of mean 1, so that its smoothing stays in units of voxels whatever the weights' scale
    relative = weight / weight.mean().clamp_min(1e-6)
    dice = masked_soft_dice_loss(torch.softmax(logits.float(), 1), labels.detach(), relative)
    if normalization == "weights":
        return weighted_mean(ce_map, weight) + dice
    return (ce_map * weight).mean() + weight.mean() * dice
