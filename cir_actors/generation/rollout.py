"""The multi-turn code-integrated rollout as a pure state machine (no vLLM, no Ray).

One trajectory alternates *model segments* (streamed from a `SegmentSampler`) and *interpreter
segments* (an `Interpreter` call, formatted and tokenized once on its own). A model segment ends
at the close of a ```python block (the block is cut at the token that completes the closing fence
and the rest of the stream is discarded), at EOS, at the response limit, or when the sampler is
interrupted by a weight update (the tokens so far are kept and the next request continues from
them, possibly on newer weights). A prompt that ends with a closed ```python block has that block
run first (e.g. a partial solution handed in), and one that ends inside a block is closed by the
model as if it had opened it. Beyond the tool-call budget, closed blocks are counted but not
run and the model goes on (CIR's behaviour); the finish reason then says BUDGET.

Token-in, token-out: the trajectory is the prompt ids, then exactly the ids the sampler returned
and the ids of each formatted interpreter output; nothing is decoded and re-encoded. The response
limit counts interpreter tokens (as CIR's did); an interpreter segment that would cross it is cut.

What this module does not do: talk to an engine, decide *when* weights change (generation/generator.py), or
format interpreter output (the generator passes interpreter.format_output in).

Partial trajectories: with `on_partial`, the state is handed out as a `PartialTrajectory` at each
segment boundary (after an interpreter output, at an interruption, every `partial_every_tokens`
sampled tokens); `resume=` continues one: the same ids, the new tokens tagged with the sampler's
version, and a session (when sessions are on) rebuilt by running the partial's blocks again first.
"""

from __future__ import annotations

import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from cir_actors.types import ExecResult, FinishReason, Interpreter, PartialTrajectory, Task, Trajectory

CODE_OPEN = "```python"
FENCE = "```"
BOXED = "\\boxed"


class SegmentEnd(StrEnum):
    """How a sampler's stream ended (None while it goes on)."""

    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens (or the engine's context) reached
    INTERRUPTED = "interrupted"  # a weight update aborted it at a token boundary; continue from here
    ABORTED = "aborted"  # shutdown or failure; the trajectory is abandoned


@dataclass
class Delta:
    """One streamed chunk of a model segment: new sampled ids, their behaviour log-probs, the text
    the engine detokenized for them (used only to find the block close), and the end, if any."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    end: SegmentEnd | None = None


class SegmentStream(Protocol):
    """An in-flight model segment. `version` is the policy version that samples every token of it."""

    version: int

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    async def aclose(self) -> None:
        """Stop sampling (the engine request is aborted); safe to call after the stream ended."""
        ...


class SegmentSampler(Protocol):
    """What a rollout needs from an engine."""

    async def open(self, token_ids: Sequence[int], max_tokens: int) -> SegmentStream:
        """Start sampling a continuation of `token_ids` (waits while a weight update is in progress)."""
        ...


class TokenCodec(Protocol):
    """The model's tokenizer, reduced to what a rollout uses."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class RolloutLimits:
    max_response_tokens: int
    output_max_chars: int = 400
    interpreter_timeout_s: float | None = None  # None: the interpreter's own default
    use_sessions: bool = False
    partial_every_tokens: int = 0  # also stream a partial every this many sampled tokens (the request goes on)
    stop_at_answer: bool = False  # end the trajectory at the close of its first \\boxed{} outside a code block


@dataclass(frozen=True)
class CodeBlock:
    code: str
    end: int  # offset just past the closing fence, in the scanner's text


class BlockScanner:
    """Finds closed ```python blocks in text that arrives piece by piece.

    `carry` is text before the first piece that may hold an open block (the prompt's tail when a
    prompt ends inside a block). A block is `CODE_OPEN`, anything, then the next `FENCE`.
    """

    def __init__(self, carry: str = "") -> None:
        self.text = carry
        self.pos = 0  # blocks end before this offset
        self._open: int | None = None  # offset of an opening not closed yet
        self._hint = 0  # no match can start before this offset (keeps each feed's search short)
        self._answer_hint = 0  # as _hint, for answer_end: text before it holds no answer

    def feed(self, piece: str) -> None:
        self.text += piece

    def next_block(self) -> CodeBlock | None:
        """The first closed block starting at or after the cursor (the cursor then moves past it)."""
        if self._open is None:
            start = self.text.find(CODE_OPEN, self._hint)
            if start < 0:
                self._hint = max(self.pos, len(self.text) - len(CODE_OPEN) + 1)
                return None
            self._open, self._hint = start, start + len(CODE_OPEN)
        body = self._open + len(CODE_OPEN)
        close = self.text.find(FENCE, self._hint)
        if close < 0:
            self._hint = max(body, len(self.text) - len(FENCE) + 1)
            return None
        end = close + len(FENCE)
        code = self.text[body:close]
        self.pos = self._hint = end
        self._open = None
        return CodeBlock(code=textwrap.dedent(code).strip(), end=end)

    def answer_end(self, before: int | None = None) -> int | None:
        """The offset just past the first balanced \\boxed{...} outside every ```python block (an
        unclosed block hides what follows its opening), or None while there is none or it ends
        after `before` (the end of a block that runs first)."""
        text, i = self.text, self._answer_hint
        while True:
            box, code = text.find(BOXED, i), text.find(CODE_OPEN, i)
            if box < 0 and code < 0:
                self._answer_hint = max(i, len(text) - len(CODE_OPEN) + 1)
                return None
            if code >= 0 and (box < 0 or code < box):
                close = text.find(FENCE, code + len(CODE_OPEN))
                if close < 0:
                    self._answer_hint = code
                    return None
                i = close + len(FENCE)
                continue
            j = box + len(BOXED)
            while j < len(text) and text[j] == " ":
                j += 1
            if j == len(text):  # the brace may still come
                self._answer_hint = box
                return None
            if text[j] != "{":  # e.g. \boxedx: not an answer
                i = j
                continue
            depth = 0
            for k in range(j, len(text)):
                depth += {"{": 1, "}": -1}.get(text[k], 0)
                if depth == 0:
                    return k + 1 if before is None or k + 1 <= before else None
            self._answer_hint = box  # open: wait for its close
            return None

    def reset(self) -> None:
        """Forget everything (after an interpreter segment: nothing before it can open a block)."""
        self.text, self.pos, self._open, self._hint, self._answer_hint = "", 0, None, 0, 0


def trailing_block(text: str) -> CodeBlock | None:
    """The closed ```python block `text` ends with (only whitespace after its fence), if any."""
    start = text.rfind(CODE_OPEN)
    if start < 0:
        return None
    scanner = BlockScanner(text[start:])
    block = scanner.next_block()
    if block is None or text[start + block.end :].strip():
        return None
    return block


def open_block_tail(text: str) -> str:
    """The tail of `text` from its last unclosed ```python opening ('' when none is open)."""
    start = text.rfind(CODE_OPEN)
    if start < 0 or text.find(FENCE, start + len(CODE_OPEN)) >= 0:
        return ""
    return text[start:]


@dataclass
class _Builder:
    """The growing trajectory arrays (kept as lists until the end)."""

    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    versions: list[int]
    prompt_len: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_prompt(cls, prompt_ids: Sequence[int]) -> _Builder:
        n = len(prompt_ids)
        return cls(list(prompt_ids), [0] * n, [0.0] * n, [-1] * n, n)

    @classmethod
    def from_partial(cls, p: PartialTrajectory) -> _Builder:
        return cls(p.token_ids_T.tolist(), p.loss_mask_T.tolist(), p.logprobs_T.tolist(), p.versions_T.tolist(),
                   p.prompt_len, [dict(c) for c in p.tool_calls])

    @property
    def response_len(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def add_sampled(self, ids: Sequence[int], logprobs: Sequence[float], version: int) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"sampler returned {len(ids)} token ids but {len(logprobs)} log-probs")
        self.token_ids.extend(ids)
        self.loss_mask.extend([1] * len(ids))
        self.logprobs.extend(logprobs)
        self.versions.extend([version] * len(ids))

    def add_context(self, ids: Sequence[int]) -> None:
        self.token_ids.extend(ids)
        self.loss_mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))
        self.versions.extend([-1] * len(ids))


def sampled_text(codec: TokenCodec, token_ids: Sequence[int], loss_mask: Sequence[int], start: int) -> str:
    """The model's own segments from `start` on: each run of loss_mask 1 decoded alone, joined by "\n".

    This is the text an answer is read from. Interpreter output (loss_mask 0) is left out by its
    token provenance, not by parsing the text: a program can print a closing fence and a \\boxed{}.
    """
    runs: list[list[int]] = []
    prev = 0
    for tok, m in zip(token_ids[start:], loss_mask[start:], strict=True):
        if m:
            if not prev:
                runs.append([])
            runs[-1].append(int(tok))
        prev = m
    return "\n".join(codec.decode(run) for run in runs)


def _tokens_through(codec: TokenCodec, kept: Sequence[int], new: Sequence[int], chars: int) -> int:
    """How many of `new` must follow `kept` for the decoded segment to reach `chars` characters.

    A fence can end inside a token (e.g. a token "```\\n"): that whole token is kept, so the kept ids
    are exactly what the engine sampled and decode(ids) reproduces the text.
    """
    for k in range(1, len(new) + 1):
        if len(codec.decode([*kept, *new[:k]])) >= chars:
            return k
    return len(new)


async def run_rollout(
    task: Task,
    sample_index: int,
    budget: int,
    *,
    sampler: SegmentSampler,
    interpreter: Interpreter,
    codec: TokenCodec,
    format_output: Callable[[ExecResult, int], str],
    limits: RolloutLimits,
    resume: PartialTrajectory | None = None,
    on_partial: Callable[[PartialTrajectory], Awaitable[None]] | None = None,
) -> Trajectory:
    """Sample one trajectory for `task` under a tool-call `budget`, or continue `resume` (see the
    module docstring); `on_partial` receives the state at each segment boundary."""
    session = f"{task.task_id}/{sample_index}/{uuid.uuid4().hex[:8]}" if limits.use_sessions else None
    finish: FinishReason | None = None
    block: CodeBlock | None = None
    if resume is None:
        traj = _Builder.from_prompt(task.prompt_token_ids)
        prompt_text = codec.decode(task.prompt_token_ids)
        scanner = BlockScanner(open_block_tail(prompt_text))
        num_blocks = num_executed = num_errors = num_timeouts = 0
        gen_time = interp_time = interp_exec = 0.0
        context_start = continued = 0
        # A prompt that ends with a closed, not yet executed block has it run before the model goes on.
        block = trailing_block(prompt_text)
        if block is not None:
            num_blocks += 1
            if budget <= 0:
                block = None
    else:
        if (resume.task_id, resume.sample_index, resume.budget) != (task.task_id, sample_index, budget):
            raise ValueError(f"partial of {resume.task_id}/{resume.sample_index} (budget {resume.budget}) "
                             f"cannot continue {task.task_id}/{sample_index} (budget {budget})")
        traj = _Builder.from_partial(resume)
        context_start, continued = resume.context_start, resume.response_len
        scanner = BlockScanner(open_block_tail(codec.decode(traj.token_ids[context_start:])))
        num_blocks, num_executed = resume.num_code_blocks, resume.num_executed
        num_errors, num_timeouts = resume.num_interp_errors, resume.num_interp_timeouts
        gen_time, interp_time, interp_exec = resume.gen_time_s, resume.interp_wait_s, resume.interp_exec_s

    every = limits.partial_every_tokens if on_partial is not None else 0
    streamed_at = traj.response_len  # response length at the last partial streamed

    async def boundary(segment_s: float = 0.0) -> None:
        """Hand the state out (`segment_s`: generation time of the segment under way)."""
        nonlocal streamed_at
        if on_partial is not None:
            streamed_at = traj.response_len
            await on_partial(PartialTrajectory(
                task_id=task.task_id, sample_index=sample_index,
                token_ids_T=np.asarray(traj.token_ids, dtype=np.int32),
                loss_mask_T=np.asarray(traj.loss_mask, dtype=np.int8),
                logprobs_T=np.asarray(traj.logprobs, dtype=np.float32),
                versions_T=np.asarray(traj.versions, dtype=np.int32),
                prompt_len=traj.prompt_len, budget=budget, context_start=context_start,
                num_code_blocks=num_blocks, num_executed=num_executed, num_interp_errors=num_errors,
                num_interp_timeouts=num_timeouts, gen_time_s=gen_time + segment_s, interp_wait_s=interp_time,
                interp_exec_s=interp_exec, tool_calls=tuple(traj.tool_calls), continued_tokens=continued,
            ))

    try:
        if resume is not None and session is not None:  # rebuild the session: its blocks again, outputs dropped
            t1 = time.perf_counter()
            for call in resume.tool_calls:
                await interpreter.run_async(call["code"], timeout_s=limits.interpreter_timeout_s, session=session)
            interp_time += time.perf_counter() - t1
        while finish is None:
            if block is not None:
                if traj.response_len >= limits.max_response_tokens:
                    finish = FinishReason.LENGTH  # no room for any output: do not run the block
                    break
                t1 = time.perf_counter()
                result = await interpreter.run_async(block.code, timeout_s=limits.interpreter_timeout_s, session=session)
                interp_time += time.perf_counter() - t1
                interp_exec += result.duration_s
                num_executed += 1
                num_errors += int(not result.ok and not result.timed_out)
                num_timeouts += int(result.timed_out)
                output = format_output(result, limits.output_max_chars)
                out_ids = codec.encode(output)
                room = limits.max_response_tokens - traj.response_len
                traj.add_context(out_ids[:room])
                traj.tool_calls.append(
                    {"code": block.code, "ok": result.ok, "error": result.error, "timed_out": result.timed_out,
                     "output": output, "duration_s": result.duration_s}
                )
                scanner.reset()
                context_start = len(traj.token_ids)
                block = None
                if len(out_ids) >= room:
                    finish = FinishReason.LENGTH
                else:
                    await boundary()
                continue

            remaining = limits.max_response_tokens - traj.response_len
            if remaining <= 0:
                finish = FinishReason.LENGTH
                break
            t0 = time.perf_counter()
            stream = await sampler.open(traj.token_ids, remaining)
            seg_ids: list[int] = []
            seg_base = len(scanner.text)  # scanner offset where this segment's text starts
            end: SegmentEnd | None = None
            try:
                async for delta in stream:
                    scanner.feed(delta.text)
                    found = scanner.next_block()
                    skipped: list[int] = []  # ends of blocks beyond the budget: kept as text, not run
                    while found is not None and num_executed >= budget:
                        skipped.append(found.end)
                        found = scanner.next_block()
                    answer = scanner.answer_end(found.end if found else None) if limits.stop_at_answer else None
                    num_blocks += sum(e <= (answer or e) for e in skipped)
                    if answer is not None:  # before the block to run, if any: the response ends here
                        k = _tokens_through(codec, seg_ids, delta.token_ids, answer - seg_base)
                        traj.add_sampled(delta.token_ids[:k], delta.logprobs[:k], stream.version)
                        seg_ids.extend(delta.token_ids[:k])
                        end = SegmentEnd.STOP
                        break
                    if found is not None:
                        num_blocks += 1
                        k = _tokens_through(codec, seg_ids, delta.token_ids, found.end - seg_base)
                        traj.add_sampled(delta.token_ids[:k], delta.logprobs[:k], stream.version)
                        seg_ids.extend(delta.token_ids[:k])
                        block = found
                        break
                    traj.add_sampled(delta.token_ids, delta.logprobs, stream.version)
                    seg_ids.extend(delta.token_ids)
                    if delta.end is not None:
                        end = delta.end
                        break
                    if every > 0 and traj.response_len - streamed_at >= every:
                        # mid-segment: the request goes on (the engine keeps sampling meanwhile)
                        await boundary(time.perf_counter() - t0)
            finally:
                await stream.aclose()
            gen_time += time.perf_counter() - t0

            if block is not None:
                continue
            if end is None or end == SegmentEnd.ABORTED:
                finish = FinishReason.ABORTED
            elif end == SegmentEnd.STOP:
                finish = FinishReason.BUDGET if num_blocks > num_executed else FinishReason.STOP
            elif end == SegmentEnd.LENGTH:
                finish = FinishReason.LENGTH
            else:  # INTERRUPTED: the next request continues from the tokens kept so far
                await boundary()
    finally:
        if session is not None:
            await interpreter.close_session_async(session)

    response_ids = traj.token_ids[traj.prompt_len:]
    return Trajectory(
        task_id=task.task_id,
        sample_index=sample_index,
        token_ids_T=np.asarray(traj.token_ids, dtype=np.int32),
        loss_mask_T=np.asarray(traj.loss_mask, dtype=np.int8),
        logprobs_T=np.asarray(traj.logprobs, dtype=np.float32),
        versions_T=np.asarray(traj.versions, dtype=np.int32),
        prompt_len=traj.prompt_len,
        finish_reason=finish,
        budget=budget,
        num_code_blocks=num_blocks,
        num_executed=num_executed,
        num_interp_errors=num_errors,
        num_interp_timeouts=num_timeouts,
        gen_time_s=gen_time,
        interp_wait_s=interp_time,
        interp_exec_s=interp_exec,
        response_text=codec.decode(response_ids),
        sampled_text=sampled_text(codec, traj.token_ids, traj.loss_mask, traj.prompt_len),
        tool_calls=tuple(traj.tool_calls),
        continued_tokens=continued,
    )
