"""Class prototypes of decoder features, kept as EMA buffers (saved in ``state_dict``), and decoder-feature access."""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from nnunet_semi.losses import prototype_infonce

# By default torch.compile does not guard on module hooks: a graph traced without DecoderFeatures' hook (for this
# network, or for another network of the same class earlier in the process, e.g. the benchmark's stock run) is
# reused and the hook never runs. Guarding on hooks costs a recompile when hooks change, nothing per step. Set at
# import, before nnU-Net compiles anything, so that every graph of the process carries the guard.
torch._dynamo.config.skip_nnmodule_hook_guards = False


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
                  max_per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature vectors and labels of the voxels in ``mask``, optionally at most ``max_per_class`` of each class (a
    uniform random subset per class, as the dual network's release draws class-balanced counts): a uniform subset
    over all voxels would be mostly background on small structures, and the bound keeps memory fixed on 3D patches.

    Args:
        features: (B, D, *spatial).
        labels: (B, 1, *spatial) class indices.
        mask: (B, 1, *spatial) bool.
        max_per_class: keep at most this many voxels of every class (None: all).

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
                of_class = of_class[torch.randperm(of_class.numel(), device=of_class.device)[:max_per_class]]
            chosen.append(of_class)
        index = torch.cat(chosen) if chosen else index
    flat_features = features.movedim(1, -1).reshape(-1, features.shape[1])
    return flat_features[index], flat_labels[index]


class ModuleOutputs:
    """Records the output of one submodule of a network during a forward.

    ``capture = ModuleOutputs(module)`` once, then per forward ``with capture: network(x)``, after which
    ``capture.output`` (or ``take()``) is what ``module`` returned in that forward. The forward hook stays registered
    and records only inside ``with``. Attach it before the network's first forward: torch.compile traces the hooks
    present at its first call and silently skips hooks added later. ``output`` raises a RuntimeError when the last
    forward inside ``with`` recorded nothing, instead of handing on None; ``take()`` returns it and drops the
    reference, so that a long-lived capture does not keep a feature map alive into the next step's forward. A deep
    copy of the network (an EMA teacher) gets an inert copy of the hook.
    """

    def __init__(self, module: nn.Module):
        self.module_name = type(module).__name__
        self._active = False
        self._output = None
        self._handle = module.register_forward_hook(self._capture)

    def __enter__(self):
        self._output, self._active = None, True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False

    def _capture(self, module, inputs, output) -> None:
        if self._active:
            self._output = output

    @property
    def output(self):
        if self._output is None:
            raise RuntimeError(
                f"nothing was recorded from {self.module_name} in the last forward: its hook did not run. Attach the "
                f"capture before the network's first forward (torch.compile skips hooks added after it), and run "
                f"the forward inside 'with'.")
        return self._output

    def take(self):
        """``output``, after which the capture holds no reference to it."""
        output, self._output = self.output, None
        return output

    def remove(self) -> None:
        self._handle.remove()

    def __deepcopy__(self, memo):
        inert = self.__class__.__new__(self.__class__)
        inert.module_name, inert._active, inert._output, inert._handle = self.module_name, False, None, None
        return inert


class DecoderFeatures(ModuleOutputs):
    """Captures the full-resolution decoder features of an nnU-Net network (input of its last segmentation layer).

    ``capture = DecoderFeatures(network)`` once, then per forward ``with capture: network(x)``, after which
    ``capture.features`` is (B, F, *spatial), with F = ``features_per_stage[0]``, whether deep supervision is on or
    off. Works for PlainConvUNet and ResidualEncoderUNet (both keep ``decoder.stages``). Recording, ``take()``,
    compile and deep-copy behaviour: ``ModuleOutputs``.
    """

    def __init__(self, network: nn.Module):
        super().__init__(network.decoder.stages[-1])
        self.module_name = "decoder.stages[-1]"

    @property
    def features(self) -> torch.Tensor:
        return self.output
