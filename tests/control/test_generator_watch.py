"""A generator stopped before the driver read its first health answer is still found hung: once its
run loop has asked the scheduler for work it is past its engine's start-up, and its outstanding
health check is judged from then (CI, 2026-12-06: such a generator was never judged, and Ray found
it 8 min later). One that has not asked yet is still starting and is left alone. Real Ray actors
stand in for the generator, the scheduler and the buffer: the watch talks to nothing else."""

from __future__ import annotations

import os
import signal
import time

from cir_actors.config import load_config


def test_a_generator_stopped_before_its_first_health_answer_is_judged_once_it_asked_for_work(ray_session):
    import ray

    from cir_actors.control.trainer import Trainer

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

    @ray.remote(num_cpus=0)
    class Buf:
        def unresponsive(self) -> dict:
            return {}

    t = Trainer.__new__(Trainer)
    t.cfg = load_config(None, ["recovery.generator_hang_s=1"])
    t.workers, t.scheduler, t.buffer = [Gen.remote()], Sched.remote(), Buf.remote()
    t._probes, t._health = {}, {}
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
