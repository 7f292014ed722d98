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
