"""Dynamic sampling (DAPO, asynchronous): the zero-variance rate and the over-sampled admission,
hand-computed, then the real scheduler and buffer (plain Python, no Ray) with a slow generator."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from cir_actors.config import load_config
from cir_actors.control.budget_scheduler import BudgetScheduler
from cir_actors.control.replay_buffer import ReplayBuffer
from cir_actors.control.sampling import ZeroVarianceRate, is_zero_variance
from cir_actors.types import DropReason, PolicyUpdate, Task


def test_zero_variance_of_a_group():
    assert is_zero_variance([1.0, 1.0, 1.0]) and is_zero_variance([-1, -1]) and is_zero_variance([0.5])
    assert not is_zero_variance([1.0, -1.0, 1.0])


def test_rate_is_an_ema_and_the_headroom_follows_it():
    z = ZeroVarianceRate(ema=0.5, max_oversample=3.0)
    assert z.rate == 0.0 and z.factor() == 1.0 and z.extra_groups(8) == 0
    z.observe(8, 4)  # half of 8 inspected groups were dropped: 0.5 * 0 + 0.5 * 0.5
    assert z.rate == pytest.approx(0.25)
    assert z.factor() == pytest.approx(4 / 3) and z.extra_groups(8) == 3  # ceil(8 / 3)
    z.observe(4, 4)  # every one dropped: 0.5 * 0.25 + 0.5 * 1
    assert z.rate == pytest.approx(0.625) and z.extra_groups(8) == 14  # ceil(8 * (1/0.375 - 1)) = ceil(13.33)
    z.observe(0, 0)  # nothing inspected: no change
    assert z.rate == pytest.approx(0.625)
    for _ in range(20):
        z.observe(4, 4)
    assert z.factor() == pytest.approx(3.0) and z.extra_groups(8) == 16  # capped at max_oversample
    assert z.state()["zero_variance_inspected"] == 8 + 4 + 20 * 4


def test_options_validate():
    with pytest.raises(ValueError):
        ZeroVarianceRate(ema=0.0)
    cfg = load_config(None, ["buffer.dynamic_sampling=true"])
    assert cfg.buffer.drops_zero_variance and not load_config(None).buffer.drops_zero_variance


def _tasks(k: int) -> list[Task]:
    return [Task(f"t{i}", f"p{i}", str(i), f"p{i}", (1, 2)) for i in range(k)]


async def _run(dynamic: bool, *, staleness: int, steps: int, batch: int, gen_s: float, train_s: float, zero_p: float):
    """Two generators (each group takes gen_s), a learner that trains for train_s a step; a group
    is all-equal (zero variance) with probability zero_p, from a seeded stream. Returns what the
    learner waited, the served groups' rewards, the admitted task ids and the scheduler's state."""
    cfg = load_config(None, [
        f"learner.prompts_per_step={batch}", f"learner.mini_batch_prompts={batch}", "generator.samples_per_prompt=2",
        f"scheduler.max_staleness={staleness}", f"scheduler.total_steps={steps}", "buffer.drop_zero_advantage_groups=true",
        f"buffer.dynamic_sampling={str(dynamic).lower()}", "buffer.zero_variance_ema=0.5",
    ])  # fmt: skip
    sched = BudgetScheduler(cfg, _tasks(10_000))
    buf = ReplayBuffer(staleness, drop_zero_advantage=cfg.buffer.drops_zero_variance)
    rng = random.Random(7)
    served_version = {"g0": 0, "g1": 0}
    admitted: list[str] = []
    served_rewards: list[list[float]] = []
    done = asyncio.Event()

    async def generator(name):
        while not done.is_set():
            req = await sched.admit(name, served_version[name], timeout_s=0.02)
            if req is None:
                served_version[name] = sched.current_update().version
                continue
            admitted.append(req.task.task_id)
            rewards = [1.0, 1.0] if rng.random() < zero_p else [1.0, -1.0]
            await asyncio.sleep(gen_s)
            for i, r in enumerate(rewards):
                if await buf.add(req.group_id, 2, req.admitted_version, i, [r], r, served_version[name]):
                    await sched.group_completed(req.group_id)

    async def learner():
        waited = 0.0
        for version in range(steps):
            t0 = time.monotonic()
            while True:
                b = await buf.get_batch(batch, version, timeout_s=0.02)
                if b is None:
                    continue
                if b.dropped:
                    await sched.groups_released(sum(b.dropped.values()))
                await sched.batch_inspected(len(b.groups), b.dropped)
                if b.groups:
                    break
            waited += time.monotonic() - t0
            assert len(b.groups) == batch  # never a short batch
            served_rewards.extend(list(g) for g in b.groups)
            await asyncio.sleep(train_s)
            await sched.advance(PolicyUpdate(version=version + 1, budget=0))
        done.set()
        return waited

    waited, *_ = await asyncio.wait_for(asyncio.gather(learner(), generator("g0"), generator("g1")), 60)
    return waited, served_rewards, admitted, sched.state()


def test_dynamic_sampling_never_trains_zero_variance_and_keeps_the_learner_fed():
    """Half the groups carry no signal. Filtering alone (on-policy, max_staleness=0) makes the
    learner wait while replacements are generated one round after another; over-sampling by the
    measured rate admits them ahead, so the learner waits much less — and no zero-variance group is
    ever trained, no batch is short, no dropped prompt is re-queued."""
    kw = {"staleness": 1, "steps": 12, "batch": 8, "gen_s": 0.01, "train_s": 0.1, "zero_p": 0.5}
    # two runs each, best of two: the machine is shared and one run can be slowed from outside
    plain = [asyncio.run(_run(False, **kw)) for _ in range(2)]
    dyn = [asyncio.run(_run(True, **kw)) for _ in range(2)]
    for _, served, admitted, _ in plain + dyn:
        assert len(served) == 12 * 8 and not any(is_zero_variance(r) for r in served)
        assert len(admitted) == len(set(admitted))  # dropped prompts are consumed, not re-queued
    state = dyn[0][3]
    assert 0.25 < state["zero_variance_rate"] < 0.75 and state["oversample_factor"] > 1.3
    plain_wait, wait = min(p[0] for p in plain), min(d[0] for d in dyn)
    assert wait < 0.75 * plain_wait, (wait, plain_wait)  # measured: ~0.5 s vs ~0.9 s over 12 steps


def _scored(finish, reason, *, blocks=0, executed=0):
    import numpy as np

    from cir_actors.types import ScoredTrajectory, Trajectory, Verdict

    n = 6
    traj = Trajectory("t", 0, np.arange(n, dtype=np.int32), np.array([0, 0, 1, 1, 1, 1], np.int8),
                      np.zeros(n, np.float32), np.zeros(n, np.int32), 2, finish, 2,
                      num_code_blocks=blocks, num_executed=executed)
    return ScoredTrajectory(traj, Verdict(reason == "correct", None, reason), 1.0 if reason == "correct" else -1.0)


def test_void_turns_as_simpletir_defines_them():
    from cir_actors.control.sampling import VoidTurn, void_turn_reason
    from cir_actors.types import FinishReason as F
    from cir_actors.types import VerdictReason as V

    # an answer (right or wrong) in the last turn: not void, however the trajectory ended
    assert void_turn_reason(_scored(F.STOP, V.CORRECT)) is None
    assert void_turn_reason(_scored(F.STOP, V.WRONG, blocks=2, executed=2)) is None
    assert void_turn_reason(_scored(F.LENGTH, V.PARSE_FAILURE)) is None  # a \boxed{} was there
    # no answer: the last turn is void unless it closed a code block (past the budget, not run)
    assert void_turn_reason(_scored(F.LENGTH, V.NO_BOX, blocks=1, executed=1)) == VoidTurn.TRUNCATED
    assert void_turn_reason(_scored(F.STOP, V.NO_BOX)) == VoidTurn.NO_ANSWER
    assert void_turn_reason(_scored(F.BUDGET, V.NO_BOX, blocks=2, executed=2)) == VoidTurn.NO_ANSWER
    assert void_turn_reason(_scored(F.BUDGET, V.NO_BOX, blocks=3, executed=2)) is None
    assert void_turn_reason(_scored(F.ABORTED, V.NO_BOX)) is None  # never trained anyway


def _trace(correct: bool, calls: list[bool], text: str, blocks: int | None = None):
    """A scored trace with executed tool calls (ok flags) and a response text."""
    import numpy as np

    from cir_actors.types import FinishReason, ScoredTrajectory, Trajectory, Verdict, VerdictReason

    n = 6
    traj = Trajectory("t", 0, np.arange(n, dtype=np.int32), np.array([0, 0, 1, 1, 1, 1], np.int8),
                      np.zeros(n, np.float32), np.zeros(n, np.int32), 2, FinishReason.STOP, 4,
                      num_code_blocks=len(calls) if blocks is None else blocks, num_executed=len(calls),
                      num_interp_errors=sum(not ok for ok in calls), response_text=text,
                      tool_calls=tuple({"ok": ok} for ok in calls))
    reason = VerdictReason.CORRECT if correct else VerdictReason.WRONG
    return ScoredTrajectory(traj, Verdict(correct, "5", reason), 1.0 if correct else -1.0)


def test_roc_penalty_is_tool_errors_plus_answer_format():
    from cir_actors.control.sampling import roc_penalty

    assert roc_penalty(_trace(True, [True, True], r"so \boxed{5}")) == 0.0  # clean: no error, one answer
    assert roc_penalty(_trace(True, [True, False], r"\boxed{5}")) == 0.5  # 1 of 2 calls failed
    assert roc_penalty(_trace(True, [], r"\boxed{5}")) == 0.5  # no tool call at all (the reference's 0.5)
    # three answers over 2 turns (1 block + the last): min((3 - 1) / 2, 1) = 1; plus 0 errors
    assert roc_penalty(_trace(True, [True], r"\boxed{4} \boxed{5} \boxed{5}")) == 1.0
    # a \boxed{} inside interpreter output is not the model's answer
    assert roc_penalty(_trace(True, [True], "```output\n\\boxed{3}\n```\n\\boxed{5}")) == 0.0


def _ix(group, st) -> int:
    return next(i for i, x in enumerate(group) if x is st)


def test_roc_keeps_the_groups_proportions_and_the_cleanest_successes():
    from cir_actors.control.sampling import roc_down_sample, roc_group_size

    assert roc_group_size(4, True, 2.0) == 8 and roc_group_size(4, False, 2.0) == 4
    clean, erring, noisy = r"\boxed{5}", r"\boxed{5}", r"\boxed{1} \boxed{5}"
    # 8 traces: 3 correct (penalties 0, 0.5, 0.5 + 0.5), 5 wrong; keep 4
    group = [_trace(False, [True], "x"), _trace(True, [True, False], erring), _trace(False, [], "y"),
             _trace(True, [True], clean), _trace(False, [False], "z"), _trace(True, [True, False], noisy),
             _trace(False, [True], "w"), _trace(False, [True], "v")]  # fmt: skip
    for seed in range(5):
        kept = roc_down_sample(group, 4, random.Random(seed))
        idx = [_ix(group, st) for st in kept]
        assert len(kept) == 4 and idx == sorted(idx)
        # round(5 * 4 / 8) = 2 failures, so 2 successes: the two cleanest (penalties 0 and 0.5)
        assert [i for i in idx if group[i].verdict.correct] == [1, 3]
        assert sum(not group[i].verdict.correct for i in idx) == 2
    # failures are drawn at random: different seeds keep different ones
    picks = {tuple(_ix(group, st) for st in roc_down_sample(group, 4, random.Random(s))) for s in range(20)}
    assert len(picks) > 1
    # a group with one success keeps it (a mixed group stays mixed), and a small group is unchanged
    one = [_trace(True, [True], clean)] + [_trace(False, [True], "x") for _ in range(7)]
    assert sum(st.verdict.correct for st in roc_down_sample(one, 4, random.Random(0))) == 1
    assert all(a is b for a, b in zip(roc_down_sample(group[:4], 4, random.Random(0)), group[:4]))
    # all correct: the n cleanest
    allc = [_trace(True, [False], clean), _trace(True, [True], clean), _trace(True, [], clean), _trace(True, [True], noisy)]
    assert [_ix(allc, st) for st in roc_down_sample(allc, 2, random.Random(0))] == [1, 3]


def test_roc_over_samples_admitted_groups():
    cfg = load_config(None, ["generator.samples_per_prompt=4", "scheduler.roc=true"])
    req = BudgetScheduler(cfg, _tasks(3)).try_admit("g0", 0)
    assert req is not None and req.n == 8


def test_zero_variance_rate_survives_a_checkpoint():
    """A resumed run admits ahead by the rate measured before the cut, not from 0 again."""
    cfg = load_config(None, ["buffer.dynamic_sampling=true", "buffer.zero_variance_ema=0.5"])
    sched = BudgetScheduler(cfg, _tasks(100))
    asyncio.run(sched.batch_inspected(4, {DropReason.ZERO_ADVANTAGE: 12}))  # 12 of 16 inspected
    before = sched.state()
    assert before["zero_variance_rate"] == pytest.approx(0.375)
    resumed = BudgetScheduler(cfg, _tasks(100))
    assert resumed.state()["zero_variance_rate"] == 0.0
    resumed.restore(sched.checkpoint_state(), PolicyUpdate(version=0, budget=1))
    after = resumed.state()
    for k in ("zero_variance_rate", "oversample_factor", "zero_variance_inspected", "zero_variance_dropped"):
        assert after[k] == before[k]
