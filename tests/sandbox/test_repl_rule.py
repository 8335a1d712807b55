"""CIR's executor rule (interpreter.repl_last_expression): a block that prints nothing shows the value
of its last bare expression, in the real sandboxed child; off by default (plain exec)."""

from __future__ import annotations

import pytest

from cir_actors.sandbox.pool import InterpreterPool, format_output

# CIR-style blocks (as Qwen2.5-Math writes them after ToRA-style data) and what CIR's executor shows.
CASES = [
    ("import sympy as sp\nx = sp.symbols('x')\nsp.solve(x**2 - 4, x)\n", "[-2, 2]"),
    ("from math import comb\n\ncomb(8, 6) * (3/5)**2 * (-1/2)**6\n", "0.1575"),
    ("n = 10\ntotal = sum(range(n + 1))\ntotal", "55"),
    ("x = 3\nprint(x * 2)\nx + 100\n", "6"),  # printed something: no value shown
    ("y = [1, 2]\ny.append(3)\n", ""),  # last expression's value is None: nothing shown
    ("z = 5\n", ""),  # ends with an assignment
    ("a = 1\n1 / 0\n", "ZeroDivisionError: division by zero"),
    ("def f(k):\n    return k * k\n\nf(12)\n", "144"),
]


@pytest.fixture(scope="module")
def pools():
    with InterpreterPool(timeout_s=5.0, max_workers=2, repl_last_expression=True) as on, \
            InterpreterPool(timeout_s=5.0, max_workers=2) as off:
        yield on, off


@pytest.mark.parametrize("code, shown", CASES)
def test_repl_rule_shows_the_last_expression(pools, code, shown):
    on, _ = pools
    r = on.run(code)
    assert format_output(r, 400) == f"\n```output\n{shown}\n```\n", r


def test_rule_is_off_by_default(pools):
    _, off = pools
    r = off.run(CASES[2][0])
    assert r.ok and r.stdout == ""


def test_paper_recipe_turns_it_on():
    from pathlib import Path

    from cir_actors.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "qwen2.5-math-7b.yaml")
    assert cfg.interpreter.repl_last_expression and cfg.learner.advantage == "reinforce_pp"
