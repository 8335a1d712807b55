"""Getting a Ray deliberately: with a head already running on the machine (`ray start --head`, as
people do to keep the dashboard up), a driver starts its own private instance unless asked to join,
and says which in one log line. The head here is a real `ray start --head` recorded in a temp dir
of its own (RAY_TMPDIR), so no other Ray on the machine is seen or touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from cir_actors.ops.local_head import LocalHead

pytestmark = pytest.mark.slow

DRIVER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import ray
from cir_actors.config import load_config
from cir_actors.ops.local_head import connect_ray
mode = connect_ray(load_config(None, sys.argv[1:]))
print(json.dumps({"mode": mode, "cpus": ray.cluster_resources().get("CPU"),
                  "gcs": ray.get_runtime_context().gcs_address}))
ray.shutdown()
"""


@pytest.fixture(scope="module")
def recorded_head():
    """A real head started by `ray start --head`, recorded where ray.init() looks (RAY_TMPDIR/ray)."""
    root = tempfile.mkdtemp(prefix="cirr", dir="/tmp")  # short: Ray's unix sockets live under it
    try:
        with LocalHead(num_cpus=1, temp_dir=Path(root) / "ray") as head:
            recorded = (Path(root) / "ray" / "ray_current_cluster").read_text().strip()
            assert _port(recorded) == head.port
            yield head, root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _driver(root: str, *overrides: str, ray_address: str | None = None, code: str = DRIVER):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=root, PYTHONPATH=str(PROJECT_ROOT), RAY_AUTH_MODE="disabled")
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([sys.executable, "-c", code, *overrides], env=env, capture_output=True, text=True,
                          timeout=300, check=False, cwd=PROJECT_ROOT)


def test_the_recorded_head_reproduces_the_failure(recorded_head):
    """What every entrypoint did before: ray.init(num_cpus=...) auto-joins the recorded head and fails."""
    _head, root = recorded_head
    proc = _driver(root, code="import ray; ray.init(num_cpus=4)")
    assert proc.returncode != 0
    assert "num_cpus and num_gpus must not be provided" in proc.stderr


def test_private_instance_by_default_even_with_a_head_running(recorded_head):
    head, root = recorded_head
    proc = _driver(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "private"
    assert _port(out["gcs"]) != head.port
    assert out["cpus"] == max(os.cpu_count() or 2, 4)  # ours, not the head's 1
    said = [line for line in proc.stderr.splitlines() if "Ray: " in line]
    assert len(said) == 1 and "private local instance" in said[0] and f":{head.port}" in said[0], said


@pytest.mark.parametrize("how", ["config", "env"])
def test_joins_the_head_when_asked(recorded_head, how):
    head, root = recorded_head
    if how == "config":
        proc = _driver(root, f"cluster.address={head.address}")
    else:
        proc = _driver(root, ray_address=head.address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["mode"], out["cpus"], _port(out["gcs"])) == ("joined", 1.0, head.port)
    said = [line for line in proc.stderr.splitlines() if "Ray: " in line]
    assert len(said) == 1 and f"joining the cluster at {head.address}" in said[0], said
