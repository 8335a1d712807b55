"""The chaos tests' and `bench.py partials`' way of crashing a generator mid-trajectory: an engine
process that exits between being listed and being signalled neither ends the caller (CI: the
chaos killer thread died of it and did none of its kills) nor leaves the other engine processes
stopped. Real Ray actors stand in for the generator, scheduler and buffer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cir_actors.bench import partials
from cir_actors.ops import processes

NAMESPACE = "cir-crash-helper-test"


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("ready", [False, True])
def test_a_vanished_engine_process_is_skipped_and_nothing_is_left_stopped(ray_session, monkeypatch, ready):
    import ray

    @ray.remote(num_cpus=0)
    class Standin:
        def __init__(self, groups: list[str]):
            self.groups = groups

        def health(self) -> dict:
            return {"pid": os.getpid()}

        def inflight_of(self, name: str) -> list[str]:
            return self.groups

        def inflight_tokens(self, groups: list[str]) -> dict:
            return {"partial_tokens": 8}

    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    gone = subprocess.Popen(["true"])
    gone.wait()  # exited and reaped: listed, but no longer there to signal
    started = processes.descendants(os.getpid())
    listed = [p for p in started if p[0] == engine.pid] + [(gone.pid, 0)]
    monkeypatch.setattr(processes, "descendants", lambda pid: listed)
    actors = [Standin.options(name=n, namespace=NAMESPACE).remote(["g-1"] if ready else [])
              for n in ("generator-0", "scheduler", "buffer")]
    try:
        crashed = partials.crash_mid_trajectory("generator-0", NAMESPACE)
        assert crashed is ready
        if ready:  # the generator crashed: its engine process killed, the actor gone
            assert engine.wait(timeout=30) == -9
            assert not any(n == "generator-0" for n in _names(ray))
        else:  # thawed again: running (or sleeping), not stopped
            assert _state(engine.pid) in ("S", "R"), _state(engine.pid)
    finally:
        engine.kill()
        engine.wait()
        for a in actors:
            ray.kill(a, no_restart=True)


def _names(ray) -> list[str]:
    from ray.util import list_named_actors

    return [a["name"] for a in list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
