"""Autoscaling exercised on Ray's fake multi-node provider, derived from ray_cluster.yaml.

A private head (loopback, free ports, its own temp dir) runs the v1 autoscaler over the YAML's node
types with CPU 1, no GPU, at most 2 nodes per type and a 6 s idle timeout. A driver (a subprocess:
the test process may already hold the shared Ray session) asks for one actor of every role through
`cluster.actor_options`; nodes of the matching types must come up and host them, and go away once
the actors are gone. The v1 autoscaler may launch one node more than needed: "at least", never
"exactly". Only this test's own head and its nodes are stopped (LocalHead.stop), never `ray stop`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cir_actors.ops.cluster import ROLE_RESOURCE, Role, check_cluster_yaml
from cir_actors.ops.local_head import LocalHead

PROJECT_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

WORKER_TYPES = {"generator.gpu": "generator", "learner.gpu": "learner", "interpreter.cpu": "interpreter"}


@pytest.fixture(scope="module")
def fake_cluster():
    head = LocalHead.fake_cluster(check_cluster_yaml(), max_workers_per_type=2, idle_timeout_s=6.0)
    with head:
        yield head
    assert head.pids() == [], "the fake cluster left processes behind"


def test_roles_bring_up_their_node_types_which_go_away_when_idle(fake_cluster):
    out = subprocess.run(
        [sys.executable, "-m", "tests.ops.test_autoscaling", fake_cluster.address],
        check=False, cwd=PROJECT_ROOT, env=fake_cluster.env(), capture_output=True, text=True, timeout=420,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])

    assert report["alive_before"] == 1  # only the head: every worker node below was brought up by a request
    for actor, node in report["placed"].items():
        role = report["roles"][actor]
        assert ROLE_RESOURCE[Role(role)] in node["resources"], f"{actor} landed on {node}"
        if role in ("scheduler", "buffer", "scorer"):
            assert node["is_head"], f"{actor} should run on the head, ran on {node}"
        else:
            assert not node["is_head"]
    for node_type, label in WORKER_TYPES.items():
        assert report["nodes_up"][label] >= 1, report["nodes_up"]
        assert report["active_types"].get(node_type, 0) >= 1, report["active_types"]
    assert report["alive_peak"] >= 1 + len(WORKER_TYPES)
    # After the actors are gone every worker node is released (idle timeout 6 s).
    assert report["alive_after"] == 1, report
    print(f"placed in {report['placed_s']:.1f} s, scaled down in {report['scale_down_s']:.1f} s, "
          f"peak {report['alive_peak']} nodes")


def active_types(address: str) -> dict[str, int]:
    """Node types the autoscaler reports active: `ray status` lines such as ' 1 generator.gpu'."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "status", "--address", address],
        check=False, capture_output=True, text=True, timeout=60,
    ).stdout
    block = out.split("Active:")[-1].split("Pending:")[0] if "Active:" in out else ""
    return {name: int(n) for n, name in re.findall(r"^\s*(\d+)\s+(\S+)\s*$", block, re.MULTILINE)}


def _drive(address: str) -> dict:
    """The driver: one actor per role, where they land, then release and watch the nodes go."""
    import ray

    from cir_actors.config import load_config
    from cir_actors.ops.cluster import INDEXED_ROLES, actor_options

    cfg = load_config(None, ["cluster.use_role_resources=true", "cluster.namespace=autoscaling-test"])
    ray.init(address=address, log_to_driver=False)
    head_id = ray.get_runtime_context().get_node_id()

    def labels(node: dict) -> dict:
        return {k: v for k, v in node["Resources"].items() if k in ("generator", "learner", "interpreter", "head")}

    class Placeholder:
        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    alive_before = sum(n["Alive"] for n in ray.nodes())
    t0 = time.monotonic()
    actors, roles = {}, {}
    for role in Role:
        opts = actor_options(role, cfg, 0 if role in INDEXED_ROLES else None)
        actors[opts["name"]] = ray.remote(Placeholder).options(**opts).remote()
        roles[opts["name"]] = str(role)
    node_of = {name: ray.get(a.node_id.remote(), timeout=180) for name, a in actors.items()}
    placed_s = time.monotonic() - t0
    nodes = {n["NodeID"]: n for n in ray.nodes()}
    alive = [n for n in nodes.values() if n["Alive"]]
    placed = {
        name: {"resources": labels(nodes[nid]), "is_head": nid == head_id} for name, nid in node_of.items()
    }
    nodes_up = {label: sum(label in n["Resources"] for n in alive) for label in WORKER_TYPES.values()}
    # The autoscaler's own account, by node type name of ray_cluster.yaml (`ray status`).
    deadline = time.monotonic() + 60
    while not set(WORKER_TYPES) <= set(types := active_types(address)) and time.monotonic() < deadline:
        time.sleep(1)

    for a in actors.values():
        ray.kill(a)
    t1 = time.monotonic()
    while time.monotonic() - t1 < 120:
        alive_after = sum(n["Alive"] for n in ray.nodes())
        if alive_after == 1:
            break
        time.sleep(1)
    return {
        "alive_before": alive_before, "alive_peak": len(alive), "placed": placed, "roles": roles,
        "nodes_up": nodes_up, "active_types": types, "placed_s": placed_s, "alive_after": alive_after,
        "scale_down_s": time.monotonic() - t1,
    }


if __name__ == "__main__":
    print(json.dumps(_drive(sys.argv[1])))
