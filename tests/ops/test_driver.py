"""The driver's supervisor (`cir_actors/ops/driver.py`): a driver killed from outside is started
again (it resumes), one that exits or that the user stopped is not, the restarts are capped, and a
supervisor killed outright takes its driver with it. Real processes; the "driver" is a small script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cir_actors.ops.processes import descendants, wait_gone

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from cir_actors.ops import driver
assert driver.is_child(), "not started by a supervisor"
runs = {runs!r}
n = len(os.listdir(runs))
open(os.path.join(runs, str(n)), "w").close()
mode = sys.argv[1]
if mode == "killed-once" and n == 0 or mode == "always-killed":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "sleeps":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(5))
    time.sleep(600)
sys.exit(int(mode) if mode.isdigit() else 0)
"""
SUPERVISOR = """
import sys
sys.path.insert(0, {root!r})
from cir_actors.ops.driver import supervise
sys.exit(supervise([{script!r}, sys.argv[1]], int(sys.argv[2])))
"""


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    runs = tmp_path / "runs"
    runs.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=str(ROOT), runs=str(runs)))
    sup = tmp_path / "supervisor.py"
    sup.write_text(SUPERVISOR.format(root=str(ROOT), script=str(script)))
    return runs, sup


def _supervise(tmp_path: Path, mode: str, restarts: int) -> tuple[subprocess.CompletedProcess, int]:
    runs, sup = _setup(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "CIR_DRIVER_CHILD"}
    done = subprocess.run([sys.executable, str(sup), mode, str(restarts)], check=False, capture_output=True, text=True,
                          timeout=120, env=env)
    return done, len(list(runs.iterdir()))


def test_a_killed_driver_is_started_again(tmp_path):
    done, runs = _supervise(tmp_path, "killed-once", 3)
    assert (done.returncode, runs) == (0, 2), done.stderr
    assert "recovery: the driver (pid" in done.stderr and "killed by SIGKILL; starting it again (1/3)" in done.stderr


def test_an_exit_is_not_retried(tmp_path):
    done, runs = _supervise(tmp_path, "3", 3)
    assert (done.returncode, runs) == (3, 1), done.stderr
    assert "recovery" not in done.stderr


def test_restarts_are_capped(tmp_path):
    done, runs = _supervise(tmp_path, "always-killed", 2)
    assert (done.returncode, runs) == (128 + signal.SIGKILL, 3), done.stderr
    assert "recovery.max_driver_restarts (2) is spent" in done.stderr


def _child_of(pid: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kids = [c for c, _ in descendants(pid)]
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise AssertionError("the supervisor started no driver")


def test_a_stop_is_passed_on_and_not_retried(tmp_path):
    runs, sup = _setup(tmp_path)
    proc = subprocess.Popen([sys.executable, str(sup), "sleeps", "3"], stderr=subprocess.PIPE, text=True)
    child = _child_of(proc.pid)
    while not list(runs.iterdir()):  # its SIGTERM handler is set
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 5  # the driver's own exit code after the stop
    assert wait_gone(child, 30.0) and len(list(runs.iterdir())) == 1, proc.stderr.read()


def test_a_supervisor_killed_outright_takes_its_driver_with_it(tmp_path):
    runs, sup = _setup(tmp_path)
    proc = subprocess.Popen([sys.executable, str(sup), "sleeps", "3"])
    child = _child_of(proc.pid)
    while not list(runs.iterdir()):  # past is_child(): its parent-death signal is set
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    assert wait_gone(child, 30.0), "the driver outlived its supervisor"
