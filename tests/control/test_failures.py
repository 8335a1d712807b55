"""The failure policy in plain pytest: the scheduler's ledger with the buffer reporting to it, a
generator declared dead mid-run, checkpoint cuts taken while generators run, weight pushes that
fail, and the retrying adapters (fake actor handles that die). The same paths with real actors
are in tests/control/test_chaos.py."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import numpy as np
import pytest
import ray.exceptions as rex

from cir_actors.config import load_config
from cir_actors.control.budget_scheduler import BudgetScheduler
from cir_actors.control.failures import ReplicatedInterpreter, ReplicatedScorer, restart_options
from cir_actors.control.replay_buffer import ReplayBuffer
from cir_actors.types import (
    DropReason,
    ExecResult,
    InfraFault,
    PartialTrajectory,
    PolicyUpdate,
    ServedPolicy,
    Task,
    Verdict,
    VerdictReason,
)


def _cfg(**kv):
    base = {"learner.prompts_per_step": 2, "learner.mini_batch_prompts": 2, "generator.samples_per_prompt": 2,
            "scheduler.total_steps": 12, "recovery.push_retries": 2}
    base.update(kv)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _tasks(n):
    return [Task(f"t{i}", f"p{i}", str(i), f"p{i}", (1, 2, 3)) for i in range(n)]


def _partial(task_id: str, index: int, version: int) -> PartialTrajectory:
    return PartialTrajectory(task_id, index, np.array([1, 2, 3, 9], np.int32), np.array([0, 0, 0, 1], np.int8),
                             np.array([0, 0, 0, -0.5], np.float32), np.array([-1, -1, -1, version], np.int32),
                             prompt_len=3, budget=0, context_start=0)


class _Run:
    """Generators, buffer (reporting to the scheduler's ledger) and a learner in one event loop.
    `kill(name)` makes a generator die the way the driver sees it: mid-group, samples half added."""

    def __init__(self, cfg, tasks, sched=None, buf=None, seed=0):
        self.cfg = cfg
        self.sched = sched or BudgetScheduler(cfg, tasks)
        self.buf = buf or ReplayBuffer(cfg.scheduler.max_staleness, ledger=self.sched,
                                       continue_partials=cfg.generator.continue_partials)
        self.served = {}
        self.dead: set[str] = set()
        self.trained_ids: list[int] = []
        self.trained_tasks: list[str] = []
        self.rng = random.Random(seed)
        self.done = asyncio.Event()
        self.checks = 0
        self.streamed: set[tuple[int, int]] = set()  # (group, sample) with a partial in the buffer
        self.continued: list[tuple[int, int]] = []  # samples continued from a partial
        self.restarted: list[tuple[int, int]] = []  # samples of a continued group started over despite a partial

    async def generator(self, name):
        self.served[name] = self.sched.current_update().version
        while not self.done.is_set():
            if name in self.dead:
                await asyncio.sleep(0.001)
                continue
            req = await self.sched.admit(name, self.served[name], timeout_s=0.01)
            if req is None:
                self.served[name] = self.sched.current_update().version
                continue
            indices, partials = range(req.n), {}
            if req.continued:  # what the rollout worker does with a handed-over group
                cont = await self.buf.continuation(req.group_id)
                indices = [] if cont["done"] else [i for i in range(req.n) if i not in cont["have"]]
                partials = cont["partials"]
            for i in indices:
                if i in partials:
                    self.continued.append((req.group_id, i))
                elif (req.group_id, i) in self.streamed and req.continued:
                    self.restarted.append((req.group_id, i))
                elif self.cfg.generator.continue_partials and await self.buf.add_partial(
                    req.group_id, i, [_partial(req.task.task_id, i, self.served[name])], 1, self.served[name]
                ):  # a segment boundary: the partial went to the buffer
                    self.streamed.add((req.group_id, i))
                await asyncio.sleep(self.rng.random() * 0.002)
                if name in self.dead:
                    break  # died mid-group: the rest never arrives
                try:
                    await self.buf.add(req.group_id, req.n, req.admitted_version, i, [req.task.task_id], float(i % 2),
                                       self.served[name])
                except ValueError:
                    break  # the group was closed (its generator declared dead)

    async def heal(self, name):
        """What the driver does when a generator died."""
        self.dead.add(name)
        lost = await self.sched.fail_generator(name)
        if not self.cfg.generator.continue_partials:
            self.buf.discard_groups(lost, DropReason.GENERATOR_LOST)
        await asyncio.sleep(0.005)
        await self.sched.register_generator(name, None)
        self.sched._verified[name] = True
        self.served[name] = self.sched.current_update().version
        self.dead.discard(name)

    async def check(self):
        snap = await self.buf.snapshot()
        assert snap["groups"]["ok"], snap["groups"]
        assert snap["trajectories"]["ok"], snap["trajectories"]
        self.checks += 1

    async def learner(self, steps, kill_at=None, stop_after=None, cuts=None):
        """`cuts`: a list to which a checkpoint cut is appended after every step, as the driver takes
        them (between steps, the generators running on while the cut is taken)."""
        version = self.sched.current_update().version
        deadline = asyncio.get_running_loop().time() + 60.0
        while version < steps:
            if asyncio.get_running_loop().time() > deadline:
                self.done.set()
                raise TimeoutError(f"no progress past version {version}: {self.sched.state()}")
            batch = await self.buf.get_batch(self.cfg.learner.prompts_per_step, version, timeout_s=0.02)
            await self.check()
            if batch is None or not batch.groups:
                continue
            self.sched.groups_trained(batch.group_ids)
            self.trained_ids += batch.group_ids
            self.trained_tasks += [g[0] for g in batch.groups]
            version += 1
            await self.sched.advance(PolicyUpdate(version=version, budget=0))
            await self.check()
            if kill_at is not None and version in kill_at:
                await self.heal(kill_at[version])
                await self.check()
            if cuts is not None:
                await asyncio.sleep(self.rng.random() * 0.004)  # generators add and complete meanwhile
                if version % 2 == 0:  # every other cut waits (up to 1 s) for an in-flight group with a sample in
                    until = asyncio.get_running_loop().time() + 1.0
                    while not any(g in self.buf._partial for g in self.sched.inflight_of("g0") + self.sched.inflight_of("g1")):
                        if asyncio.get_running_loop().time() > until:
                            break
                        await asyncio.sleep(0.0002)
                cuts.append((list(self.trained_tasks), version, await self.buf.checkpoint_cut()))
            if stop_after is not None and version == stop_after:
                break
        self.done.set()

    async def go(self, steps, **kw):
        await asyncio.gather(self.generator("g0"), self.generator("g1"), self.learner(steps, **kw))


@pytest.mark.parametrize("continue_partials", [False, True])
def test_ledger_holds_at_every_step_through_generator_deaths(continue_partials):
    cfg = _cfg(**{"scheduler.max_staleness": 1, "generator.continue_partials": continue_partials})
    run = _Run(cfg, _tasks(30))
    asyncio.run(run.go(12, kill_at={3: "g0", 5: "g1", 8: "g0"}))
    assert len(run.trained_ids) == len(set(run.trained_ids)) == 24  # no group trained twice
    c = run.sched.conservation()
    assert c["ok"] and c["trained"] == 24
    assert run.checks > 24
    lost = c["dropped_by_reason"].get(DropReason.GENERATOR_LOST, 0)
    if not continue_partials:
        assert lost >= 1  # the deaths did cost groups
    else:  # nothing dropped: the dead generators' groups went on elsewhere from their samples and partials
        assert lost == 0 and run.sched.state()["continued_groups"] >= 1
        assert run.continued and not run.restarted, (run.continued, run.restarted)


@pytest.mark.parametrize("continue_partials", [False, True])
def test_checkpoint_cut_under_live_generation_loses_and_repeats_nothing(continue_partials):
    """Cuts taken after every step, as the driver takes them, while both generators go on adding
    samples; each cut resumed and run to the end trains exactly the prompts the first run did not,
    and the counters carry over. With continue_partials, the groups in flight at a cut are part of
    it (finished samples and partials) and are continued after the resume, not regenerated."""
    cfg = _cfg(**{"scheduler.max_staleness": 1, "data.shuffle": "false", "scheduler.total_steps": 10,
                  "generator.continue_partials": continue_partials})
    tasks = _tasks(20)  # 10 steps x 2 groups = 20 prompts: each exactly once

    async def first():
        run = _Run(cfg, tasks, seed=1)
        cuts = []
        await run.go(10, stop_after=6, cuts=cuts)
        return cuts

    cuts = asyncio.run(first())
    assert len(cuts) == 6
    if continue_partials:  # groups were in flight at a cut, saved with what the buffer held of them
        assert not any(c["scheduler"]["dropped"].get("resumed", 0) for _, _, c in cuts)
        assert any(g["finished"] for _, _, c in cuts for g in c["inflight"])
        assert any(g["partials"] for _, _, c in cuts for g in c["inflight"])
    else:
        assert any(c["scheduler"]["dropped"].get("resumed", 0) for _, _, c in cuts)
    continued = 0
    for trained_before, version, cut in cuts:
        async def resume(cut=cut, version=version):
            sched = BudgetScheduler(cfg, tasks)
            sched.restore(cut["scheduler"], PolicyUpdate(version=version, budget=0))
            buf = ReplayBuffer(1, ledger=sched, continue_partials=continue_partials)
            buf._put = lambda obj: obj  # no Ray here: "refs" are the objects themselves
            from cir_actors.control.replay_buffer import _Group

            for d in cut["groups"]:
                g = _Group(d["group_id"], d["n"], d["admitted_version"])
                g.refs = dict(enumerate(d["samples"]))
                g.rewards = dict(enumerate(d["rewards"]))
                g.min_versions = dict(enumerate(d["min_versions"]))
                buf._ready[g.group_id] = g
            buf.restore_inflight(cut["inflight"])
            buf.restore_counters(cut["counters"])
            run = _Run(cfg, tasks, sched=sched, buf=buf, seed=2)
            run.streamed = {(g["group_id"], p["index"]) for g in cut["inflight"] for p in g["partials"]}
            await run.check()  # the identities hold right after a resume
            await run.go(10)
            return run

        run2 = asyncio.run(resume())
        every = Counter(trained_before + run2.trained_tasks)
        assert sorted(every) == sorted(t.task_id for t in tasks), every
        assert set(every.values()) == {1}, every
        assert run2.sched.conservation()["ok"]
        assert not run2.restarted  # no sample with a saved partial started over
        continued += len(run2.continued)
    assert (continued > 0) == continue_partials


def test_resume_with_other_data_is_refused():
    cfg = _cfg()
    s = BudgetScheduler(cfg, _tasks(5))
    state = s.checkpoint_state()
    other = _cfg(**{"data.seed": 7})
    with pytest.raises(ValueError, match="different data config.*data.seed"):
        BudgetScheduler(other, _tasks(5)).restore(state, PolicyUpdate(version=0, budget=0))


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _FlakyGenerator:
    """A generator handle whose update_weights fails `fail` times, or answers a wrong fingerprint."""

    def __init__(self, fail=0, wrong=False, dies=False):
        self.calls = 0
        self.fail, self.wrong, self.dies = fail, wrong, dies
        self.update_weights = _Remote(self._update)

    async def _update(self, update):
        self.calls += 1
        if self.dies:
            raise rex.ActorDiedError()
        if self.calls <= self.fail:
            raise RuntimeError("connection reset")
        return ServedPolicy("g0", update.version, update.budget, "bad" if self.wrong else update.checksum)


def _push(gen, cfg=None):
    async def go():
        s = BudgetScheduler(cfg or _cfg(), _tasks(4))
        await s.register_generator("g0", gen)
        await s.advance(PolicyUpdate(version=1, budget=0, checksum="abc"))
        await asyncio.gather(*s._pushes)
        return s

    return asyncio.run(go())


def test_weight_push_fails_once_then_succeeds():
    gen = _FlakyGenerator(fail=1)
    s = _push(gen)
    assert gen.calls == 2 and s.push_failures() == {}
    assert s.state()["served"]["g0"]["checksum"] == "abc" and s.try_admit("g0", 1) is not None


def test_weight_push_that_keeps_failing_names_generator_version_and_fingerprints():
    s = _push(_FlakyGenerator(wrong=True))
    (msg,) = s.push_failures().values()
    assert msg == ("weight push to g0 failed after 3 attempts: version 1, expected fingerprint abc, "
                   "fingerprint mismatch: received bad")
    assert s.try_admit("g0", 1) is None  # never admitted with weights it could not prove
    (msg,) = _push(_FlakyGenerator(fail=99)).push_failures().values()
    assert "g0" in msg and "version 1" in msg and "expected fingerprint abc" in msg and "connection reset" in msg


def test_a_push_overtaken_by_a_newer_version_is_superseded_not_a_failure():
    """The generator answers that it serves a newer version than the one pushed (it loaded that
    first, and refuses to go back): the push is superseded, not a fingerprint mismatch retried into
    a run-ending failure, and its answer does not overwrite the newer push's report."""

    class _Newer(_FlakyGenerator):
        async def _update(self, update):
            self.calls += 1
            return ServedPolicy("g0", update.version + 1, update.budget, "newer")

    gen = _Newer()
    s = _push(gen)
    assert gen.calls == 1 and s.push_failures() == {} and "g0" not in s.state()["served"]


def test_push_to_a_dead_generator_is_left_to_the_driver():
    s = _push(_FlakyGenerator(dies=True))
    assert s.push_failures() == {} and s.dead_generators() == ["g0"]
    assert s.try_admit("g0", 1) is None


def test_a_failed_broadcast_push_is_not_retried_and_the_republication_reaches_everyone_once():
    """A broadcast is one collective: a receiver cannot retry it alone. Its failure is reported
    (`broadcast_failures`), not made a run-ending push failure, and the generator is not admitted;
    `republish` sends the version through the object store to every live generator but the one
    skipped, and supersedes the broadcast (its late failure changes nothing)."""

    async def go():
        s = BudgetScheduler(_cfg(), _tasks(4))
        failing, fine, fresh = _FlakyGenerator(fail=1), _FlakyGenerator(), _FlakyGenerator()
        for name, gen in (("g0", failing), ("g1", fine), ("g2", fresh)):
            await s.register_generator(name, gen)
        await s.advance(PolicyUpdate(version=1, budget=0, checksum="abc", broadcast_group="gloo://h:1?world=4"))
        await asyncio.gather(*s._pushes)
        assert failing.calls == 1 and s.push_failures() == {}, "a broadcast push was retried or ended the run"
        assert list(s.broadcast_failures()) == ["g0"] and "connection reset" in s.broadcast_failures()["g0"]
        assert s.try_admit("g0", 1) is None and s.try_admit("g1", 1) is not None
        with pytest.raises(ValueError, match="current version is 1"):
            await s.republish(PolicyUpdate(version=0, budget=0, checksum="old", weights={}))
        await s.republish(PolicyUpdate(version=1, budget=0, checksum="abc", weights={}), skip=["g2"])
        await asyncio.gather(*s._pushes)
        assert (failing.calls, fine.calls, fresh.calls) == (2, 2, 1)
        assert s.broadcast_failures() == {} and s.current_update().broadcast_group is None
        served = s.state()["served"]["g0"]
        assert (served["version"], served["checksum"], served["error"]) == (1, "abc", None), served
        assert s.try_admit("g0", 1) is not None

    asyncio.run(go())


class _Pool:
    def __init__(self, behaviour):
        self.behaviour = behaviour  # list of "ok" | "crash" | "dead", consumed per call
        self.run_async = _Remote(self._run)
        self.score_async = _Remote(self._score)
        self.health = _Remote(self._health)

    async def _health(self):
        return {"calls_in_flight": 1, "zygote_unanswered": 0}

    def _next(self):
        b = self.behaviour.pop(0) if self.behaviour else "ok"
        if b == "dead":
            raise rex.ActorDiedError()
        return b

    async def _run(self, code, timeout_s=None, session=None):
        b = self._next()
        if b == "silent":  # alive, but the call is never answered (lost in the pool or on the way)
            await asyncio.Event().wait()
        if b == "crash":
            return ExecResult(False, "", "InterpreterCrashed")
        return ExecResult(True, "2\n")

    async def _score(self, response, gold):
        if self._next() == "crash":
            raise InfraFault("checker died")
        return Verdict(True, "2", VerdictReason.CORRECT)


def test_interpreter_faults_are_retried_on_another_pool_then_raised():
    a, b = _Pool(["crash"]), _Pool(["dead"])
    interp = ReplicatedInterpreter([a, b], retries=2)
    r = asyncio.run(interp.run_async("print(1+1)"))
    assert r.ok and r.stdout == "2\n" and interp.faults == 2  # a crashed, b dead, a again: ok
    always = ReplicatedInterpreter([_Pool(["crash"] * 9)], retries=2)
    with pytest.raises(InfraFault, match="3 times"):
        asyncio.run(always.run_async("print(1)"))
    # a session's state died with its pool: never retried elsewhere
    with pytest.raises(InfraFault, match="session"):
        asyncio.run(ReplicatedInterpreter([_Pool(["crash"]), _Pool([])]).run_async("x", session="s1"))
    # what the code did is never an infrastructure fault
    class _Bug(_Pool):
        async def _run(self, *a, **k):
            raise ZeroDivisionError

    bug = _Bug([])
    bug.run_async = _Remote(bug._run)
    with pytest.raises(ZeroDivisionError):
        asyncio.run(ReplicatedInterpreter([bug]).run_async("x"))


def test_an_unanswered_interpreter_call_is_retried_at_its_deadline(caplog):
    """A call the pool never answers counts as an infrastructure fault at recovery.interpreter_call_s
    past its own time limit, is retried on the next pool, and the warning names the deadline; a
    session's call is not retried (its state is in the silent pool)."""
    import time

    interp = ReplicatedInterpreter([_Pool(["silent"]), _Pool([])], retries=2, timeout_s=0.3)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="cir_actors.control.failures"):
        r = asyncio.run(interp.run_async("print(1+1)", timeout_s=0.1))
    assert r.ok and interp.faults == 1 and 0.4 <= time.monotonic() - t0 < 5
    assert "no answer in 0.4 s (timeout + recovery.interpreter_call_s); the pool's health then: " \
        "{'calls_in_flight': 1, 'zygote_unanswered': 0}" in caplog.text
    with pytest.raises(InfraFault, match="session s1 lost its pool .no answer in"):
        asyncio.run(ReplicatedInterpreter([_Pool(["silent"]), _Pool([])], timeout_s=0.2).run_async("x", session="s1"))


class _SilentLocalPool:
    """An in-process pool (plain methods, no `.remote`: an evaluation without Ray) whose call is never answered."""

    async def run_async(self, code, timeout_s=None, session=None):
        await asyncio.Event().wait()

    def health(self):
        return {"calls_in_flight": 1, "zygote_unanswered": 1, "zygote_alive": 1}


def test_a_local_pool_gets_the_same_deadline(caplog):
    """Without Ray (the demo's and evaluate.py's local evaluation) the pool object itself is called
    through the adapter: an unanswered call is retried at its deadline, then fails in one sentence."""
    import time

    interp = ReplicatedInterpreter([_SilentLocalPool()], retries=1, timeout_s=0.2)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="cir_actors.control.failures"), \
            pytest.raises(InfraFault, match="failed 2 times for infrastructure reasons .no answer in 0.3 s"):
        asyncio.run(interp.run_async("print(1)", timeout_s=0.1))
    assert interp.faults == 2 and 0.6 <= time.monotonic() - t0 < 5
    assert "the pool's health then: {'calls_in_flight': 1, 'zygote_unanswered': 1, 'zygote_alive': 1}" in caplog.text


def test_scorer_faults_are_retried_then_raised():
    s = ReplicatedScorer([_Pool(["dead"]), _Pool(["crash"]), _Pool([])], retries=2)
    assert asyncio.run(s.score("\\boxed{2}", "2")).correct and s.faults == 2
    with pytest.raises(InfraFault):
        asyncio.run(ReplicatedScorer([_Pool(["crash"] * 5)], retries=1).score("x", "2"))


def test_restart_policy_per_role():
    cfg = _cfg()
    assert restart_options("scorer", cfg)["max_restarts"] > 0 and restart_options("scorer", cfg)["max_task_retries"] > 0
    assert restart_options("interpreter", cfg)["max_task_retries"] > 0
    assert restart_options("interpreter", _cfg(**{"interpreter.sessions": "true"}))["max_task_retries"] == 0
    for role in ("generator", "learner", "buffer", "scheduler"):
        assert restart_options(role, cfg) == {"max_restarts": 0, "max_task_retries": 0}


def test_real_zygote_crash_mid_call_is_retried_not_shown_to_the_model():
    import os
    import signal

    from cir_actors.sandbox.pool import InterpreterPool

    with InterpreterPool(max_workers=2, timeout_s=20) as pool:
        assert pool.run("print(1)").ok  # warm

        async def go():
            interp = ReplicatedInterpreter([pool], retries=2)  # the local object, as an evaluation without Ray
            call = asyncio.create_task(interp.run_async("import time; time.sleep(1.5); print('done')"))
            await asyncio.sleep(0.5)
            running = pool.health()  # what an unanswered call's warning quotes: the call is on the zygote
            assert (running["calls_in_flight"], running["zygote_unanswered"], running["zygote_alive"]) == (1, 1, 1)
            os.kill(pool._zygote.proc.pid, signal.SIGKILL)  # the zygote dies under the running call
            return await call, interp.faults

        result, faults = asyncio.run(go())
        assert result.ok and result.stdout == "done\n", result  # the retry ran it on a new zygote
        assert faults == 1 and pool.zygote_restarts == 1
        assert pool.health()["calls_in_flight"] == 0 and pool.health()["zygote_unanswered"] == 0


def test_real_checker_crash_is_retried_and_a_deadline_is_a_verdict():
    import os
    import signal

    from cir_actors.config import ScorerConfig
    from cir_actors.scoring.scorer import Scorer

    scorer = Scorer(ScorerConfig(num_workers=1, timeout_s=5.0))
    try:
        scorer.warmup()
        (pid,) = scorer.worker_pids()
        os.kill(pid, signal.SIGKILL)  # the math-verify worker is dead before the check
        verdict = scorer.score("so \\boxed{\\frac{1}{2}}", "0.5")
        assert verdict.correct and verdict.reason == VerdictReason.CORRECT  # re-checked, not PARSE_FAILURE
        assert scorer.stats()["workers_replaced"] == 1
    finally:
        scorer.close()


def test_buffer_continuation_keeps_the_latest_partial_and_counts_a_late_duplicate():
    from cir_actors.types import replace

    async def go():
        sched = BudgetScheduler(_cfg(**{"generator.samples_per_prompt": 3}), _tasks(4))
        buf = ReplayBuffer(1, ledger=sched, continue_partials=True)
        req = sched.try_admit("g0", 0)
        gid = req.group_id
        await buf.add(gid, 3, 0, 0, ["s0"], 1.0, 0)
        short, long = _partial("t0", 1, 0), replace(_partial("t0", 1, 0), prompt_len=2)  # response 1 vs 2 tokens
        assert await buf.add_partial(gid, 1, [long], long.response_len, 0)
        assert not await buf.add_partial(gid, 1, [short], short.response_len, 0)  # older (shorter): not kept
        assert not await buf.add_partial(gid, 0, [short], 1, 0)  # sample 0 is finished
        await sched.fail_generator("g0")
        sched._verified["g1"] = True
        again = sched.try_admit("g1", 0)
        assert again.group_id == gid and again.continued and sched.capacity() >= 0
        cont = await buf.continuation(gid)
        assert cont == {"done": False, "have": [0], "partials": {1: [long]}}
        await buf.add(gid, 3, 0, 1, ["s1 continued"], 0.0, 0)
        await buf.add(gid, 3, 0, 0, ["s0 again"], 1.0, 0)  # the dead generator's late copy: counted, not kept
        assert buf.stats()["dropped_trajectories"] == {DropReason.DUPLICATE: 1}
        assert (await buf.add(gid, 3, 0, 2, ["s2"], 0.0, 0)) is True  # completes the group
        assert (await buf.continuation(gid))["done"]
        snap = await buf.snapshot()
        assert snap["groups"]["ok"] and snap["trajectories"]["ok"] and snap["groups"]["buffered"] == 1

    asyncio.run(go())


def test_checkpoint_cut_pairs_each_inflight_item_with_its_own_data():
    """Several in-flight groups, each with finished samples and partials: the cut's data for each
    item is that item's (the fetch is one call over all of them), and it survives encoding."""
    from cir_actors.serialization import decode_partial, encode_partial

    async def go():
        sched = BudgetScheduler(_cfg(**{"generator.samples_per_prompt": 3}), _tasks(6))
        buf = ReplayBuffer(1, ledger=sched, continue_partials=True)
        for _ in range(3):
            req = sched.try_admit("g0", 0)
            await buf.add(req.group_id, 3, 0, 0, [f"finished {req.group_id}/0"], 1.0, 0)
            for i in (1, 2):
                await buf.add_partial(req.group_id, i, [_partial(req.task.task_id, i, 0)], 1, 0)
        return await buf.checkpoint_cut()

    cut = asyncio.run(go())
    assert len(cut["inflight"]) == 3
    for g in cut["inflight"]:
        assert [f["data"] for f in g["finished"]] == [f"finished {g['group_id']}/0"]
        assert [(p["index"], p["data"].sample_index) for p in g["partials"]] == [(1, 1), (2, 2)]
        for p in g["partials"]:
            back = decode_partial(encode_partial(p["data"]))
            assert back.sample_index == p["index"] and back.token_ids_T.tolist() == [1, 2, 3, 9]


def test_a_sample_whose_generator_dies_before_handing_it_over_is_not_kept(ray_session):
    """The generator announces a sample (`pull`) and dies before the buffer's `take` runs: nothing
    is kept (kept, the error would have been a group lost at training time), the sample is not in
    the group's `have`, so whoever continues the group runs it again; a live one is kept."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    class Source:
        def __init__(self, out):
            self.out = out

        def take(self, key):
            if key == "die":
                os._exit(1)
            return True, self.out.pop(key)

        def take_partial(self, key):
            return self.take(key)

    async def go():
        sched = BudgetScheduler(_cfg(**{"generator.samples_per_prompt": 2}), _tasks(2))
        buf = ReplayBuffer(1, ledger=sched, continue_partials=True)
        gid = sched.try_admit("g0", 0).group_id
        dying, alive = Source.remote({}), Source.remote({"s": "sample 1", "p": _partial("t0", 1, 0)})
        assert not await buf.pull_partial(gid, 0, dying, "die", 3, 0)
        assert not await buf.pull(gid, 2, 0, 0, Source.remote({}), "die", 1.0, 0)
        assert buf.stats()["takes_failed"] == 2 and buf.stats()["partials_held"] == 0
        assert (await buf.continuation(gid))["have"] == []
        assert not await buf.pull(gid, 2, 0, 1, alive, "s", 0.0, 0)  # kept; the group is not complete yet
        assert await buf.pull_partial(gid, 0, alive, "p", 1, 0), buf.stats()
        cont = await buf.continuation(gid)
        assert cont["have"] == [1] and list(cont["partials"]) == [0]
        assert ray.get(buf._partial[gid].refs[1], timeout=30) == "sample 1"
        assert (await cont["partials"][0][0]).sample_index == 1
        ray.kill(alive)
        assert ray.get(buf._partial[gid].refs[1], timeout=30) == "sample 1"  # owned here: outlives its producer

    asyncio.run(go())


def test_a_sample_whose_generator_hangs_is_not_waited_for_forever(ray_session):
    """A producer that is alive but never hands its sample over: `pull` gives up at the take
    deadline with nothing kept (the sample is not in the group's `have`, so the group's
    continuation runs it again), and the buffer names the producer in `unresponsive()` — the
    driver restarts it like a dead one. A producer that answers in time is not named."""
    import asyncio
    import time

    import ray

    from cir_actors.control.replay_buffer import actor_id

    @ray.remote(num_cpus=0)
    class Source:
        async def take(self, key):
            if key == "hang":
                await asyncio.sleep(3600)
            return True, f"sample {key}"

        def ready(self):
            return True

    async def go():
        sched = BudgetScheduler(_cfg(**{"generator.samples_per_prompt": 2}), _tasks(2))
        buf = ReplayBuffer(1, ledger=sched, continue_partials=True, take_timeout_s=1.0)
        gid = sched.try_admit("g0", 0).group_id
        hung, fine = Source.remote(), Source.remote()
        # Both started first: a worker process starting on a loaded machine (CI beside the chaos
        # runs) took longer than the 1 s take deadline, and the fine sample timed out too.
        assert await asyncio.wait_for(asyncio.gather(hung.ready.remote(), fine.ready.remote()), 120)
        t0 = time.monotonic()
        assert not await buf.pull(gid, 2, 0, 0, hung, "hang", 1.0, 0)
        assert 1.0 <= time.monotonic() - t0 < 30
        assert not await buf.pull(gid, 2, 0, 1, fine, "s", 0.0, 0)  # kept; the group is not complete yet
        assert (await buf.continuation(gid))["have"] == [1]
        named = buf.unresponsive()
        assert list(named) == [actor_id(hung)] and "within 1 s" in named[actor_id(hung)], named
        assert buf.stats()["takes_timed_out"] == 1 and buf.stats()["takes_failed"] == 1
        ray.kill(hung)

    asyncio.run(go())


def test_cache_counts_per_step_survive_a_silent_and_a_restarted_pool():
    """A pool that misses a step's deadline is counted when it next answers (not twice, not lost);
    one whose counters went down was restarted and counts from 0."""
    from cir_actors.control.trainer import cache_step_counts

    def c(lookups, hits):
        return {"lookups": lookups, "hits": hits, "calls_saved": hits}

    last: dict = {}
    assert cache_step_counts(last, {0: c(10, 4), 1: c(6, 1)}) == c(16, 5)
    assert cache_step_counts(last, {0: c(15, 6)}) == c(5, 2)  # pool 1 silent this step
    assert cache_step_counts(last, {0: c(15, 6), 1: c(9, 3)}) == c(3, 2)  # pool 1's two steps, once
    assert cache_step_counts(last, {0: c(2, 1), 1: c(9, 3)}) == c(2, 1)  # pool 0 restarted
    assert sum(v["lookups"] for v in last.values()) == 11


def test_a_shared_memory_publication_waits_for_its_slot_in_rounds_while_generators_are_healed():
    """`Trainer._publish` under `learner.publish: shared_memory`: while a generator holds the slot
    (`SlotBusy` from rank 0), the driver checks its generators between short rounds (that is how a
    stuck one is found, and its death frees the slot), then publishes; past
    `recovery.push_timeout_s` the run ends with one sentence naming the slot and the setting."""
    from ray.exceptions import RayTaskError

    from cir_actors.control.trainer import SLOT_WAIT_S, Trainer
    from cir_actors.learning.shared_weights import SlotBusy

    class _Learner:
        def __init__(self, busy):
            self.busy, self.waits = busy, []

        def publish(self, slot_wait_s=None):
            self.waits.append(slot_wait_s)
            if len(self.waits) <= self.busy:
                try:  # as it reaches the driver from rank 0
                    raise SlotBusy("publishing version 4 into /dev/shm/x: slot 1 stayed locked for 5 s")
                except SlotBusy as e:
                    raise RayTaskError("publish_shared_memory", "traceback", e).as_instanceof_cause() from None
            return PolicyUpdate(version=4, budget=1)

    def trainer(busy, **over):
        t = Trainer.__new__(Trainer)
        t.cfg = _cfg(**{"learner.publish": "shared_memory", **over})
        t.learner, t.checks = _Learner(busy), 0
        t._check_workers = lambda: setattr(t, "checks", t.checks + 1)
        return t

    t = trainer(busy=2)
    assert t._publish().version == 4
    assert t.learner.waits == [SLOT_WAIT_S] * 3 and t.checks == 2
    t = trainer(busy=10**9, **{"recovery.push_timeout_s": 0.01})
    with pytest.raises(RuntimeError, match=r"slot 1 stayed locked for 5 s: no generator freed it within "
                                           r"recovery.push_timeout_s \(0 s\)"):
        t._publish()
    assert t.checks >= 1
    t = trainer(busy=0, **{"learner.publish": "object_store"})
    assert t._publish().version == 4 and t.learner.waits == [None]  # other paths: no rounds
