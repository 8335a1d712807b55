"""The scorer: answer extraction, math-verify equivalence on a table of cases, the deadline off the
main thread, rewards, and every benchmark gold answer scored against itself."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from cir_actors.config import ScorerConfig
from cir_actors.scoring.scorer import (
    Scorer,
    extract_answer,
    gold_answer,
    score,
    strip_output_blocks,
    training_reward,
)
from cir_actors.types import Verdict, VerdictReason

C, W, NB, TO = VerdictReason.CORRECT, VerdictReason.WRONG, VerdictReason.NO_BOX, VerdictReason.TIMEOUT
OUT = "```python\nprint(2 + 2)\n```\n```output\n{}\n```\n"
PATHOLOGICAL = "The answer is \\boxed{9^{9^{9^{9}}}}."  # sympy tries to evaluate the power tower


@pytest.fixture(scope="module")
def scorer():
    """The default deadline (5 s): ordinary answers must never come near it."""
    s = Scorer(ScorerConfig(num_workers=2, reward_correct=1.0, reward_wrong=-1.0))
    s.warmup()
    yield s
    s.close()


@pytest.fixture(scope="module")
def strict():
    """A 1 s deadline, for the pathological inputs (each costs one deadline)."""
    s = Scorer(ScorerConfig(num_workers=1, timeout_s=1.0))
    s.warmup()
    yield s
    s.close()


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\boxed{a \\\\ b}", "a \\\\ b"),
        ("the answer is \\boxed 7.", "7"),
        ("\\boxed {8}", "8"),
        ("\\fbox{9}", "9"),
        ("$\\boxed{3}$ and $x$", "3"),
        ("\\boxed{3} and then \\boxed{4", "3"),  # the last *complete* box (a response cut at the limit)
        ("\\boxed{3} \\boxed{}", "3"),
        ("no answer here", None),
        ("\\boxedx{3}", None),
        (OUT.format("\\boxed{4}"), None),  # printed by the interpreter: not the model's answer
        (OUT.format("\\boxed{4}") + "So \\boxed{5}", "5"),
        ("\\boxed{5} " + OUT.format("\\boxed{4}"), "5"),
        ("```output\n\\boxed{4}", None),  # unterminated output block runs to the end
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_strip_output_blocks_keeps_model_text():
    text = "a " + OUT.format("noise") + " b"
    stripped = strip_output_blocks(text)
    assert "noise" not in stripped and stripped.startswith("a ") and stripped.endswith(" b")
    assert "print(2 + 2)" in stripped  # the code block is the model's own text


@pytest.mark.parametrize(
    "gold, expected",
    [
        ("5", "5"),
        ("\\boxed{204}", "204"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        (" \\dfrac{3}{4} ", "\\dfrac{3}{4}"),
    ],
)
def test_gold_answer(gold, expected):
    assert gold_answer(gold) == expected


CASES = [
    # fractions vs decimals
    ("\\boxed{0.5}", "\\frac{1}{2}", C),
    ("\\boxed{\\frac{1}{2}}", "0.5", C),
    ("\\boxed{1/2}", "\\frac12", C),
    ("\\boxed{0.25}", "\\frac{1}{3}", W),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", C),
    ("\\boxed{\\tfrac34}", "0.75", C),
    # intervals
    ("\\boxed{[1, 2)}", "[1,2)", C),
    ("\\boxed{(1,2]}", "[1,2)", W),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", C),
    # sets
    ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", C),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", W),
    # tuples
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", C),
    ("\\boxed{(2, 1)}", "(1, 2)", W),
    # units, degrees, currency
    ("\\boxed{30^\\circ}", "30", C),
    ("\\boxed{30}", "30^\\circ", C),
    ("\\boxed{5\\text{ cm}}", "5", C),
    ("\\boxed{12 \\text{ inches}}", "12", C),
    ("\\boxed{\\$18.90}", "18.90", C),
    # text answers
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", C),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", C),
    ("\\boxed{\\text{Evelyn}}", "\\text{Bob}", W),
    # expressions, equations, signs, nested braces
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", C),
    ("\\boxed{2^{10}}", "1024", C),
    ("\\boxed{x = 3}", "3", C),
    ("\\boxed{-5}", "5", W),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", C),
    # several boxes: the last one counts
    ("first \\boxed{3}, but correcting: \\boxed{4}", "4", C),
    ("\\boxed{4}, but correcting: \\boxed{3}", "4", W),
    # no box, or the answer only in the interpreter's output
    ("The answer is 4.", "4", NB),
    ("\\boxed{}", "4", NB),
    (OUT.format("\\boxed{4}") + "So the answer is 4.", "4", NB),
    (OUT.format("\\boxed{3}") + "Hence \\boxed{4}", "4", C),
    # gold answers that are themselves boxed
    ("\\boxed{204}", "\\boxed{204}", C),
    ("\\boxed{205}", "\\boxed{204}", W),
]


def test_case_table(scorer):
    verdicts = scorer.score_many([(r, g) for r, g, _ in CASES])
    wrong = [(r, g, want, v.reason) for (r, g, want), v in zip(CASES, verdicts) if v.reason != want]
    assert not wrong, f"{len(wrong)} of {len(CASES)} cases disagree: {wrong}"
    for v in verdicts:
        assert v.correct == (v.reason == C)


def test_verdict_carries_prediction(scorer):
    v = scorer.score("Thus \\boxed{\\dfrac{1}{2}}.", "0.5")
    assert v == Verdict(True, "\\dfrac{1}{2}", C, v.duration_s)
    assert scorer.score("nothing", "1").predicted is None


def test_pathological_times_out_within_deadline(strict):
    t0 = time.monotonic()
    v = strict.score(PATHOLOGICAL, "5")
    elapsed = time.monotonic() - t0
    assert (v.correct, v.reason, v.predicted) == (False, TO, "9^{9^{9^{9}}}")
    # Deadline 1 s; unbounded, this check runs for minutes. Generous slack for a loaded machine.
    assert elapsed < 10.0
    assert strict.stats()["workers_replaced"] >= 1
    # The pool lives on with a fresh worker.
    assert strict.score("\\boxed{7}", "7").correct


def test_scores_off_the_main_thread_and_in_an_event_loop(scorer, strict):
    results: list = []

    def work():
        results.append(scorer.score("\\boxed{\\frac{2}{4}}", "0.5"))
        results.append(strict.score(PATHOLOGICAL, "5"))
        results.append(score("\\boxed{3}", "3", timeout_s=5.0))  # the module-level pool, too

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert [v.reason for v in results] == [C, TO, C]

    async def many():
        return await asyncio.gather(*(scorer.score_async(f"\\boxed{{{i}}}", str(i % 3)) for i in range(6)))

    verdicts = asyncio.run(many())
    assert [v.correct for v in verdicts] == [i % 3 == i for i in range(6)], verdicts


def test_rewards(scorer):
    right, wrong = scorer.score("\\boxed{1}", "1"), scorer.score("\\boxed{2}", "1")
    assert (scorer.reward(right), scorer.reward(wrong)) == (1.0, -1.0)
    assert (scorer.reward(right, "eval"), scorer.reward(wrong, "eval")) == (1.0, 0.0)
    shaped = Scorer(ScorerConfig(num_workers=1, reward_correct=2.0, reward_wrong=0.0))
    try:
        assert (shaped.reward(right), shaped.reward(wrong)) == (2.0, 0.0)
    finally:
        shaped.close()
    with pytest.raises(ValueError, match="reward mode"):
        scorer.reward(right, "test")  # type: ignore[arg-type]


def test_a_truncated_response_trains_with_reward_truncated_when_set():
    right = Verdict(correct=True, predicted="1", reason=VerdictReason.CORRECT)
    wrong = Verdict(correct=False, predicted="2", reason=VerdictReason.WRONG)
    cir = ScorerConfig()  # unset: a cut response is scored like any other (CIR)
    assert [training_reward(cir, v, truncated=t) for v in (right, wrong) for t in (False, True)] == [1, 1, -1, -1]
    dapo = ScorerConfig(reward_truncated=-1.0)
    assert [training_reward(dapo, v, truncated=t) for v in (right, wrong) for t in (False, True)] == [1, -1, -1, -1]
    assert training_reward(ScorerConfig(reward_truncated=0.0), wrong, truncated=True) == 0.0


def _benchmark_golds() -> list[tuple[str, str]]:
    from cir_actors.data.loaders import load_benchmarks

    root = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"
    return [(name, row["gold"]) for name, rows in load_benchmarks(root).items() for row in rows]


def test_every_benchmark_gold_scores_against_itself(scorer):
    golds = _benchmark_golds()
    assert len(golds) == 700
    verdicts = scorer.score_many(
        [(f"The final answer is $\\boxed{{{gold_answer(g)}}}$.", g) for _, g in golds]
    )
    failed = [(name, g, v.reason.value) for (name, g), v in zip(golds, verdicts) if not v.correct]
    assert not failed, f"{len(failed)} gold answers do not match themselves: {failed[:10]}"


def test_scorer_as_ray_actor(ray_session):
    ray = ray_session
    cfg = ScorerConfig(num_workers=1, timeout_s=1.0)
    actor = ray.remote(Scorer).options(num_cpus=cfg.num_cpus, max_concurrency=4).remote(cfg)
    try:
        refs = [actor.score_async.remote(f"\\boxed{{{i}}}", "1") for i in range(3)]
        refs.append(actor.score_async.remote(PATHOLOGICAL, "5"))
        verdicts = ray.get(refs, timeout=120)
        assert [v.reason for v in verdicts] == [W, C, W, TO]
        many = ray.get(actor.score_many.remote([("\\boxed{0.5}", "\\frac12"), ("x", "1")]), timeout=60)
        assert [v.reason for v in many] == [C, NB]
    finally:
        ray.kill(actor)
