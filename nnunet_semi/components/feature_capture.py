"""Reading intermediate outputs of a network during its forward (decoder features), torch.compile-safe."""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

# By default torch.compile does not guard on module hooks: a graph traced without DecoderFeatures' hook (for this
# network, or for another network of the same class earlier in the process, e.g. the benchmark's stock run) is
# reused and the hook never runs. Guarding on hooks costs a recompile when hooks change, nothing per step. Set at
# import, before nnU-Net compiles anything, so that every graph of the process carries the guard.
torch._dynamo.config.skip_nnmodule_hook_guards = False


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
