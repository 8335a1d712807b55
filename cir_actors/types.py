"""Every message that crosses an actor boundary, in one place.

Each type states its invariant in its docstring. Arrays are numpy so that a trajectory put into the
Ray object store is read zero-copy by the learner. What this module does not hold: configuration
(`config.py`) and anything that needs torch, vLLM or Ray to import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np


class FinishReason(StrEnum):
    """Why a trajectory stopped."""

    STOP = "stop"  # the model ended its answer (EOS / stop token) within budget
    LENGTH = "length"  # the response reached its token limit (interpreter tokens count)
    BUDGET = "budget"  # the model stopped after the tool-call budget was spent (code beyond it was not run)
    ABORTED = "aborted"  # cancelled (shutdown, or a failure of the engine); never trained on


class VerdictReason(StrEnum):
    """Why a scorer said what it said."""

    CORRECT = "correct"
    WRONG = "wrong"
    NO_BOX = "no_box"  # no \\boxed{} outside interpreter output
    PARSE_FAILURE = "parse_failure"  # math-verify could not parse the prediction or the gold answer
    TIMEOUT = "timeout"  # equivalence check exceeded the scorer deadline


class DropReason(StrEnum):
    """Why accepted data never reached the learner (the buffer counts each)."""

    STALE = "stale"  # older than the staleness bound when it would have been trained on
    ABORTED = "aborted"  # the trajectory was aborted (generator shutdown or failure)
    ZERO_ADVANTAGE = "zero_advantage"  # every sample of the group got the same reward
    INFRA = "infra"  # an interpreter or scorer could not serve it, even after retries (never scored)
    GENERATOR_LOST = "generator_lost"  # its generator died while the group was in flight (prompt re-admitted)
    LOST = "lost"  # a served sample's object was gone when the learner fetched it (node lost)
    RESUMED = "resumed"  # in flight at the checkpoint a run resumed from (prompt re-admitted)
    DUPLICATE = "duplicate"  # a continued sample arrived after the dead generator's own copy (one is kept)


class LearnerHung(TimeoutError):
    """A call to the learner ranks did not finish within `recovery.learner_timeout_s` (a rank is
    stuck or stopped); the trainer treats it like a dead rank."""


class InfraFault(RuntimeError):
    """An infrastructure failure (an interpreter or scorer that cannot serve even after retries).

    Raised, never returned as an observation or a verdict: the trajectory it hit is dropped with
    DropReason.INFRA and counted, never scored or trained on.
    """


class ProbeFailed(RuntimeError):
    """A role failed its set-up probe (one real call with a known answer, before any rollout); the
    message is one sentence naming the role's actor and what it answered."""


def last_error_line(e: BaseException, limit: int = 300) -> str:
    """The last non-empty line of an error's text: for a Ray error, whose text holds the remote
    traceback, that is the remote exception's `Type: message`."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:limit]


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one interpreter call. Never raised: every failure is a field.

    `ok` is True only when the code ran to completion without an exception, timeout or kill.
    `error` is None when ok; otherwise the last line of the traceback (`NameError: ...`) or a reason
    (`Timeout`, `MemoryError`, `Killed by signal 9`, `OutputLimitExceeded`).
    """

    ok: bool
    stdout: str
    error: str | None = None
    timed_out: bool = False
    truncated: bool = False
    killed_by: int | None = None  # signal number when the child was killed
    duration_s: float = 0.0


@dataclass(frozen=True)
class Verdict:
    """A scorer's judgement of one response. `correct` implies reason == CORRECT."""

    correct: bool
    predicted: str | None
    reason: VerdictReason
    duration_s: float = 0.0


@dataclass(frozen=True)
class Task:
    """One problem: what the model is asked and the gold answer it is scored against.

    `prompt_token_ids` is the tokenized prompt (instruction + question, through the chat template
    when the config asks for it); the generator never re-tokenizes `prompt_text`.
    """

    task_id: str
    problem: str
    gold: str
    prompt_text: str
    prompt_token_ids: tuple[int, ...]
    subject: str | None = None


@dataclass(frozen=True)
class Trajectory:
    """One multi-turn sample for one task: prompt, model segments and interpreter segments.

    Invariant: token_ids_T, loss_mask_T, logprobs_T and versions_T share one length T, and the first
    `prompt_len` entries are the prompt. loss_mask is 1 exactly on tokens the model sampled; on
    those logprobs holds the behaviour log-probability and versions the policy version that
    sampled it. Elsewhere (prompt, interpreter output) loss_mask is 0, logprobs 0.0, versions -1.
    """

    task_id: str
    sample_index: int
    token_ids_T: np.ndarray  # int32
    loss_mask_T: np.ndarray  # int8
    logprobs_T: np.ndarray  # float32
    versions_T: np.ndarray  # int32
    prompt_len: int
    finish_reason: FinishReason
    budget: int  # the tool-call budget this trajectory ran with
    num_code_blocks: int = 0  # closed ```python blocks the model wrote
    num_executed: int = 0  # of those, run in the interpreter (<= budget)
    num_interp_errors: int = 0
    num_interp_timeouts: int = 0
    gen_time_s: float = 0.0
    interp_wait_s: float = 0.0  # waiting for the interpreter in all (queue + execution)
    interp_exec_s: float = 0.0  # of which the programs ran (ExecResult.duration_s)
    response_text: str = ""  # decoded response (interpreter output included), for inspection; never trained on
    # Only what the model sampled (the loss mask's runs of 1 in the response, each decoded alone, joined
    # by "\n"): the scorer reads the answer from this, so interpreter output can never be the answer.
    sampled_text: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()  # per executed block: code, ok, error, output (truncated)
    continued_tokens: int = 0  # response tokens inherited from a partial another process streamed

    def __post_init__(self) -> None:
        n = len(self.token_ids_T)
        lengths = (len(self.loss_mask_T), len(self.logprobs_T), len(self.versions_T))
        if any(length != n for length in lengths):
            raise ValueError(f"trajectory arrays differ in length: token_ids {n}, mask/logprobs/versions {lengths}")
        if not 0 < self.prompt_len <= n:
            raise ValueError(f"prompt_len {self.prompt_len} outside (0, {n}]")

    @property
    def response_len(self) -> int:
        return len(self.token_ids_T) - self.prompt_len

    @property
    def num_sampled(self) -> int:
        return int(self.loss_mask_T.sum())

    def min_version(self) -> int:
        """Oldest policy version among sampled tokens (-1 if none was sampled)."""
        sampled = self.versions_T[self.loss_mask_T.astype(bool)]
        return int(sampled.min()) if len(sampled) else -1


@dataclass(frozen=True)
class PartialTrajectory:
    """An unfinished trajectory as its generator streamed it at a segment boundary (after an
    interpreter call, at an interruption for a weight update, every `generator.partial_every_tokens`),
    so that any generator can continue it (`rollout.run_rollout(resume=...)`).

    Invariant: the arrays mean what a Trajectory's mean (same length T, the prompt first, versions
    per sampled token). `context_start` is where the text that may still hold an unclosed ```python
    block starts (just past the last interpreter output; 0 before any). `tool_calls` are the blocks
    run so far, in order: their code is the interpreter session's replay log. No block is pending.
    """

    task_id: str
    sample_index: int
    token_ids_T: np.ndarray  # int32
    loss_mask_T: np.ndarray  # int8
    logprobs_T: np.ndarray  # float32
    versions_T: np.ndarray  # int32
    prompt_len: int
    budget: int
    context_start: int
    num_code_blocks: int = 0
    num_executed: int = 0
    num_interp_errors: int = 0
    num_interp_timeouts: int = 0
    gen_time_s: float = 0.0
    interp_wait_s: float = 0.0
    interp_exec_s: float = 0.0
    tool_calls: tuple[dict[str, Any], ...] = ()
    continued_tokens: int = 0  # of the response, tokens that came from an earlier partial

    def __post_init__(self) -> None:
        n = len(self.token_ids_T)
        if any(len(a) != n for a in (self.loss_mask_T, self.logprobs_T, self.versions_T)):
            raise ValueError("partial trajectory arrays differ in length")
        if not 0 < self.prompt_len <= n or not 0 <= self.context_start <= n:
            raise ValueError(f"prompt_len {self.prompt_len} / context_start {self.context_start} outside [0, {n}]")

    @property
    def response_len(self) -> int:
        return len(self.token_ids_T) - self.prompt_len

    def min_version(self) -> int:
        """Oldest policy version among sampled tokens (-1 if none was sampled)."""
        sampled = self.versions_T[self.loss_mask_T.astype(bool)]
        return int(sampled.min()) if len(sampled) else -1


@dataclass(frozen=True)
class ScoredTrajectory:
    """A trajectory with its verdict and the reward the training config derives from it."""

    trajectory: Trajectory
    verdict: Verdict
    reward: float


@dataclass(frozen=True)
class GroupRequest:
    """The scheduler's admission of one prompt group: n samples of `task` under `budget`.

    `admitted_version` is the learner version when admitted; staleness is measured from it.
    `continued`: the group was in flight on a generator that died, or at the checkpoint a run resumed
    from; the buffer holds its finished samples and streamed partials, which the generator continues
    (`buffer.continuation(group_id)`) instead of starting over.
    """

    group_id: int
    task: Task
    n: int
    budget: int
    admitted_version: int
    continued: bool = False


@dataclass(frozen=True)
class SharedWeights:
    """Where one publication lies in the learner's shared-memory region (`learning/shared_weights.py`):
    the region's file under /dev/shm, the Ray node it is on, the slot (0 or 1) holding `version`,
    and the layout, (hf_name, dtype name, shape, byte offset in the slot) per tensor, in publication
    order. Only a reader on `node_id` can use it; the slot holds `version` until the version after
    the next one is written there."""

    path: str
    node_id: str
    slot: int
    version: int
    layout: tuple[tuple[str, str, tuple[int, ...], int], ...]


@dataclass(frozen=True)
class PolicyUpdate:
    """What the scheduler broadcasts to every generator, in one message so that a generator never
    serves new weights with an old budget or the reverse.

    `weights` is a Ray ObjectRef to a {hf_name: tensor} state dict (object-store path), or None when
    the weights arrive by collective broadcast (then `broadcast_group` names the group) or only
    through shared memory (`shared_memory`, for generators on the learner's node; when some
    generator is elsewhere, `weights` is set too and those read it).
    `checksum` is what the generator must echo back after loading.
    `incarnation` counts the starts of the run's stateful roles within one driver (0, then +1 per
    automatic resume): versions are ordered within an incarnation only, and a generator kept across
    a resume loads no update of an earlier one (`Generator.update_weights`).
    """

    version: int
    budget: int
    weights: Any = None
    checksum: str = ""
    broadcast_group: str | None = None
    shared_memory: SharedWeights | None = None
    incarnation: int = 0


@dataclass(frozen=True)
class ServedPolicy:
    """A generator's report of what it serves: version, budget and the checksum of loaded weights."""

    generator: str
    version: int
    budget: int
    checksum: str


@dataclass(frozen=True)
class TrainBatch:
    """What the buffer hands the learner: complete groups, each a list of n object refs to
    ScoredTrajectory, plus the bookkeeping to account for them."""

    groups: list[list[Any]]
    group_ids: list[int]
    admitted_versions: list[int]
    dropped: dict[str, int] = field(default_factory=dict)
    metas: list[list[dict[str, float]]] = field(default_factory=list)  # per group, per sample: reward, staleness, ...


def replace(obj: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported so callers need not import dataclasses for one call."""
    return dataclasses.replace(obj, **changes)


class Interpreter(Protocol):
    """What a generator needs from the interpreter pool (a local pool or a Ray actor behind an adapter)."""

    async def run_async(self, code: str, *, timeout_s: float | None = None, session: str | None = None) -> ExecResult:
        """Run `code`; never raises for anything the code does."""
        ...

    async def close_session_async(self, session: str) -> None:
        """Forget a session's state (no-op when sessions are off or the session is unknown)."""
        ...
