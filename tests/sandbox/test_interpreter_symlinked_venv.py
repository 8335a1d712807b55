"""The sandbox with the interpreter reached through a symlink (`.venv` -> a venv elsewhere): lazily
imported modules (`sympy.expand` -> `sympy.tensor.tensor`) must still be found inside the jail,
which binds only the real paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

CHILD = """
import json, sys
from cir_actors.sandbox.pool import InterpreterPool
with InterpreterPool() as pool:
    r = pool.run("import sympy; x = sympy.Symbol('x'); print(sympy.expand((x + 1)**2)); print(sympy.__file__)")
    print(json.dumps({"prefix": sys.prefix, "ok": r.ok, "stdout": r.stdout, "error": r.error,
                      "off": pool.isolation_report()["off"]}))
"""


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs the tests to run from a venv")
def test_lazy_imports_work_in_the_jail_through_a_symlinked_venv(tmp_path):
    link = tmp_path / "venv"
    link.symlink_to(os.path.realpath(sys.prefix), target_is_directory=True)
    python = link / "bin" / Path(sys.executable).name
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([str(python), "-c", CHILD], env=env, capture_output=True, text=True, timeout=300,
                          check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["prefix"] == str(link)  # the child really runs through the symlink
    assert out["ok"], out["error"]
    expanded, sympy_file = out["stdout"].splitlines()
    assert expanded == "x**2 + 2*x + 1"
    assert sympy_file.startswith(os.path.realpath(sys.prefix))  # imported by its real path
