"""The processes an actor started (vLLM's engine core and its workers), found through /proc, and
killing them by (pid, start time) so that a pid the kernel has since given to another process is
never hit. Used to heal a generator: its engine processes must die with it (a wedged engine core
holds sockets a weight broadcast waits on, and on a GPU the memory its replacement needs), and
they cannot be asked to when the actor itself is stopped."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of `pid`, or None if it is gone (or dead,
    a zombie waiting to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def alive(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    return _stat(pid) is not None


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Whether `pid` is gone (or a zombie) within `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live process below `pid`, children first."""
    parents: dict[int, list[tuple[int, int]]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            parents.setdefault(st[0], []).append((int(d.name), st[1]))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(0), []):
            out.append(child)
            todo.append(child[0])
    return out


def kill_processes(processes: list[tuple[int, int]]) -> list[int]:
    """SIGKILL each (pid, start time) that is still that process; returns the pids killed. Works
    on a stopped process too."""
    killed = []
    for pid, started in processes:
        st = _stat(pid)
        if st is not None and st[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(pid)
    return killed
