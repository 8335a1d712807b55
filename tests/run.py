"""`make test`: the suite as two pytest processes side by side.

The chaos runs (`tests/control/test_chaos.py`) take about half of the suite's wall time, and most of
it is waiting: for the deadlines they test (a stopped actor is found once `recovery.*_s` passes),
for vLLM engines to start, for resumes. So they run in a second pytest, on a Ray instance of their
own, beside the rest, and `make test` takes about as long as the longer of the two instead of their
sum. The rest prints as it runs; the chaos run's output follows it. The exit status is non-zero if
either failed, and a chaos run still going an hour after the rest ended is killed and reported.

`python tests/run.py` (no arguments). For a subset, call pytest directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAOS = "tests/control/test_chaos.py"
CHAOS_GRACE_S = 3600


def main() -> int:
    pytest = [sys.executable, "-m", "pytest"]
    with tempfile.NamedTemporaryFile("w+", prefix="cir-chaos-tests-", suffix=".log") as log:
        # Its own process group: a chaos run that outlives its grace is killed with its children.
        chaos = subprocess.Popen([*pytest, "--durations=10", "-p", "no:cacheprovider", CHAOS],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"make test: {CHAOS} runs beside the rest; its output so far: {log.name}", flush=True)
        try:
            rest = subprocess.run([*pytest, "--durations=30", "--ignore", CHAOS, "tests"], cwd=ROOT, check=False)
            if chaos.poll() is None:
                print(f"\nmake test: waiting for {CHAOS} ({log.name})", flush=True)
            try:
                chaos_rc = chaos.wait(timeout=CHAOS_GRACE_S)
            except subprocess.TimeoutExpired:
                print(f"\nmake test: the chaos run ({CHAOS}) was still going {CHAOS_GRACE_S} s after the rest "
                      "ended; killed")
                chaos_rc = 1
        finally:  # also on Ctrl-C: no chaos run left behind
            if chaos.poll() is None:
                os.killpg(chaos.pid, signal.SIGKILL)
                chaos.wait()
        log.seek(0)
        print(f"\n{'=' * 30} {CHAOS}, run beside the rest {'=' * 30}", flush=True)
        sys.stdout.write(log.read())
    print(f"\nmake test: the rest {'passed' if rest.returncode == 0 else f'FAILED (exit {rest.returncode})'}, "
          f"the chaos runs {'passed' if chaos_rc == 0 else f'FAILED (exit {chaos_rc})'}")
    return rest.returncode or chaos_rc


if __name__ == "__main__":
    sys.exit(main())
