"""The driver's own supervisor: `entrypoints/train.py` runs the driver (the process that owns the
run's actors, `control/trainer.py`) as a child and starts it again when something outside it killed
it, so that a run survives its driver's death the way it survives any actor's.

Started again: a child killed by a signal other than SIGINT, SIGTERM or SIGHUP (the kernel's OOM
killer and `kill -9` send SIGKILL; a segfault, SIGSEGV), at most `recovery.max_driver_restarts`
times. The new driver is the same command: it resumes from the run's latest checkpoint like a
second `python entrypoints/train.py` would. Not started again: a child that exited (an error it
reported in one sentence is not cured by repeating it) or that the user stopped (Ctrl-C reaches
the supervisor, which passes SIGINT/SIGTERM on to the child, in its own process group, and exits
with it; `ray job stop` signals both; a child that does not end within FORWARD_GRACE_S of a stop is
killed).

Not here: anything of the run itself (the child does all of it); a lost head node, which takes the
supervisor with it (run the same command again).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

CHILD_ENV = "CIR_DRIVER_CHILD"  # the supervisor's pid, set in the child: it trains instead of supervising
USER_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FORWARD_GRACE_S = 60.0  # after passing a stop on, the child has this long before it is killed


def is_child() -> bool:
    """True in the driver a supervisor started; it then dies with its supervisor (SIGKILL), so a
    supervisor killed outright (`ray job stop` past its grace period) leaves no driver behind."""
    if os.environ.get(CHILD_ENV) != str(os.getppid()):
        return False
    from cir_actors.sandbox.layers import PR_SET_PDEATHSIG, prctl

    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.environ.get(CHILD_ENV) != str(os.getppid()):  # it died before the line above: so do we
        os._exit(1)
    return True


def supervise(argv: list[str], max_restarts: int) -> int:
    """Run `python argv...` as the driver until it exits, starting it again when it is killed
    (see the module doc); its exit code, or 128 + the signal that killed it the last time."""
    stopped: list[int] = []
    child: subprocess.Popen | None = None

    def on_stop(signum, _frame) -> None:
        stopped.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, on_stop) for sig in USER_STOPS}
    try:
        restarts = 0
        while True:
            # Its own process group: a Ctrl-C or `ray job stop` (signals to the supervisor's group)
            # reaches it once, passed on by on_stop.
            child = subprocess.Popen([sys.executable, *argv], env={**os.environ, CHILD_ENV: str(os.getpid())},
                                     process_group=0)
            code = _wait(child, stopped)
            if code >= 0 or stopped:
                return code if code >= 0 else 128 - code
            sig = signal.Signals(-code)
            if sig in USER_STOPS:
                return 128 - code
            if restarts >= max_restarts:
                print(f"error: the driver (pid {child.pid}) was killed by {sig.name} and "
                      f"recovery.max_driver_restarts ({max_restarts}) is spent", file=sys.stderr, flush=True)
                return 128 - code
            restarts += 1
            print(f"recovery: the driver (pid {child.pid}) was killed by {sig.name}; starting it again "
                  f"({restarts}/{max_restarts}): it resumes from the latest checkpoint", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(child: subprocess.Popen, stopped: list[int]) -> int:
    """The child's return code; once a stop was passed on, at most FORWARD_GRACE_S more."""
    deadline = None
    while True:
        try:
            return child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if stopped and deadline is None:
            deadline = time.monotonic() + FORWARD_GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            child.kill()
            return child.wait()
