"""Role metrics: real actors record through cir_actors.ops.metrics, the node's Prometheus export has them.

The shared Ray session (include_dashboard=False) still runs the per-node metrics agent; series show
up on `MetricsExportPort` 5-11 s after they are recorded, prefixed `ray_`.
"""

from __future__ import annotations

import re
import sys
import time
import urllib.request

import numpy as np
import pytest

from cir_actors.config import load_config
from cir_actors.ops import metrics
from cir_actors.ops.cluster import INDEXED_ROLES, Role, actor_options

LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if m:
            out.append((m["name"], dict(LABEL.findall(m["labels"] or "")), float(m["value"])))
    return out


def record(role: str, name: str) -> None:
    """What each role's code will do: a few records through its typed API (numpy values included)."""
    if role == "generator":
        g = metrics.GeneratorMetrics(name)
        g.served_version(np.int64(3))
        g.budget(2)
        g.inflight(5)
        g.trajectory("stop", sampled_tokens=40, duration_s=1.5)
        g.trajectory("length", sampled_tokens=np.int32(256), duration_s=3.0)
        g.weight_load(0.2)
    elif role == "interpreter":
        i = metrics.InterpreterMetrics(name)
        i.call(0.008, ok=True, timed_out=False)
        i.call(0.010, ok=False, timed_out=False)
        i.call(5.0, ok=False, timed_out=True)
        i.busy_workers(1)
        i.sessions(0)
        i.cache_lookup(True)
        i.cache_lookup(True)
        i.cache_lookup(False)
        i.cache_replays(1)
        i.cache_size(1, 120)
    elif role == "scorer":
        s = metrics.ScorerMetrics(name)
        s.verdict(0.003, "correct")
        s.verdict(5.0, "timeout")
    elif role == "learner":
        lm = metrics.LearnerMetrics(name)
        lm.step(step_time_s=2.0, tokens=4096, version=4, loss=np.float32(0.25))
        lm.publish(0.5)
        lm.correction(masked_frac=0.01, truncated_frac=0.02, ess=np.float64(0.97))
    elif role == "scheduler":
        sm = metrics.SchedulerMetrics(name)
        sm.state(version=4, budget=2, groups_in_flight=3, waiting_generators=1)
        sm.admitted(3)
        sm.sampling(zero_variance_rate=0.25, oversample_factor=4 / 3)
        run = metrics.RunMetrics(name)  # the driver's series (recorded here under an actor's name)
        run.conservation({"admitted": 5, "trained": 2, "dropped": 1, "inflight": 1, "buffered": 1, "ok": True,
                          "dropped_by_reason": {"stale": 1}},
                         {"added": 8, "trained": 4, "dropped": 2, "partial": 1, "ready": 1, "ok": True})
        run.restarts({"generator": 1}, {"generator": 2.5})
        run.step_time({"learner_train_s": 1.0})
    elif role == "buffer":
        b = metrics.BufferMetrics(name)
        b.depth(ready_groups=2, partial_groups=1)
        b.trained([0, 0, 1, 1])
        b.dropped(2, "stale")
        b.dropped(0, "aborted")  # zero counts are skipped, not an error


class Recorder:
    """Stands in for a role's actor: records through that role's metrics class."""

    def __init__(self, role: str, name: str):
        self.role, self.name = role, name

    def run(self) -> tuple[str, str]:
        import ray

        record(self.role, self.name)
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ctx.get_worker_id()


def test_calls_are_no_ops_outside_ray(monkeypatch):
    monkeypatch.setattr(metrics.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(metrics, "_built", {})
    for role in Role:
        record(str(role), f"{role}-x")
    assert metrics._built == {}


def test_every_series_is_named_for_its_role():
    assert len(metrics.SPECS) >= 25
    for name, spec in metrics.SPECS.items():
        assert name.startswith("cir_") and "actor" in spec.tags and "run" in spec.tags
        assert (spec.kind == "histogram") == bool(spec.boundaries)
        assert all(b > 0 for b in spec.boundaries) and list(spec.boundaries) == sorted(spec.boundaries)


@pytest.mark.slow
def test_role_actors_export_their_metrics(ray_session):
    ray = ray_session
    # This test module is not importable on Ray's workers: ship Recorder and record() by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = load_config(None, ["cluster.namespace=metrics-test"])
    actors = {}
    for role in Role:
        opts = actor_options(role, cfg, 0 if role in INDEXED_ROLES else None)
        opts.update(num_cpus=0.01, max_concurrency=1)  # tiny: only recording happens here
        actors[opts["name"]] = (role, ray.remote(Recorder).options(**opts).remote(str(role), opts["name"]))
    node_ids, worker_ids = map(set, zip(*ray.get([a.run.remote() for _, a in actors.values()], timeout=120)))
    nodes = [n for n in ray.nodes() if n["NodeID"] in node_ids]
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in nodes]

    expected = {f"ray_{name}" for name in metrics.SPECS}
    names = set(actors)
    deadline = time.monotonic() + 45
    while True:
        samples = [s for url in urls for s in parse_prometheus(urllib.request.urlopen(url, timeout=10).read().decode())]
        # Earlier tests in this Ray session ran actors with the same names (and the same job namespace,
        # hence the same `run` tag): keep this test's workers' series.
        ours = [s for s in samples if s[1].get("actor") in names and s[1].get("WorkerId") in worker_ids]
        seen = {name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for name, _, _ in ours}
        if expected <= seen or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert expected <= seen, f"missing after 45 s: {sorted(expected - seen)}"
    assert {lab.get("run") for _, lab, _ in ours} == {ray.get_runtime_context().namespace}

    def value(name: str, **labels: str) -> float:
        hits = [v for n, lab, v in ours if n == name and all(lab.get(k) == w for k, w in labels.items())]
        assert len(hits) == 1, (name, labels, hits)
        return hits[0]

    assert value("ray_cir_generator_policy_version", actor="generator-0") == 3
    assert value("ray_cir_generator_sampled_tokens_total", actor="generator-0") == 296
    assert value("ray_cir_generator_trajectories_total", actor="generator-0", finish_reason="length") == 1
    assert value("ray_cir_interpreter_calls_total", actor="interpreter-0", outcome="timeout") == 1
    assert value("ray_cir_interpreter_calls_total", actor="interpreter-0", outcome="error") == 1
    assert value("ray_cir_interpreter_call_seconds_count", actor="interpreter-0") == 3
    assert value("ray_cir_interpreter_cache_lookups_total", actor="interpreter-0", outcome="hit") == 2
    assert value("ray_cir_interpreter_cache_bytes", actor="interpreter-0") == 120
    assert value("ray_cir_scorer_verdicts_total", actor="scorer-0", reason="timeout") == 1
    assert value("ray_cir_learner_tokens_per_second", actor="learner-rank-0") == 2048
    assert value("ray_cir_weight_sync_seconds_count", actor="learner-rank-0", side="publish") == 1
    assert value("ray_cir_weight_sync_seconds_count", actor="generator-0", side="load") == 1
    assert value("ray_cir_scheduler_groups_in_flight", actor="scheduler") == 3
    assert value("ray_cir_run_groups", actor="scheduler", state="admitted") == 5
    assert value("ray_cir_run_restarts", actor="scheduler", role="generator") == 1
    assert value("ray_cir_buffer_trajectories_dropped_total", actor="buffer", reason="stale") == 2
    # Staleness histogram: two trajectories at 0 versions (le=0.5), all four within 1 (le=1.5).
    assert value("ray_cir_buffer_trained_staleness_versions_bucket", actor="buffer", le="0.5") == 2
    assert value("ray_cir_buffer_trained_staleness_versions_bucket", actor="buffer", le="1.5") == 4
    for _, handle in actors.values():
        ray.kill(handle)
