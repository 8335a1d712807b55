"""The sandbox without root. CI runs as root, where the zygote takes the root path (a uid of its own
per child); most users of a cluster are not root, and there the sandbox goes through an unprivileged
user namespace instead. Until 2026-12-07 that path had never run: its first call failed (the zygote
could not re-enter its own PID namespace). Here the adversarial suite runs again as uid 65534.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "as_unprivileged.py"
SUITE = HERE / "test_interpreter.py"
RAY_TEST = "test_ray_actor_serves_concurrent_generators"  # the Ray path is the same pool; its session is root's


def test_the_launcher_drops_root_and_every_capability():
    out = subprocess.run([sys.executable, LAUNCHER, sys.executable, "-c",
                          "import os; print(os.geteuid(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])"],
                         capture_output=True, text=True, timeout=60, check=True)
    uid, caps = out.stdout.split()
    assert uid != "0" and int(caps, 16) == 0, out.stdout


def test_the_adversarial_suite_passes_without_root():
    out = subprocess.run([sys.executable, LAUNCHER, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(SUITE), "--deselect", f"{SUITE}::{RAY_TEST}"],
                         check=False, capture_output=True, text=True, timeout=600, cwd=HERE.parents[1])
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    summary = re.search(r"(\d+) passed(.*) in ", out.stdout)
    assert summary and int(summary.group(1)) >= 30 and "skipped" not in summary.group(2), tail


def test_without_root_or_user_namespaces_the_pool_refuses_in_one_sentence():
    """A non-root container under its runtime's default seccomp profile (KubeRay's pods, unless
    configured): no layer needing a namespace can be applied, and the pool says which and why."""
    probe = ("from cir_actors.sandbox.pool import InterpreterPool, SandboxUnavailable\n"
             "try:\n    InterpreterPool(max_workers=1)\nexcept SandboxUnavailable as e:\n    print(e)\n"
             "else:\n    print('started')")
    out = subprocess.run([sys.executable, LAUNCHER, "--no-user-namespaces", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=120, check=True, cwd=HERE.parents[1])
    message = out.stdout.strip()
    assert message.startswith("interpreter sandbox cannot start with full isolation on this machine"), out
    assert "namespaces: PermissionError" in message and "allow_weaker_isolation" in message, message
    assert len(message.splitlines()) == 1, message
