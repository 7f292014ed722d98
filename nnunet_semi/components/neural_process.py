"""Neural-process pseudo-label calibration (after NP-SemiSeg, Wang et al. ICML 2023) for nnU-Net decoder features:
per-class memory banks, a light NP head on voxel feature vectors and dual-confidence voxel weights.

Shapes: decoder features (B, F, *spatial), 2D or 3D; voxel sets (B, n, F); probabilities (B, C, *spatial)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ClassMemoryBank(nn.Module):
    """Per-class FIFO memory of feature vectors (buffers, so they are saved in ``state_dict``).

    Args:
        num_classes: C.
        feature_dim: D.
        length: L, vectors kept per class (the oldest are overwritten).
    """

    def __init__(self, num_classes: int, feature_dim: int, length: int = 2560):
        super().__init__()
        self.register_buffer("memory", torch.zeros(num_classes, length, feature_dim))
        self.register_buffer("size", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor, max_per_class: int | None = None,
             generator: torch.Generator | None = None) -> None:
        """Append features (N, D) to the banks of their labels (N,); at most ``max_per_class`` random ones each
        (drawn with ``generator``, on the features' device; None: torch's global one)."""
        length = self.memory.shape[1]
        for c in labels.unique().tolist():
            if not 0 <= c < self.memory.shape[0]:
                continue
            selected = features[labels == c].detach().float()
            if max_per_class is not None and selected.shape[0] > max_per_class:
                order = torch.randperm(selected.shape[0], device=selected.device, generator=generator)
                selected = selected[order[:max_per_class]]
            selected = selected[-length:]
            slots = (self.pointer[c] + torch.arange(selected.shape[0], device=self.memory.device)) % length
            self.memory[c, slots] = selected.to(self.memory.device)
            self.pointer[c] = (self.pointer[c] + selected.shape[0]) % length
            self.size[c] = torch.clamp(self.size[c] + selected.shape[0], max=length)

    def available(self) -> torch.Tensor:
        """(C,) bool: classes with at least one vector."""
        return self.size > 0

    def centers(self) -> torch.Tensor:
        """(C, D) mean vector per class (zeros for empty classes)."""
        filled = (torch.arange(self.memory.shape[1], device=self.memory.device)[None] < self.size[:, None]).float()
        return (self.memory * filled[..., None]).sum(1) / self.size.clamp_min(1)[:, None].float()


class Gaussian(NamedTuple):
    """Diagonal Gaussian, mean and standard deviation (B, d)."""

    mean: torch.Tensor
    std: torch.Tensor


class NeuralProcessSummary(NamedTuple):
    """Per-image quantities of the NP head: deterministic context vector (B, d), latent distributions from the
    context (labeled) centers and from the target (labeled + pseudo-labeled) centers."""

    context_vector: torch.Tensor
    q_context: Gaussian
    q_target: Gaussian


def gaussian_kl(p: Gaussian, q: Gaussian) -> torch.Tensor:
    """KL(p || q) of diagonal Gaussians, summed over dimensions, averaged over the batch."""
    kl = torch.log(q.std / p.std) + (p.std ** 2 + (p.mean - q.mean) ** 2) / (2 * q.std ** 2) - 0.5
    return kl.sum(-1).mean()


class NeuralProcessHead(nn.Module):
    """A light neural-process segmentation head on voxel feature vectors.

    Voxel features are projected to ``latent_dim``; each is summarised against class centers (of a memory bank) by
    the per-channel attention ``w_c = softmax_c(-(f - center_c)^2)``, ``a = sum_c w_c center_c``, and averaged per
    image. From the context centers come a deterministic vector and ``q_C``; from the target centers ``q_T``
    (``sigma = 0.1 + 0.9 softplus``). The decoder is a per-voxel MLP on ``[z, f, r]`` with ``z`` sampled from a
    latent distribution. Every layer acts per voxel, so the head costs O(voxels) and runs on any voxel subset.

    Args:
        feature_dim: F, channels of the decoder features (nnU-Net's ``features_per_stage[0]``).
        num_classes: C.
        latent_dim, hidden_dim: sizes of the projection/latent and of the decoder's hidden layer.
    """

    def __init__(self, feature_dim: int, num_classes: int, latent_dim: int = 32, hidden_dim: int = 64):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(feature_dim, latent_dim), nn.LayerNorm(latent_dim), nn.ReLU(),
                                     nn.Linear(latent_dim, latent_dim))
        self.latent = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.ReLU(), nn.Linear(latent_dim, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(3 * latent_dim, hidden_dim), nn.ReLU(),
                                     nn.Linear(hidden_dim, num_classes))

    def summarize(self, projected: torch.Tensor, context_centers: torch.Tensor, context_available: torch.Tensor,
                  target_centers: torch.Tensor, target_available: torch.Tensor) -> NeuralProcessSummary:
        """projected (B, n, d); centers (C, d) with (C,) availability masks (at least one class each)."""
        context = _attend_to_centers(projected, context_centers, context_available).mean(1)
        target = _attend_to_centers(projected, target_centers, target_available).mean(1)
        return NeuralProcessSummary(context, self._gaussian(context), self._gaussian(target))

    def _gaussian(self, summary: torch.Tensor) -> Gaussian:
        mean, raw_std = self.latent(summary).chunk(2, -1)
        return Gaussian(mean, 0.1 + 0.9 * torch.nn.functional.softplus(raw_std))

    def decode(self, projected: torch.Tensor, summary: NeuralProcessSummary, latent: Gaussian,
               num_samples: int, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Logits (T, B, n, C) for projected voxels (B, n, d), one per latent sample ``z ~ latent``
        (reparameterised; ``noise`` (T, B, d): the standard normal draws, to decode chunks of one image with the
        same samples; else drawn with ``generator``, on the device of ``projected``)."""
        batch, voxels, dim = projected.shape
        if noise is None:
            noise = torch.randn(num_samples, batch, dim, device=projected.device, dtype=latent.mean.dtype,
                                generator=generator)
        z = latent.mean[None] + latent.std[None] * noise  # (T, B, d)
        inputs = torch.cat([z[:, :, None].expand(-1, -1, voxels, -1),
                            projected[None].expand(num_samples, -1, -1, -1),
                            summary.context_vector[None, :, None].expand(num_samples, -1, voxels, -1)], -1)
        return self.decoder(inputs)

    @torch.no_grad()
    def predict_dense(self, features: torch.Tensor, context: ClassMemoryBank, target: ClassMemoryBank,
                      num_samples: int, summary_voxels: int = 4096, chunk_voxels: int = 2**16,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Calibrated probabilities (B, C, *spatial) for every voxel: the mean over ``num_samples`` latent samples
        of ``z ~ q_C`` (conditioned on the labeled context only), the same samples for every voxel of an image.
        Per-image summaries come from ``summary_voxels`` random voxels. Voxels are decoded ``chunk_voxels`` at a
        time over batch and space together (one image per chunk), so peak memory is set by ``chunk_voxels``
        whatever the batch size. The random voxels and samples are drawn with ``generator`` (on the device of
        ``features``; None: torch's global one)."""
        batch = features.shape[0]
        flat = features.flatten(2).transpose(1, 2)  # (B, N, F)
        index = torch.randperm(flat.shape[1], device=flat.device, generator=generator)[:summary_voxels]
        summary = self.summarize(self.project(flat[:, index].float()), context.centers(), context.available(),
                                 target.centers(), target.available())
        noise = torch.randn(num_samples, batch, summary.q_context.mean.shape[-1], device=flat.device,
                            dtype=summary.q_context.mean.dtype, generator=generator)
        probs = torch.empty(batch, flat.shape[1], self.decoder[-1].out_features, device=flat.device)
        for b in range(batch):
            image_summary = NeuralProcessSummary(*(_take_image(x, b) for x in summary))
            for start in range(0, flat.shape[1], chunk_voxels):
                projected = self.project(flat[b:b + 1, start:start + chunk_voxels].float())
                logits = self.decode(projected, image_summary, image_summary.q_context, num_samples,
                                     noise[:, b:b + 1])
                probs[b:b + 1, start:start + chunk_voxels] = torch.softmax(logits.float(), -1).mean(0)
        return probs.transpose(1, 2).reshape(batch, -1, *features.shape[2:])


def _take_image(value, b: int):
    """Image ``b`` (kept as a batch of one) of a summary tensor or Gaussian."""
    if isinstance(value, Gaussian):
        return Gaussian(value.mean[b:b + 1], value.std[b:b + 1])
    return value[b:b + 1]


def _attend_to_centers(projected: torch.Tensor, centers: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Per-channel softmax attention of vectors (B, n, d) over the available class centers (C, d)."""
    if not available.any():
        raise ValueError("the memory bank is empty: push labeled features before using the NP head")
    centers = centers[available].to(projected.dtype)  # (K, d)
    distance = (projected[..., None, :] - centers) ** 2  # (B, n, K, d)
    weights = torch.softmax(-distance, -2)
    return (weights * centers).sum(-2)


def sample_voxels_per_image(features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                            voxels_per_image: int, class_balanced: bool = False,
                            generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same number of random voxels from every image (the NP summaries are per image).

    Args:
        features: (B, F, *spatial).
        labels: (B, 1, *spatial) labels of the voxels.
        valid: (B, 1, *spatial) bool, voxels that may be drawn (e.g. not the ignore label); images with fewer valid
            voxels than requested draw with replacement.
        voxels_per_image: n.
        class_balanced: every class present in an image is drawn with the same probability mass (a small
            structure gets about n / #classes voxels instead of its volume share); else uniform over valid voxels.
        generator: random source on the device of ``features`` (None: torch's global one).

    Returns:
        features (B, n, F) (gradient flows), labels (B, n), flat voxel indices (B, n).
    """
    flat_valid = valid.flatten(1).float()
    flat_valid = torch.where(flat_valid.sum(1, keepdim=True) > 0, flat_valid, torch.ones_like(flat_valid))
    flat_labels = labels.flatten(1)
    probability = flat_valid
    if class_balanced:
        # each voxel weighs 1 / (valid voxels of its class in its image); labels outside [0, C) count as one class
        classes = flat_labels.long().clamp_min(0)
        counts = torch.zeros(classes.shape[0], int(classes.max()) + 1, device=classes.device)
        counts.scatter_add_(1, classes, flat_valid)
        probability = flat_valid / torch.gather(counts, 1, classes).clamp_min(1)
    replacement = bool(((flat_valid > 0).sum(1) < voxels_per_image).any())
    index = torch.multinomial(probability, voxels_per_image, replacement=replacement, generator=generator)  # (B, n)
    flat_features = features.flatten(2).transpose(1, 2)
    gathered = torch.gather(flat_features, 1, index[..., None].expand(-1, -1, features.shape[1]))
    return gathered, torch.gather(flat_labels, 1, index), index
