"""Which groups reach the learner: async dynamic sampling.

Dynamic sampling (DAPO, arXiv:2503.14476, section 3.2 "Dynamic Sampling"): a GRPO group whose n
samples all got the same reward has zero advantage everywhere and carries no gradient, so it is
filtered out and the batch is filled with other groups. DAPO does this synchronously (sample, filter,
sample more until the batch is full). Here generation runs ahead of the learner, so the filter would
make the learner wait while replacements are generated (the demo: 16 s a step instead of 4). Instead
the scheduler admits ahead by the measured zero-variance rate r: to keep a window of W groups useful
it admits W / (1 - r), i.e. `ZeroVarianceRate.extra_groups(W)` more than the plain bound. The rate
is an exponential moving average over what the buffer inspected at each serve (groups served plus
groups dropped for zero variance). A dropped group is released (its admission slot is freed) and
its prompt counts as consumed: it is not re-queued.

What this module does not do: talk to actors, or hold groups (replay_buffer.py) or admission state
(budget_scheduler.py); those call in here with a few lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def is_zero_variance(rewards: Sequence[float]) -> bool:
    """True when every reward of the group is the same (no GRPO signal)."""
    return len({float(r) for r in rewards}) <= 1


class ZeroVarianceRate:
    """EMA of the fraction of inspected groups found with zero reward variance, and the admission
    headroom it implies. `max_oversample` caps the factor 1 / (1 - r) (a run where every group is
    all-right or all-wrong must not admit without bound)."""

    def __init__(self, ema: float = 0.3, max_oversample: float = 3.0, initial_rate: float = 0.0):
        if not 0 < ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if max_oversample < 1:
            raise ValueError(f"max_oversample must be >= 1, got {max_oversample}")
        self.ema = ema
        self.max_oversample = max_oversample
        self.rate = float(initial_rate)
        self.inspected = 0
        self.zero_variance = 0

    def observe(self, inspected: int, zero_variance: int) -> None:
        """One serve: `inspected` groups looked at, `zero_variance` of them dropped for it."""
        if inspected <= 0:
            return
        self.inspected += inspected
        self.zero_variance += zero_variance
        sample = zero_variance / inspected
        self.rate = (1 - self.ema) * self.rate + self.ema * sample

    def factor(self) -> float:
        """Admission over-sampling factor 1 / (1 - r), capped at max_oversample."""
        r = min(self.rate, 1.0 - 1.0 / self.max_oversample)
        return 1.0 / (1.0 - r)

    def extra_groups(self, window: int) -> int:
        """Groups to admit on top of `window` so that about `window` survive the filter."""
        return math.ceil(window * (self.factor() - 1.0) - 1e-9)

    def state(self) -> dict[str, float]:
        return {"zero_variance_rate": self.rate, "oversample_factor": self.factor(),
                "zero_variance_inspected": self.inspected, "zero_variance_dropped": self.zero_variance}
