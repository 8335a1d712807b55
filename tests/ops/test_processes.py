"""Finding an actor's child processes and killing them by (pid, start time) (plain processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cir_actors.ops.processes import descendants, kill_processes


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_descendants_are_found_and_killed_even_stopped_but_never_a_recycled_pid():
    # a child that starts a grandchild, like a generator actor's engine core and its worker
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print(p.pid, flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(parent.stdout.readline())
        found = descendants(os.getpid())
        pids = [p for p, _ in found]
        assert parent.pid in pids and grandchild in pids
        assert pids.index(parent.pid) < pids.index(grandchild)  # children first
        mine = [(p, s) for p, s in found if p in (parent.pid, grandchild)]
        os.kill(parent.pid, signal.SIGSTOP)  # a stopped process dies of SIGKILL all the same
        assert kill_processes([(p, s + 1) for p, s in mine]) == []  # another start time: not that process
        assert _alive(parent.pid) and _alive(grandchild)
        assert sorted(kill_processes(mine)) == sorted([parent.pid, grandchild])
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild)
        assert kill_processes(mine) == []  # gone: nothing to kill
    finally:
        parent.kill()
