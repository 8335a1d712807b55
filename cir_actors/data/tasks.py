"""Synthetic tasks where the interpreter genuinely helps, and SFT demonstrations for them.

Each problem is exact integer arithmetic that a tiny model cannot do in its head but can solve by
writing one line of Python: multi-digit products, modular powers, sums of ranges, sums of
squares, counting with a divisibility condition, digit sums of powers, arithmetic series. Problems
are phrased from a few templates per kind and are a pure function of (seed, split, index), so any
task can be regenerated from its id. Train and eval are disjoint by construction: the split a
problem belongs to is a hash of its kind and numbers (not its wording), and each split keeps only
its own.

Also here: `demonstration_trajectory`, a CIR-format response (code block, interpreter output
segment, boxed answer) for the SFT warm start. Not here: prompts and file loading (data/loaders.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cir_actors.config import InterpreterConfig
from cir_actors.generation.rollout import sampled_text
from cir_actors.sandbox.pool import format_output
from cir_actors.types import ExecResult, FinishReason, Task, Trajectory

SPLITS = ("train", "eval")
EVAL_FRACTION = 0.1  # share of the problem space that belongs to the eval split


@dataclass(frozen=True)
class Problem:
    """One synthetic problem: its text, gold answer, and the one-line Python that computes it."""

    task_id: str
    kind: str
    problem: str
    gold: str
    code: str


def _product(rng: random.Random) -> tuple[tuple[int, ...], list[str], str, int]:
    a, b = rng.randint(100, 99999), rng.randint(100, 9999)
    texts = [
        f"What is {a} times {b}?",
        f"Compute the product of {a} and {b}.",
        f"A warehouse has {a} boxes and each box holds {b} items. How many items are in the warehouse?",
    ]
    return (a, b), texts, f"print({a} * {b})", a * b


def _modpow(rng: random.Random) -> tuple[tuple[int, ...], list[str], str, int]:
    a, e, m = rng.randint(2, 999), rng.randint(20, 999), rng.choice([7, 11, 13, 97, 100, 101, 1000, 997, 9973])
    texts = [
        f"What is the remainder when {a}^{{{e}}} is divided by {m}?",
        f"Find ${a}^{{{e}}} \\bmod {m}$.",
        f"Compute {a} to the power {e}, modulo {m}.",
    ]
    return (a, e, m), texts, f"print(pow({a}, {e}, {m}))", pow(a, e, m)


def _range_sum(rng: random.Random) -> tuple[tuple[int, ...], list[str], str, int]:
    a = rng.randint(1, 9999)
    b = a + rng.randint(10, 99999)
    texts = [
        f"What is the sum of all integers from {a} to {b}, inclusive?",
        f"Compute {a} + {a + 1} + ... + {b}.",
        (
            f"A runner logs {a} meters on day one, one meter more each day, and {b} meters on the last day. "
            "How many meters did she run in total?"
        ),
    ]
    return (a, b), texts, f"print(sum(range({a}, {b + 1})))", (a + b) * (b - a + 1) // 2


def _square_sum(rng: random.Random) -> tuple[tuple[int, ...], list[str], str, int]:
    n = rng.randint(20, 9999)
    texts = [
        f"Compute $1^2 + 2^2 + \\cdots + {n}^2$.",
        f"What is the sum of the squares of the first {n} positive integers?",
    ]
    return (n,), texts, f"print(sum(k**2 for k in range(1, {n + 1})))", n * (n + 1) * (2 * n + 1) // 6


def _count_divisible(rng: random.Random) -> tuple[tuple[int, ...], list[str], str, int]:
    n, a = rng.randint(100, 99999), rng.randint(2, 19)
    b = rng.choice([d for d in range(2, 20) if d % a and a % d])
    count = n // a - n // math.lcm(a, b)
    texts = [
        f"How many integers from 1 to {n} are divisible by {a} but not by {b}?",
        f"Count the positive integers up to {n} that are multiples of {a} and not multiples of {b}.",
    ]
    return (n, a, b), texts, f"print(sum(1 for k in range(1, {n + 1}) if k % {a} == 0 and k % {b} != 0))", count


def _digit_sum_power(rng: random.Random) -> tuple[tuple[int, ...], list[str], str, int]:
    base, e = rng.randint(2, 99), rng.randint(10, 300)
    texts = [
        f"What is the sum of the digits of {base}^{{{e}}}?",
        f"Find the digit sum of the number {base} raised to the power {e}.",
    ]
    return (base, e), texts, f"print(sum(int(d) for d in str({base}**{e})))", sum(int(d) for d in str(base**e))


def _arith_series(rng: random.Random) -> tuple[tuple[int, ...], list[str], str, int]:
    first, step, n = rng.randint(1, 999), rng.randint(2, 99), rng.randint(20, 999)
    texts = [
        f"An arithmetic sequence starts at {first} and increases by {step}. What is the sum of its first {n} terms?",
        (
            f"A savings jar gets {first} coins on day 1, and each day {step} more coins than the day before. "
            f"How many coins are in the jar after {n} days?"
        ),
    ]
    total = n * (2 * first + (n - 1) * step) // 2
    return (first, step, n), texts, f"print(sum({first} + {step} * k for k in range({n})))", total


def _mul(rng: random.Random) -> tuple[tuple[int, ...], list[str], str, int]:
    # The demo's kinds (mul, powmod): one wording, 2-3 digit numbers, so a 0.4M-parameter model
    # learns to copy them into code within a minute of SFT — and still cannot multiply in its head.
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return (a, b), [f"What is {a} times {b}?"], f"print({a} * {b})", a * b


def _powmod(rng: random.Random) -> tuple[tuple[int, ...], list[str], str, int]:
    a, e, m = rng.randint(2, 99), rng.randint(10, 99), rng.randint(10, 99)
    return (a, e, m), [f"What is {a} to the power {e} modulo {m}?"], f"print(pow({a}, {e}, {m}))", pow(a, e, m)


KINDS: dict[str, Callable[[random.Random], tuple[tuple[int, ...], list[str], str, int]]] = {
    "mul": _mul,
    "powmod": _powmod,
    "product": _product,
    "modpow": _modpow,
    "range_sum": _range_sum,
    "square_sum": _square_sum,
    "count_divisible": _count_divisible,
    "digit_sum_power": _digit_sum_power,
    "arith_series": _arith_series,
}


def split_of(kind: str, params: tuple[int, ...]) -> str:
    """The split a problem belongs to: a hash of what it asks, not of how it is worded."""
    digest = hashlib.sha256(f"{kind}:{params}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < EVAL_FRACTION else "train"


def _kind_set(kinds: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    chosen = tuple(sorted(set(kinds))) if kinds else tuple(sorted(KINDS))
    unknown = [k for k in chosen if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown task kind(s) {unknown}; expected some of {sorted(KINDS)}")
    return chosen


def make_problem(seed: int, split: str, index: int, kinds: list[str] | tuple[str, ...] | None = None) -> Problem:
    """The `index`-th problem of `split` for `seed`, drawn from `kinds` (None: all kinds); a pure
    function (retries until the split fits). The id names the kind set when one is given."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    chosen = _kind_set(kinds)
    suffix = "" if kinds is None else "-" + "+".join(chosen)
    for attempt in range(10_000):
        rng = random.Random(f"{seed}:{split}:{index}:{attempt}" + suffix)
        kind = rng.choice(chosen)
        params, texts, code, answer = KINDS[kind](rng)
        if split_of(kind, params) == split:
            return Problem(f"syn-{split}-{seed}-{index}{suffix}", kind, rng.choice(texts), str(answer), code)
    raise RuntimeError("unreachable: no problem of the split found in 10000 draws")


def generate_problems(
    n: int, seed: int = 0, split: str = "train", kinds: list[str] | tuple[str, ...] | None = None
) -> list[Problem]:
    """The first n problems of a split."""
    return [make_problem(seed, split, i, kinds) for i in range(n)]


_ID_RE = re.compile(r"^syn-(train|eval)-(-?\d+)-(\d+)(?:-([a-z_+]+))?$")


def problem_for(task: Task) -> Problem:
    """Regenerate the synthetic problem behind a task (ValueError if the task is not one of ours)."""
    m = _ID_RE.match(task.task_id)
    if m is None:
        raise ValueError(f"task '{task.task_id}' is not a synthetic task (expected an id like syn-train-0-17)")
    kinds = m.group(4).split("+") if m.group(4) else None
    prob = make_problem(int(m.group(2)), m.group(1), int(m.group(3)), kinds)
    if prob.problem != task.problem:
        raise ValueError(f"task '{task.task_id}' does not match its regenerated problem text")
    return prob


# --------------------------------------------------------------------------------- demonstrations


def run_snippet(code: str) -> str:
    """Run our own one-line solution in-process and return its stdout (trusted code only)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {"__name__": "__main__"})  # noqa: S102 - our own generated code, never model output
    return buf.getvalue()


def demonstration_segments(prob: Problem, stdout: str | None = None) -> list[tuple[str, bool]]:
    """The response as (text, sampled-by-model) segments: code block, output, boxed answer.

    `stdout` is what the code printed; None runs the code to find out.
    """
    result = ExecResult(ok=True, stdout=run_snippet(prob.code) if stdout is None else stdout)
    out = format_output(result, InterpreterConfig().output_max_chars)  # the generator's own splice
    return [
        (f"```python\n{prob.code}\n```", True),
        (out, False),
        (f"The answer is $\\boxed{{{prob.gold}}}$.", True),
    ]


def demonstration_trajectory(task: Task, tokenizer) -> Trajectory:
    """A CIR-format demonstration for a synthetic task, tokenized as the generator would produce it.

    Each segment is tokenized on its own and the pieces concatenated (model segments are sampled
    tokens, interpreter segments are tokenized alone); the final model segment ends with the eos
    token. loss_mask is 1 on model segments and 0 on prompt and output; logprobs 0; versions 0 on
    sampled tokens and -1 elsewhere (the Trajectory invariant).
    """
    prob = problem_for(task)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token; a demonstration must end with one")
    ids: list[int] = list(task.prompt_token_ids)
    mask: list[int] = [0] * len(ids)
    segments = demonstration_segments(prob)
    for i, (text, sampled) in enumerate(segments):
        seg = tokenizer.encode(text, add_special_tokens=False)
        if i == len(segments) - 1:
            seg = seg + [eos_id]
        ids += seg
        mask += [int(sampled)] * len(seg)
    mask_T = np.asarray(mask, dtype=np.int8)
    return Trajectory(
        task_id=task.task_id,
        sample_index=0,
        token_ids_T=np.asarray(ids, dtype=np.int32),
        loss_mask_T=mask_T,
        logprobs_T=np.zeros(len(ids), dtype=np.float32),
        versions_T=np.where(mask_T == 1, 0, -1).astype(np.int32),
        prompt_len=len(task.prompt_token_ids),
        finish_reason=FinishReason.STOP,
        budget=1,
        num_code_blocks=1,
        num_executed=1,
        response_text="".join(text for text, _ in segments) + tokenizer.decode([eos_id]),
        sampled_text=sampled_text(tokenizer, ids, mask, len(task.prompt_token_ids)),
        tool_calls=({"code": prob.code, "ok": True, "error": None, "output": segments[1][0]},),
    )
