"""The end of a run (trained and saved) does not wait on a generator that died or hangs after the
last step: each is named in one sentence in its serving report and its stats, a hung one is killed,
and the others' results are kept. Real Ray actors stand in for the generators, the scheduler and the
buffer (the driver's end phase talks to nothing else); one generator is SIGSTOPped, one killed."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from cir_actors.config import load_config
from cir_actors.ops.processes import alive, wait_gone


def _stubs(ray):
    @ray.remote(num_cpus=0, max_restarts=0)
    class Gen:
        def __init__(self, finishes: bool) -> None:
            self.finishes = finishes

        async def run(self) -> dict:
            await asyncio.sleep(0.5 if self.finishes else 3600)
            return {"groups": 3}

        def health(self) -> dict:
            return {"engine_silent_s": 0.0}

        def pid(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0)
    class Sched:
        def asked(self) -> list:
            return ["generator-0", "generator-1", "generator-2"]

        async def wait_served(self, version: int, timeout_s: float = 120.0) -> dict:
            await asyncio.sleep(min(timeout_s, 0.2))
            ok = {"version": version, "checksum": "c", "expected_checksum": "c", "error": None}
            return {"generator-0": ok, "generator-1": ok, "generator-2": {**ok, "version": version - 1}}

    @ray.remote(num_cpus=0)
    class Buf:
        def unresponsive(self) -> dict:
            return {}

    return Gen, Sched, Buf


def test_the_end_names_and_kills_a_hung_or_dead_generator_instead_of_waiting(ray_session):
    import ray

    from cir_actors.control.trainer import FINISH_RUN_S, Trainer

    Gen, Sched, Buf = _stubs(ray)
    t = Trainer.__new__(Trainer)
    t.cfg = load_config(None, ["recovery.generator_hang_s=5"])  # 5 s: a live one on a loaded machine answers in time
    t.workers = [Gen.remote(True), Gen.remote(False), Gen.remote(False)]
    t.scheduler, t.buffer = Sched.remote(), Buf.remote()
    t._probes, t._health, t._starting = {}, {}, {}
    t.runs = [w.run.remote() for w in t.workers]
    stopped = ray.get(t.workers[1].pid.remote(), timeout=60)
    # generator-1 answered health checks during the run (so it is judged), then stopped answering
    t._hung_generators()
    ray.get(t._probes[1][0], timeout=60)
    t._hung_generators()
    ray.get(t._probes[1][0], timeout=60)
    os.kill(stopped, signal.SIGSTOP)
    ray.kill(t.workers[2], no_restart=True)  # generator-2 died before serving the final version
    try:
        t0 = time.monotonic()
        served, stats = t._finish_generators(5)
        took = time.monotonic() - t0
        gone = wait_gone(stopped, 30.0)
    finally:
        if alive(stopped):
            os.kill(stopped, signal.SIGKILL)
    assert took < FINISH_RUN_S / 10, took  # judged by health checks, not by the 300 s deadline
    assert stats[0] == {"groups": 3}, stats
    assert stats[1]["error"].startswith("generator-1 is alive but answered no health check for"), stats
    assert stats[1]["error"].endswith("after the last step (killed)"), stats
    assert stats[2]["error"].startswith("generator-2 died after the last step:"), stats
    assert served["generator-0"]["error"] is None
    assert served["generator-1"]["error"] == stats[1]["error"] and served["generator-2"]["error"] == stats[2]["error"]
    assert gone, "the hung generator's process outlived the run's end"

