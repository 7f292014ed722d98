"""Weight schedules as pure functions of the global training step (so they resume exactly after ``--c``)."""

from __future__ import annotations

import math


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """exp(-5 (1 - t)^2) with t = step / rampup_steps clipped to [0, 1] (Laine & Aila; Tarvainen & Valpola).

    Returns 1.0 for ``rampup_steps <= 0`` (no ramp).
    """
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step, 0), rampup_steps) / rampup_steps
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def step_decay(step: int, max_steps: int, steps: int, factor: float) -> float:
    """``factor`` to the number of whole ``max_steps / steps`` intervals before ``step``: 1 for the first interval,
    ``factor`` for the second, ... (BCP's release: x0.1 every 2 500 of 15 000 iterations is steps 6, factor 0.1)."""
    return factor ** math.floor(max(step, 0) * steps / max_steps)


class StepDecayLRScheduler:
    """nnU-Net's learning-rate scheduler interface (``step(current_epoch)``, as ``PolyLRScheduler``) with a step
    decay instead of the poly one: every parameter group gets ``initial_lr * step_decay(...)``."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, steps: int = 6, factor: float = 0.1):
        self.optimizer, self.initial_lr, self.max_steps, self.steps, self.factor = \
            optimizer, initial_lr, max_steps, steps, factor
        self.ctr = 0
        self.step(0)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        lr = self.initial_lr * step_decay(current_step, self.max_steps, self.steps, self.factor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict:
        return {"ctr": self.ctr}

    def load_state_dict(self, state: dict) -> None:
        self.ctr = state["ctr"]
