"""Synthetic tasks: deterministic, disjoint splits, gold answers checked by a second computation
from the problem text (sympy / brute force), and SFT demonstrations in CIR's exact format."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import sympy
from sympy.ntheory import digits
from transformers import AutoTokenizer

from cir_actors.config import load_config
from cir_actors.data.loaders import build_prompt, load_tasks
from cir_actors.data.tasks import (
    KINDS,
    demonstration_trajectory,
    generate_problems,
    make_problem,
    problem_for,
    run_snippet,
)
from cir_actors.types import Task

k = sympy.Symbol("k", integer=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def independent_answer(kind: str, text: str) -> int:
    """Solve the problem from its wording alone, by a different computation than the generator's."""
    n = ints(text)
    if kind in ("product", "mul"):
        a, b = n
        return int(sympy.Mul(sympy.Integer(a), sympy.Integer(b)))
    if kind in ("modpow", "powmod"):
        a, e, m = n
        return int(sympy.Integer(a) ** e % m)
    if kind == "range_sum":
        a, b = n[0], n[-1]
        return int(sympy.summation(k, (k, a, b)))
    if kind == "square_sum":
        top = n[0] if "first" in text else n[-2]  # "... + {n}^2$" ends with n, 2
        return int(sympy.summation(k**2, (k, 1, top)))
    if kind == "count_divisible":
        top, a, b = (n[1], n[2], n[3]) if text.startswith("How many") else (n[0], n[1], n[2])
        return sum(1 for x in range(1, top + 1) if x % a == 0 and x % b != 0)
    if kind == "digit_sum_power":
        base, e = n
        return sum(digits(sympy.Integer(base) ** e)[1:])
    if kind == "arith_series":
        if text.startswith("An arithmetic"):
            first, step, terms = n
        else:
            first, _day1, step, terms = n
        return int(sympy.summation(first + step * k, (k, 0, terms - 1)))
    raise AssertionError(f"unknown kind {kind}")


def test_gold_answers_are_right_by_a_second_computation():
    probs = generate_problems(250, seed=7, split="train") + generate_problems(60, seed=7, split="eval")
    assert {p.kind for p in probs} == set(KINDS)  # every kind exercised
    for p in probs:
        assert str(independent_answer(p.kind, p.problem)) == p.gold, p
        assert run_snippet(p.code).strip() == p.gold, p  # the one-line solution prints the gold


def test_generation_is_deterministic_and_seed_dependent():
    a = generate_problems(100, seed=3, split="train")
    assert a == generate_problems(100, seed=3, split="train")
    assert a[:50] == generate_problems(50, seed=3, split="train")  # a prefix does not depend on n
    b = generate_problems(100, seed=4, split="train")
    assert sum(x.problem == y.problem for x, y in zip(a, b)) < 5
    assert make_problem(3, "train", 42) == a[42]


def test_splits_are_disjoint_and_varied():
    train = generate_problems(3000, seed=0, split="train")
    held = generate_problems(300, seed=0, split="eval")
    numbers = lambda p: (p.kind, tuple(ints(p.code)))
    assert not {numbers(p) for p in train} & {numbers(p) for p in held}
    assert not {p.problem for p in train} & {p.problem for p in held}
    assert len({p.problem for p in held}) >= 295
    assert min(Counter(p.kind for p in train).values()) > 300
    with pytest.raises(ValueError, match="split must be one of"):
        make_problem(0, "test", 0)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_demonstration_trajectory_format_and_masks(tok):
    cfg = load_config(None, ["data.num_train=30"])
    tasks = load_tasks(cfg, tok, "train")
    assert len(tasks) == 30
    for task in tasks:
        traj = demonstration_trajectory(task, tok)
        ids, mask = traj.token_ids_T.tolist(), traj.loss_mask_T
        assert ids[: traj.prompt_len] == list(task.prompt_token_ids)
        code = problem_for(task).code
        intended = (
            f"```python\n{code}\n```"
            f"\n```output\n{task.gold}\n```\n"
            f"The answer is $\\boxed{{{task.gold}}}$.<|im_end|>"
        )
        assert tok.decode(ids[traj.prompt_len :]) == intended
        assert traj.response_text == intended
        # Mask invariant: 1 exactly on model segments; the output segment and prompt are 0.
        assert not mask[: traj.prompt_len].any()
        response_mask = mask[traj.prompt_len :]
        changes = np.flatnonzero(np.diff(response_mask)) + 1
        pieces = np.split(np.arange(traj.prompt_len, len(ids)), changes)
        texts = [(int(mask[p[0]]), tok.decode([ids[i] for i in p])) for p in pieces]
        assert texts == [
            (1, f"```python\n{code}\n```"),
            (0, f"\n```output\n{task.gold}\n```\n"),
            (1, f"The answer is $\\boxed{{{task.gold}}}$.<|im_end|>"),
        ]
        # Each segment is its own tokenization (the generator tokenizes interpreter output alone).
        assert [ids[i] for i in pieces[1]] == tok.encode(texts[1][1], add_special_tokens=False)
        assert ids[-1] == tok.eos_token_id
        assert (traj.logprobs_T == 0).all()
        assert (traj.versions_T[mask == 1] == 0).all() and (traj.versions_T[mask == 0] == -1).all()
        assert traj.num_sampled == int(mask.sum()) > 0
        assert traj.token_ids_T.dtype == np.int32 and traj.loss_mask_T.dtype == np.int8


def test_demonstration_rejects_foreign_tasks(tok):
    text, ids = build_prompt("What is 2+2?", tok, True)
    with pytest.raises(ValueError, match="not a synthetic task"):
        demonstration_trajectory(Task("aime-3", "What is 2+2?", "4", text, tuple(ids)), tok)
    real = make_problem(0, "train", 5)
    with pytest.raises(ValueError, match="does not match"):
        demonstration_trajectory(Task(real.task_id, "edited problem", real.gold, text, tuple(ids)), tok)


def test_kind_selection_and_regeneration_from_id():
    probs = generate_problems(40, seed=1, split="train", kinds=["powmod", "mul"])
    assert {p.kind for p in probs} == {"mul", "powmod"}
    assert all(p.task_id.endswith("-mul+powmod") for p in probs)
    for p in probs[:10]:
        task = Task(task_id=p.task_id, problem=p.problem, gold=p.gold, prompt_text=p.problem, prompt_token_ids=(1,))
        assert problem_for(task) == p
        assert str(independent_answer(p.kind, p.problem)) == p.gold
    with pytest.raises(ValueError, match="unknown task kind"):
        make_problem(0, "train", 0, ["nope"])
