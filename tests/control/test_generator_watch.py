"""A generator stopped before the driver read its first health answer is still found hung: once its
run loop has asked the scheduler for work it is past its engine's start-up, and its outstanding
health check is judged from then (CI, 2026-12-06: such a generator was never judged, and Ray found
it 8 min later). One that has not asked yet is still starting and is left alone, until
`recovery.generator_start_s`; meanwhile a weight broadcast waiting for it to join is not judged
against `recovery.learner_timeout_s`. Real Ray actors stand in for the generator, the scheduler and
the buffer: the watch talks to nothing else."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from cir_actors.config import load_config


def test_a_generator_stopped_before_its_first_health_answer_is_judged_once_it_asked_for_work(ray_session):
    import ray

    from cir_actors.control.trainer import Trainer

    Gen, Sched, Buf = _stand_ins()
    t = Trainer.__new__(Trainer)
    t.cfg = load_config(None, ["recovery.generator_hang_s=1"])
    t.workers, t.scheduler, t.buffer = [Gen.remote()], Sched.remote(), Buf.remote()
    t._probes, t._health, t._starting = {}, {}, {0: time.monotonic()}
    pid = ray.get(t.workers[0].pid.remote(), timeout=60)
    os.kill(pid, signal.SIGSTOP)  # its first health check will never be answered
    try:
        assert t._hung_generators() == []  # the check is sent
        time.sleep(1.5)
        assert t._hung_generators() == []  # not asked for work: maybe still starting, not judged
        ray.get(t.scheduler.ask.remote("generator-0"), timeout=60)
        assert t._hung_generators() == []  # started: judged from now
        time.sleep(1.5)
        hung = t._hung_generators()
        assert [i for i, _ in hung] == [0], hung
        assert hung[0][1].startswith("answered no health check for"), hung
    finally:
        os.kill(pid, signal.SIGCONT)
        for a in (*t.workers, t.scheduler, t.buffer):
            ray.kill(a, no_restart=True)


def _stand_ins():
    import ray

    @ray.remote(num_cpus=0)
    class Gen:
        def pid(self) -> int:
            return os.getpid()

        def health(self) -> dict:
            return {"engine_silent_s": 0.0}

    @ray.remote(num_cpus=0)
    class Sched:
        def __init__(self) -> None:
            self.names: list[str] = []

        def asked(self) -> list[str]:
            return self.names

        def ask(self, name: str) -> None:
            self.names.append(name)

        def broadcast_failures(self) -> dict:
            return {}

    @ray.remote(num_cpus=0)
    class Buf:
        def unresponsive(self) -> dict:
            return {}

    return Gen, Sched, Buf


def test_a_generator_that_never_starts_serving_is_judged_at_its_start_deadline(ray_session):
    """An engine start that never ends (here: a generator that answers its health checks but never
    asks for work) is found `recovery.generator_start_s` after the generator was started; one that
    asked in time is not judged by it."""
    import ray

    from cir_actors.control.trainer import Trainer

    Gen, Sched, Buf = _stand_ins()
    t = Trainer.__new__(Trainer)
    t.cfg = load_config(None, ["recovery.generator_start_s=2"])
    t.workers, t.scheduler, t.buffer = [Gen.remote(), Gen.remote()], Sched.remote(), Buf.remote()
    t._probes, t._health = {}, {}
    try:
        ray.get([w.pid.remote() for w in t.workers], timeout=60)
        t._starting = {0: time.monotonic(), 1: time.monotonic()}
        assert t._hung_generators() == []
        ray.get(t.scheduler.ask.remote("generator-1"), timeout=60)
        assert t._hung_generators() == []
        assert list(t._starting) == [0]  # generator-1 serves: off the start watch
        time.sleep(2.2)
        hung = t._hung_generators()
        assert [i for i, _ in hung] == [0], hung
        assert re.fullmatch(r"has not started serving \d+ s after it was started \(recovery.generator_start_s\)",
                            hung[0][1]), hung
    finally:
        for a in (*t.workers, t.scheduler, t.buffer):
            ray.kill(a, no_restart=True)


class _SlowPublication:
    """A learner whose broadcast publication finishes at `done_at` (monotonic); None: never."""

    def __init__(self, done_at: float | None) -> None:
        self.done_at = done_at

    def publication_done(self, timeout_s: float = 0.0) -> bool:
        time.sleep(min(timeout_s, 0.1))
        return self.done_at is not None and time.monotonic() >= self.done_at

    def take_failed_publication(self) -> None:
        return None


def test_a_broadcast_waiting_for_a_starting_generator_is_not_judged_until_it_serves(ray_session):
    """The publication's `recovery.learner_timeout_s` (1 s here) counts from when no generator is
    starting any more: a publication that waits 2 s for a restarted engine to join and then 0.5 s
    more settles; one that stays unfinished with every generator serving is the learner's fault."""
    import ray

    from cir_actors.control.trainer import StatefulRoleDied, Trainer

    _, Sched, _ = _stand_ins()
    t = Trainer.__new__(Trainer)
    t.cfg = load_config(None, ["learner.publish=broadcast", "recovery.learner_timeout_s=1"])
    t.scheduler = Sched.remote()
    t0 = time.monotonic()
    serves_at = t0 + 2.0

    def check_workers() -> None:  # the restarted generator asks for work at `serves_at`
        if time.monotonic() >= serves_at:
            t._starting.pop(0, None)

    t._check_workers = check_workers
    try:
        t._starting = {0: t0}
        t.learner = _SlowPublication(done_at=serves_at + 0.5)
        t._settle_publication()
        assert time.monotonic() - t0 >= 2.5

        t._starting = {}
        t.learner = _SlowPublication(done_at=None)
        t1 = time.monotonic()
        with pytest.raises(StatefulRoleDied, match="recovery.learner_timeout_s"):
            t._settle_publication()
        assert time.monotonic() - t1 < 10
    finally:
        ray.kill(t.scheduler, no_restart=True)


def test_the_learners_probe_does_not_judge_a_broadcast_while_a_receiver_starts(ray_session):
    """`Learner.probe` (called while the driver waits for a batch) judges an unfinished broadcast
    against `recovery.learner_timeout_s` from when the driver last said a receiver was starting."""
    import ray

    from cir_actors.learning.learner import Learner
    from cir_actors.types import LearnerHung

    @ray.remote(num_cpus=0)
    def never_done() -> None:
        time.sleep(60)

    lrn = Learner.__new__(Learner)
    lrn.cfg = load_config(None, ["recovery.learner_timeout_s=1"])
    ref = never_done.remote()
    lrn._pending = [ref]
    lrn._pending_t0 = lrn._pending_judged_from = time.perf_counter() - 5  # published 5 s ago
    try:
        lrn.probe(receivers_starting=True)  # a receiver's engine is starting: not judged
        lrn.probe()  # judged from the last call that said so: 0 s ago
        time.sleep(1.2)
        with pytest.raises(LearnerHung, match="recovery.learner_timeout_s"):
            lrn.probe()
    finally:
        ray.cancel(ref, force=True)


def test_a_resume_waits_for_a_starting_generator_to_detach_until_its_start_deadline(ray_session, monkeypatch):
    """An automatic resume keeps the generators that detach in time. One still starting (its engine
    loading, so the detach call waits behind its constructor) is given what is left of
    `recovery.generator_start_s` rather than DETACH_S: killing it would cost a whole engine start.
    One that has served is killed at DETACH_S (+5 s) as before."""
    import ray

    from cir_actors.control import trainer as trainer_mod

    @ray.remote(num_cpus=0)
    class Starting:
        def __init__(self, start_s: float) -> None:
            time.sleep(start_s)  # the engine loading

        def detach(self, timeout_s: float) -> dict:
            return {}

    monkeypatch.setattr(trainer_mod, "DETACH_S", 0.5)
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    t.cfg = load_config(None, ["recovery.generator_start_s=60"])
    t._health = {}
    t.workers = [Starting.remote(8.0), Starting.remote(40.0)]
    t._starting = {0: time.monotonic()}  # generator-1 has served: its deadline is DETACH_S + 5 s
    t0 = time.monotonic()
    try:
        kept = t._detach_generators()
        waited = time.monotonic() - t0
        assert kept[0] is t.workers[0], kept  # waited for past DETACH_S + 5 s
        assert kept[1] is None, kept  # not detached by its deadline: killed
        assert 7.0 < waited < 30.0, waited
    finally:
        for w in t.workers:
            ray.kill(w, no_restart=True)
