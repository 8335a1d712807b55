"""The global pytest timeout: a hung test fails the run (with every thread's stack) instead of stalling CI."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib

from conftest import PROJECT_ROOT


def test_project_sets_a_global_timeout_for_threaded_tests():
    ini = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 600 <= int(ini["timeout"]) <= 1800  # above the slowest test, well under a CI job's limit
    assert ini["timeout_method"] == "thread"


def test_a_test_hung_in_a_thread_is_ended_by_the_project_config(tmp_path):
    (tmp_path / "test_hang.py").write_text(
        "import threading\n"
        "def test_hangs():\n"
        "    t = threading.Thread(target=threading.Event().wait, daemon=True)\n"
        "    t.start()\n"
        "    t.join()\n"
    )
    # The project's own [tool.pytest.ini_options] (timeout_method from it), a short timeout for the test.
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(PROJECT_ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", "-o", "timeout=2", str(tmp_path / "test_hang.py")],
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert time.monotonic() - t0 < 60
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Timeout" in out and "Thread" in out, out[-2000:]
