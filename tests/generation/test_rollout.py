"""The rollout state machine against scripted token streams (no engine, no sandbox)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from cir_actors.generation.rollout import (
    BlockScanner,
    Delta,
    RolloutLimits,
    SegmentEnd,
    open_block_tail,
    run_rollout,
    trailing_block,
)
from cir_actors.sandbox.pool import format_output
from cir_actors.types import ExecResult, FinishReason, Task

EOS = "<eos>"


class FakeCodec:
    """Token ids are indices into a growing list of strings; encode splits text into characters."""

    def __init__(self) -> None:
        self.vocab: list[str] = []
        self.index: dict[str, int] = {}

    def id(self, piece: str) -> int:
        if piece not in self.index:
            self.index[piece] = len(self.vocab)
            self.vocab.append(piece)
        return self.index[piece]

    def encode(self, text: str) -> list[int]:
        return [self.id(ch) for ch in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.vocab[t] for t in token_ids if self.vocab[t] != EOS)


@dataclass
class Segment:
    """A scripted engine answer: these pieces, one delta each (or grouped), then `end`."""

    pieces: list[str]
    end: SegmentEnd = SegmentEnd.STOP
    version: int = 0
    group: int = 1  # tokens per delta


class FakeStream:
    def __init__(self, codec: FakeCodec, seg: Segment) -> None:
        self.codec, self.seg, self.version = codec, seg, seg.version
        self.delivered = 0
        self.closed = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        pieces = self.seg.pieces
        for i in range(0, len(pieces), self.seg.group):
            chunk = pieces[i : i + self.seg.group]
            ids = [self.codec.id(p) for p in chunk]
            last = i + self.seg.group >= len(pieces)
            self.delivered += len(chunk)
            text = "".join(p for p in chunk if p != EOS)
            yield Delta(ids, [-0.5 - 0.01 * t for t in ids], text, self.seg.end if last else None)
        if not pieces:
            yield Delta([], [], "", self.seg.end)

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeSampler:
    codec: FakeCodec
    script: list[Segment]
    calls: list[tuple[list[int], int]] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)

    async def open(self, token_ids, max_tokens):
        self.calls.append((list(token_ids), max_tokens))
        seg = self.script.pop(0)
        seg.pieces = seg.pieces[:max_tokens]  # an engine never returns more than max_tokens
        if len(seg.pieces) == max_tokens and seg.end == SegmentEnd.STOP and seg.pieces[-1] != EOS:
            seg.end = SegmentEnd.LENGTH
        stream = FakeStream(self.codec, seg)
        self.streams.append(stream)
        return stream


@dataclass
class FakeInterpreter:
    results: dict[str, ExecResult] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    async def run_async(self, code, *, timeout_s=None, session=None):
        self.calls.append(code)
        await asyncio.sleep(0)
        return self.results.get(code, ExecResult(ok=True, stdout=f"ran {len(self.calls)}\n"))

    async def close_session_async(self, session):
        self.closed.append(session)


def make_task(codec: FakeCodec, prompt: str = "Q: 6*7?\n") -> Task:
    return Task("t0", "6*7", "42", prompt, tuple(codec.encode(prompt)))


def rollout(codec, script, *, budget=2, interp=None, max_resp=200, prompt="Q: 6*7?\n", sessions=False,
            stop_at_answer=False):
    sampler = FakeSampler(codec, script)
    interp = interp or FakeInterpreter()
    limits = RolloutLimits(max_response_tokens=max_resp, output_max_chars=400, use_sessions=sessions,
                           stop_at_answer=stop_at_answer)
    traj = asyncio.run(
        run_rollout(make_task(codec, prompt), 0, budget, sampler=sampler, interpreter=interp, codec=codec,
                    format_output=format_output, limits=limits)
    )
    return traj, sampler, interp


def check_invariants(traj, codec):
    """Arrays line up; mask 1 exactly where versions/logprobs are set; the text is the decoded ids."""
    n = len(traj.token_ids_T)
    assert len(traj.loss_mask_T) == len(traj.logprobs_T) == len(traj.versions_T) == n
    sampled = traj.loss_mask_T.astype(bool)
    assert not sampled[: traj.prompt_len].any()
    assert (traj.versions_T[~sampled] == -1).all() and (traj.logprobs_T[~sampled] == 0).all()
    assert (traj.versions_T[sampled] >= 0).all() and (traj.logprobs_T[sampled] < 0).all()
    assert traj.response_text == codec.decode(traj.token_ids_T[traj.prompt_len :].tolist())


BLOCK = ["Let", " me", "```python", "\n", "print(6*7)", "\n", "```"]


def test_stops_at_block_close_executes_and_continues():
    codec = FakeCodec()
    script = [Segment([*BLOCK, "\nNEVER", " SEEN", EOS]), Segment(["So", " \\boxed{42}", EOS])]
    traj, sampler, interp = rollout(codec, script)
    check_invariants(traj, codec)
    assert interp.calls == ["print(6*7)"]
    assert sampler.streams[0].closed and sampler.streams[0].delivered == len(BLOCK)  # not read past the close
    assert traj.finish_reason == FinishReason.STOP
    assert (traj.num_code_blocks, traj.num_executed) == (1, 1)
    out = format_output(ExecResult(ok=True, stdout="ran 1\n"), 400)
    assert traj.response_text == "Let me```python\nprint(6*7)\n```" + out + "So \\boxed{42}"
    # The continuation request carries exactly the ids so far: prompt, sampled, interpreter output.
    second_prompt = sampler.calls[1][0]
    assert second_prompt == traj.token_ids_T[: len(second_prompt)].tolist()
    assert second_prompt[-len(out) :] == codec.encode(out)
    mask = traj.loss_mask_T[traj.prompt_len :]
    assert mask.tolist() == [1] * len(BLOCK) + [0] * len(out) + [1] * 3
    assert traj.tool_calls[0]["code"] == "print(6*7)" and traj.tool_calls[0]["ok"]
    assert "NEVER" not in traj.response_text


def test_block_without_close_is_not_run():
    codec = FakeCodec()
    traj, _, interp = rollout(codec, [Segment(["```python", "\n", "x = 1", "\n", "done", EOS])])
    check_invariants(traj, codec)
    assert interp.calls == []
    assert traj.finish_reason == FinishReason.STOP and traj.num_code_blocks == 0


def test_two_blocks_in_one_delta_stop_at_the_first():
    codec = FakeCodec()
    pieces = ["```python", "\nprint(1)\n", "```", " and ", "```python", "\nprint(2)\n", "```", EOS]
    script = [Segment(pieces, group=len(pieces)), Segment(["ok", EOS])]
    traj, _, interp = rollout(codec, script)
    check_invariants(traj, codec)
    assert interp.calls == ["print(1)"]
    assert traj.num_code_blocks == 1 and "print(2)" not in traj.response_text
    assert traj.response_text.startswith("```python\nprint(1)\n```\n```output")


def test_block_beyond_budget_is_kept_but_not_run():
    codec = FakeCodec()
    block2 = ["```python", "\nprint(2)\n", "```", " then", " \\boxed{1}", EOS]
    script = [Segment(["```python", "\nprint(1)\n", "```", "x"]), Segment(block2)]
    traj, sampler, interp = rollout(codec, script, budget=1)
    check_invariants(traj, codec)
    assert interp.calls == ["print(1)"]
    assert len(sampler.calls) == 2  # the second block did not end its segment
    assert traj.finish_reason == FinishReason.BUDGET
    assert (traj.num_code_blocks, traj.num_executed) == (2, 1)
    assert traj.response_text.endswith("```python\nprint(2)\n``` then \\boxed{1}")


def test_budget_zero_runs_nothing():
    codec = FakeCodec()
    traj, _, interp = rollout(codec, [Segment(["```python", "\n1\n", "```", " \\boxed{1}", EOS])], budget=0)
    assert interp.calls == [] and traj.finish_reason == FinishReason.BUDGET and traj.num_code_blocks == 1
    traj, _, _ = rollout(codec, [Segment(["no code", EOS])], budget=0)
    assert traj.finish_reason == FinishReason.STOP


def test_interpreter_error_and_timeout_are_counted():
    codec = FakeCodec()
    interp = FakeInterpreter(results={
        "boom": ExecResult(ok=False, stdout="", error="NameError: name 'x' is not defined"),
        "loop": ExecResult(ok=False, stdout="", error="Timeout", timed_out=True),
    })
    script = [
        Segment(["```python", "\nboom\n", "```"]),
        Segment(["```python", "\nloop\n", "```"]),
        Segment(["end", EOS]),
    ]
    traj, _, _ = rollout(codec, script, interp=interp, budget=3)
    check_invariants(traj, codec)
    assert (traj.num_interp_errors, traj.num_interp_timeouts, traj.num_executed) == (1, 1, 2)
    assert "NameError: name 'x' is not defined" in traj.response_text and "Timeout" in traj.response_text
    assert [c["timed_out"] for c in traj.tool_calls] == [False, True]


def test_length_limit_inside_interpreter_segment():
    codec = FakeCodec()
    interp = FakeInterpreter(results={"big": ExecResult(ok=True, stdout="9" * 100)})
    script = [Segment(["```python", "\nbig\n", "```"]), Segment(["never", EOS])]
    traj, sampler, _ = rollout(codec, script, interp=interp, max_resp=20)
    check_invariants(traj, codec)
    assert traj.finish_reason == FinishReason.LENGTH
    assert traj.response_len == 20 and len(sampler.calls) == 1
    assert traj.loss_mask_T[traj.prompt_len :].tolist() == [1] * 3 + [0] * 17


def test_length_limit_in_model_segment():
    codec = FakeCodec()
    traj, sampler, _ = rollout(codec, [Segment(["a"] * 50)], max_resp=10)
    assert traj.finish_reason == FinishReason.LENGTH and traj.response_len == 10
    assert sampler.calls[0][1] == 10


def test_fence_ending_mid_token_keeps_whole_token():
    codec = FakeCodec()
    # "```\n\nThe" closes the block in its first three characters: the whole token is kept.
    script = [Segment(["```python", "\nprint(1)\n", "```\n\nThe", " rest"]), Segment(["ok", EOS])]
    traj, sampler, interp = rollout(codec, script)
    check_invariants(traj, codec)
    assert interp.calls == ["print(1)"]
    sampled = traj.token_ids_T[traj.prompt_len : traj.prompt_len + 3].tolist()
    assert [codec.vocab[t] for t in sampled] == ["```python", "\nprint(1)\n", "```\n\nThe"]
    assert sampler.streams[0].delivered == 3


def test_interrupted_segment_continues_with_both_versions():
    codec = FakeCodec()
    script = [
        Segment(["Let", " me", " think"], end=SegmentEnd.INTERRUPTED, version=3),
        Segment([" more", " \\boxed{42}", EOS], version=4),
    ]
    traj, sampler, _ = rollout(codec, script)
    check_invariants(traj, codec)
    assert traj.finish_reason == FinishReason.STOP
    assert traj.versions_T[traj.prompt_len :].tolist() == [3, 3, 3, 4, 4, 4]
    assert traj.min_version() == 3
    assert sampler.calls[1][0] == traj.token_ids_T[: traj.prompt_len + 3].tolist()
    assert sampler.calls[1][1] == 200 - 3


def test_interrupt_inside_block_still_finds_the_close():
    codec = FakeCodec()
    script = [
        Segment(["```python", "\nprint(1)"], end=SegmentEnd.INTERRUPTED, version=0),
        Segment(["\n", "```", "tail"], version=1),
        Segment(["ok", EOS], version=1),
    ]
    traj, _, interp = rollout(codec, script)
    check_invariants(traj, codec)
    assert interp.calls == ["print(1)"]
    assert "tail" not in traj.response_text


def test_aborted_segment_aborts_the_trajectory():
    codec = FakeCodec()
    traj, _, _ = rollout(codec, [Segment(["a", "b"], end=SegmentEnd.ABORTED)])
    assert traj.finish_reason == FinishReason.ABORTED


def test_prompt_ending_with_a_closed_block_runs_it_first():
    codec = FakeCodec()
    prompt = "Q: 6*7?\n```python\nprint(6*7)\n```"
    traj, _, interp = rollout(codec, [Segment(["\\boxed{42}", EOS])], prompt=prompt)
    check_invariants(traj, codec)
    assert interp.calls == ["print(6*7)"]
    assert traj.response_text.startswith("\n```output\n")
    assert traj.loss_mask_T[traj.prompt_len :].tolist()[-2:] == [1, 1]
    assert (traj.num_code_blocks, traj.num_executed) == (1, 1)


def test_prompt_ending_inside_a_block_is_closed_by_the_model():
    codec = FakeCodec()
    prompt = "Q\n```python\nx = 6"
    traj, _, interp = rollout(codec, [Segment(["*7\n", "print(x)\n", "```", "junk"]), Segment([EOS])], prompt=prompt)
    assert interp.calls == ["x = 6*7\nprint(x)"]
    check_invariants(traj, codec)


def test_sessions_are_named_and_closed():
    codec = FakeCodec()
    _, _, interp = rollout(codec, [Segment(["```python", "\n1\n", "```"]), Segment([EOS])], sessions=True)
    assert len(interp.closed) == 1 and interp.closed[0].startswith("t0/0/")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a```python\nx=1\n```b", "x=1"),
        ("```python\nx=1\n", None),
        ("```python x``` ```python y```", "x"),
        ("``` not code ```", None),
    ],
)
def test_block_scanner(text, expected):
    block = BlockScanner(text).next_block()
    assert (block.code if block else None) == (expected.strip() if expected else None)


def test_stop_at_answer_ends_the_response_at_the_box_close():
    codec = FakeCodec()
    # The box closes inside the token "}$": that whole token is kept; the trailing junk is never read.
    pieces = ["The", " answer", " is", " $\\boxed{", "4", "{2}", "}$", ".", "}$.", "}$.", EOS]
    traj, sampler, _ = rollout(codec, [Segment(pieces)], stop_at_answer=True)
    check_invariants(traj, codec)
    assert traj.response_text == "The answer is $\\boxed{4{2}}$"
    assert traj.finish_reason == FinishReason.STOP and sampler.streams[0].closed
    assert sampler.streams[0].delivered == 7
    traj, _, _ = rollout(codec, [Segment(pieces)])  # off (the default): the model decides where to end
    assert traj.response_text == "The answer is $\\boxed{4{2}}$.}$.}$."


def test_stop_at_answer_ignores_boxes_in_code_and_in_interpreter_output():
    codec = FakeCodec()
    code = ["```python", "\nprint('\\\\boxed{1}')\n", "```"]  # the program prints a box
    script = [Segment([*code, "x"]), Segment([" so", " \\boxed{", "1", "}", " more", EOS])]
    interp = FakeInterpreter(results={"print('\\\\boxed{1}')": ExecResult(ok=True, stdout="\\boxed{9}\n")})
    traj, sampler, interp = rollout(codec, script, interp=interp, stop_at_answer=True)
    check_invariants(traj, codec)
    assert len(interp.calls) == 1 and len(sampler.calls) == 2
    assert "\\boxed{9}" in traj.tool_calls[0]["output"]
    assert traj.response_text.endswith("```\n so \\boxed{1}")
    # An open block hides a box until it closes; the block then runs before the box can end anything.
    pieces = ["```python", "\n# \\boxed{2}\n", "```", " \\boxed{3}", EOS]
    traj, _, interp = rollout(codec, [Segment(pieces, group=len(pieces)), Segment([" \\boxed{5}", " x", EOS])],
                              stop_at_answer=True)
    assert len(interp.calls) == 1 and "boxed{3}" not in traj.response_text
    assert traj.response_text.endswith(" \\boxed{5}") and traj.num_code_blocks == 1


def test_stop_at_answer_beyond_the_budget_counts_only_blocks_before_it():
    codec = FakeCodec()
    pieces = ["```python", "\n1\n", "```", " \\boxed{1}", " ```python", "\n2\n", "```", EOS]
    traj, _, interp = rollout(codec, [Segment(pieces, group=len(pieces))], budget=0, stop_at_answer=True)
    assert interp.calls == [] and traj.num_code_blocks == 1
    assert traj.response_text == "```python\n1\n``` \\boxed{1}" and traj.finish_reason == FinishReason.BUDGET


@pytest.mark.parametrize(
    "pieces, expected",
    [
        (["a \\boxed{1}"], len("a \\boxed{1}")),
        (["\\box", "ed", " ", "{1", "}"], len("\\boxed {1}")),
        (["\\boxed{", "{1}"], None),  # still open
        (["\\boxedx \\boxed{2}"], len("\\boxedx \\boxed{2}")),
        (["```python\n\\boxed{1}"], None),
        (["```python\n\\boxed{1}\n``` \\boxed{2}!"], len("```python\n\\boxed{1}\n``` \\boxed{2}")),
    ],
)
def test_answer_end(pieces, expected):
    s = BlockScanner()
    for piece in pieces:
        s.feed(piece)
        got = s.answer_end()
    assert got == expected


def test_block_scanner_piecewise_and_tails():
    s = BlockScanner()
    for piece in ["```py", "thon\nprint(1)\n`", "``", "\n```python\nprint(2)\n```"]:
        s.feed(piece)
    assert s.next_block().code == "print(1)"
    assert s.next_block().code == "print(2)"
    assert s.next_block() is None
    assert open_block_tail("x```python\na=1") == "```python\na=1"
    assert open_block_tail("```python\na=1\n```") == ""
    assert trailing_block("q ```python\na=1\n```\n").code == "a=1"
    assert trailing_block("```python\na=1\n```\n```output\n1\n```\n") is None
