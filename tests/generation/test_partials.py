"""Partial trajectories in the rollout state machine: streamed at each segment boundary, continued
by another sampler (another generator) with exactly the ids, masks and versions an uninterrupted
rollout has, the interpreter session rebuilt (with the real sandbox) from the partial's blocks.

Scripted token streams as in test_rollout.py; the engine paths are in tests/control/test_chaos.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from test_rollout import (
    BLOCK,
    EOS,
    FakeCodec,
    FakeInterpreter,
    FakeSampler,
    Segment,
    check_invariants,
    make_task,
)

from cir_actors.generation.rollout import RolloutLimits, SegmentEnd, run_rollout
from cir_actors.sandbox.pool import InterpreterPool, format_output
from cir_actors.serialization import decode_partial, encode_partial
from cir_actors.types import ExecResult


def _run(codec, script, *, interp=None, resume=None, every=0, sessions=False, sample_index=0, budget=2):
    """(trajectory, partials streamed, sampler, interpreter)."""
    sampler = FakeSampler(codec, script)
    interp = interp or FakeInterpreter()
    partials = []

    async def on_partial(p):
        partials.append(p)

    limits = RolloutLimits(max_response_tokens=200, use_sessions=sessions, partial_every_tokens=every)
    traj = asyncio.run(run_rollout(make_task(codec), sample_index, budget, sampler=sampler, interpreter=interp,
                                   codec=codec, format_output=format_output, limits=limits, resume=resume,
                                   on_partial=on_partial))
    return traj, partials, sampler, interp


def test_continued_after_an_interpreter_call_equals_the_uninterrupted_rollout():
    codec = FakeCodec()
    tail = [" so", " \\boxed{42}", EOS]
    # Reference: one generator, the first segment at version 0, the second at version 5.
    ref, ref_partials, _, _ = _run(codec, [Segment(BLOCK, version=0), Segment(list(tail), version=5)])
    # The same trajectory whose generator dies in its second segment (after streaming the partial)...
    dead, partials, _, _ = _run(codec, [Segment(BLOCK, version=0), Segment([" so"], end=SegmentEnd.ABORTED)])
    assert dead.finish_reason == "aborted" and len(partials) == 1
    partial = decode_partial(encode_partial(partials[0]))  # as a checkpoint holds it
    out = format_output(ExecResult(ok=True, stdout="ran 1\n"), 400)  # FakeInterpreter's answer to a first call
    assert partial.response_len == len(BLOCK) + len(codec.encode(out)) and partial.context_start == len(partial.token_ids_T)
    # ...continued on another generator serving version 5.
    interp = FakeInterpreter()
    cont, later, sampler, _ = _run(codec, [Segment(list(tail), version=5)], interp=interp, resume=partial)
    check_invariants(cont, codec)
    assert interp.calls == []  # the block already ran; no session to rebuild
    assert sampler.calls[0][0] == partial.token_ids_T.tolist()  # the request continues from the partial's ids
    for field in ("token_ids_T", "loss_mask_T", "logprobs_T", "versions_T"):
        np.testing.assert_array_equal(getattr(cont, field), getattr(ref, field), err_msg=field)
    n_out = len(codec.encode(out))
    assert cont.versions_T[cont.prompt_len:].tolist() == [0] * len(BLOCK) + [-1] * n_out + [5] * len(tail)
    assert (cont.num_code_blocks, cont.num_executed, cont.finish_reason) == (1, 1, ref.finish_reason)
    assert cont.response_text == ref.response_text and cont.sampled_text == ref.sampled_text
    assert cont.tool_calls == ref.tool_calls
    assert cont.continued_tokens == partial.response_len and ref.continued_tokens == 0
    assert len(ref_partials) == 1 and later == []  # one boundary (after the call); none in the tail


def test_interrupted_inside_a_block_is_continued_and_the_block_runs():
    codec = FakeCodec()
    script = [Segment(["Let", "```python", "\nprint(1)"], end=SegmentEnd.INTERRUPTED, version=0),
              Segment([" x"], end=SegmentEnd.ABORTED)]
    _, partials, _, _ = _run(codec, script)
    assert len(partials) == 1 and partials[0].context_start == 0  # the interruption is a boundary
    cont, _, _, interp = _run(codec, [Segment(["\n", "```", "junk"], version=1), Segment([EOS], version=1)],
                              resume=partials[0])
    check_invariants(cont, codec)
    assert interp.calls == ["print(1)"] and "junk" not in cont.response_text
    assert cont.versions_T[cont.prompt_len:cont.prompt_len + 3].tolist() == [0, 0, 0]


def test_every_n_tokens_streams_growing_partials_without_cutting_the_request():
    codec = FakeCodec()
    pieces = ["a", "b", "c", "d", "e", "f", "g", EOS]
    plain, none, _, _ = _run(codec, [Segment(list(pieces))])
    every, partials, sampler, _ = _run(codec, [Segment(list(pieces))], every=3)
    assert none == []
    for field in ("token_ids_T", "loss_mask_T", "logprobs_T", "versions_T"):
        np.testing.assert_array_equal(getattr(every, field), getattr(plain, field), err_msg=field)
    assert [p.response_len for p in partials] == [3, 6] and len(sampler.calls) == 1
    # a mid-segment partial continues like any other: the rest of the segment, then the end
    cont, _, _, _ = _run(codec, [Segment(["g", EOS])], resume=partials[1])
    np.testing.assert_array_equal(cont.token_ids_T, plain.token_ids_T)


def test_a_partial_of_another_sample_is_refused():
    codec = FakeCodec()
    _, partials, _, _ = _run(codec, [Segment(BLOCK), Segment([" so"], end=SegmentEnd.ABORTED)])
    with pytest.raises(ValueError, match="cannot continue"):
        _run(codec, [Segment([EOS])], resume=partials[0], sample_index=1)


def test_the_continuation_sees_the_sessions_earlier_variables():
    """Real sandbox with sessions: `x = 6*7` runs on the first generator, which dies; the second
    rebuilds the session from the partial's replay log and its `print(x)` prints 42."""
    codec = FakeCodec()
    first = ["```python", "\nx = 6*7\n", "```"]
    with InterpreterPool(timeout_s=5.0, max_workers=2, sessions=True) as pool:
        _, partials, _, _ = _run(codec, [Segment(first), Segment(["hm"], end=SegmentEnd.ABORTED)], interp=pool,
                                 sessions=True)
        assert [c["code"] for c in partials[0].tool_calls] == ["x = 6*7"]
        second = ["```python", "\nprint(x)\n", "```"]
        cont, _, _, _ = _run(codec, [Segment(second, version=1), Segment(["\\boxed{42}", EOS], version=1)],
                             interp=pool, resume=partials[0], sessions=True)
    check_invariants(cont, codec)
    assert [c["code"] for c in cont.tool_calls] == ["x = 6*7", "print(x)"]
    assert cont.tool_calls[1]["ok"] and "42" in cont.tool_calls[1]["output"], cont.tool_calls[1]
    assert cont.num_executed == 2


def test_tool_wait_is_split_into_execution_and_the_rest():
    codec = FakeCodec()

    class Slow(FakeInterpreter):
        async def run_async(self, code, *, timeout_s=None, session=None):
            await asyncio.sleep(0.05)  # queued / in transit
            return ExecResult(ok=True, stdout="42\n", duration_s=0.01)

    traj, _, _, _ = _run(codec, [Segment(BLOCK), Segment([EOS])], interp=Slow())
    assert traj.interp_exec_s == pytest.approx(0.01) and traj.interp_wait_s >= 0.05
