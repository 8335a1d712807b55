"""Which groups and trajectories reach the learner: async dynamic sampling, the void-turn filter and
GRPO-RoC's down-sampling of correct traces.

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

Void turns (SimpleTIR, arXiv:2509.02479, section 3): a turn "that yields neither a complete code
block nor a final answer" (an early EOS, rambling cut by the length limit). SimpleTIR removes every
trajectory holding one from the policy update (here the group's advantages still include it)
because the low-probability tokens of such turns drive the gradient-norm explosions of multi-turn
TIR. In a CIR rollout every turn but the last ends at the close of a ```python block, so only the
last turn can be void: it is when the trajectory has no final answer (the scorer found no \\boxed{}
outside interpreter output) and its last turn holds no closed block (beyond the budget, blocks are
closed but not run: num_code_blocks > num_executed). `void_turn_reason` names it: TRUNCATED when the
response limit cut it, NO_ANSWER when the model stopped.

Resample-on-Correct (rStar2-Agent, arXiv:2508.20722, section 3.2 "GRPO-RoC"; reference code
volcengine/verl recipe/rstar2_agent/src/down_sample/roc.py): each prompt is sampled
`roc_oversample` x n times, then down-sampled to n before advantages are computed. The group's
share of failures and successes is kept (rounded, at least one of each when both exist, so a mixed
group stays mixed). Failures are drawn uniformly (their variety of mistakes is the signal);
successes are the ones with the lowest penalty = tool-error ratio (erroring calls / calls, 0.5 for a
trace without calls, as the reference) + format penalty (min((boxed answers - 1) / turns, 1); 1
without any answer), ties broken at random. So the positive signal favours clean tool use.

What this module does not do: talk to actors, or hold groups (control/replay_buffer.py) or admission state
(control/budget_scheduler.py); those call in here with a few lines.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from enum import StrEnum

from cir_actors.scoring.scorer import strip_output_blocks
from cir_actors.types import FinishReason, ScoredTrajectory, VerdictReason

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


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

    def restore(self, state: dict[str, float]) -> None:
        """Continue from `state()` of a checkpoint: a resumed run admits ahead by the rate it had
        measured instead of relearning it (and starving the learner while it does)."""
        self.rate = float(state["zero_variance_rate"])
        self.inspected = int(state["zero_variance_inspected"])
        self.zero_variance = int(state["zero_variance_dropped"])


class VoidTurn(StrEnum):
    """Why a trajectory's last turn is void (SimpleTIR)."""

    TRUNCATED = "truncated"  # cut by the response limit with neither a closed block nor an answer
    NO_ANSWER = "no_answer"  # the model stopped with neither a closed block nor an answer


def void_turn_reason(st: ScoredTrajectory) -> VoidTurn | None:
    """The void turn of a scored trajectory, or None when every turn produced a block or an answer."""
    t = st.trajectory
    if t.finish_reason == FinishReason.ABORTED or st.verdict.reason != VerdictReason.NO_BOX:
        return None
    if t.num_code_blocks > t.num_executed:  # the last turn closed a block (past the budget, not run)
        return None
    return VoidTurn.TRUNCATED if t.finish_reason == FinishReason.LENGTH else VoidTurn.NO_ANSWER


def roc_penalty(st: ScoredTrajectory) -> float:
    """rStar2-Agent's penalty of a trace: tool-error ratio + answer-format penalty (lower is cleaner)."""
    t = st.trajectory
    calls = len(t.tool_calls) or t.num_executed
    errors = sum(1 for c in t.tool_calls if not c.get("ok", True)) if t.tool_calls else t.num_interp_errors
    err = errors / calls if calls else 0.5
    answers = len(_BOXED.findall(strip_output_blocks(t.response_text)))
    turns = t.num_code_blocks + 1
    fmt = 1.0 if answers == 0 else min((answers - 1) / turns, 1.0)
    return err + fmt


def roc_down_sample(group: Sequence[ScoredTrajectory], n: int, rng: random.Random) -> list[ScoredTrajectory]:
    """GRPO-RoC: `n` of the group's traces (the group unchanged when it has n or fewer), in their
    original order: failures (verdict not correct) uniformly at random, successes by lowest
    `roc_penalty`, the two in the group's proportions."""
    if len(group) <= n:
        return list(group)
    pos = [i for i, st in enumerate(group) if st.verdict.correct]
    neg = [i for i, st in enumerate(group) if not st.verdict.correct]
    k_neg = round(len(neg) * n / len(group))
    if pos and neg:
        k_neg = min(max(k_neg, 1), n - 1)
    k_neg = min(k_neg, len(neg))
    k_pos = min(n - k_neg, len(pos))
    k_neg = n - k_pos  # fill from the failures when there are too few successes
    keys = {i: (roc_penalty(group[i]), rng.random()) for i in pos}
    chosen = sorted(pos, key=keys.__getitem__)[:k_pos] + rng.sample(neg, k_neg)
    return [group[i] for i in sorted(chosen)]


def roc_group_size(n: int, roc: bool, oversample: float) -> int:
    """Samples to generate per prompt: n, or ceil(oversample x n) under GRPO-RoC (rStar2-Agent: 2n)."""
    return math.ceil(n * oversample - 1e-9) if roc else n
