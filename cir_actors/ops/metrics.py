"""Each role's Prometheus figures, through `ray.util.metrics`, behind a small typed API per role.

    GeneratorMetrics("generator-0").served_version(3)
    InterpreterMetrics("interpreter-0").call(latency_s=0.012, ok=True, timed_out=False)

Every series carries the tags `actor` (the actor's name from cir_actors/ops/cluster.py) and `run` (the
Ray namespace the driver joined, `cluster.namespace`, so two runs on one cluster never share a
series) on top of the tags Ray adds (node address, worker id, session). Ray exports them from each node's metrics export port
(`MetricsExportPort` in `ray.nodes()`, or `--metrics-export-port` of `ray start`) with the prefix
`ray_`: `cir_generator_policy_version` is scraped as `ray_cir_generator_policy_version`. Series show
up 5-11 s after the first record (Ray's export interval).

Safe anywhere: outside a Ray worker or driver (plain pytest, a local script before ray.init) every
call is a no-op; the underlying Ray metric is built on the first record made with Ray initialised.
Values may be numpy scalars. What this module does not do: decide what to measure inside a role
(the role's code calls these methods) or keep history (Prometheus does; metrics.jsonl is the run's).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

import ray

Kind = Literal["gauge", "counter", "histogram"]

LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
LONG_BUCKETS_S = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]
# Staleness is a whole number of versions; Ray wants positive boundaries, so le="0.5" counts
# staleness 0, le="1.5" staleness <= 1, and so on.
STALENESS_BUCKETS = [0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5]


@dataclass(frozen=True)
class MetricSpec:
    """One exported series: its name (without Ray's `ray_` prefix), kind, help text and tags."""

    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


def _spec(name: str, kind: Kind, description: str, tags: tuple[str, ...] = (), boundaries=()) -> MetricSpec:
    spec = MetricSpec(name, kind, description, ("actor", "run", *tags), tuple(boundaries))
    SPECS[name] = spec
    return spec


SPECS: dict[str, MetricSpec] = {}
"""Every series this module can export, by name (docs/cluster.md's table is generated from it)."""

# Generator
GEN_VERSION = _spec("cir_generator_policy_version", "gauge", "Policy version the generator serves.")
GEN_BUDGET = _spec("cir_generator_tool_budget", "gauge", "Tool-call budget the generator applies.")
GEN_INFLIGHT = _spec("cir_generator_inflight_trajectories", "gauge", "Trajectories running in the engine.")
GEN_TRAJ = _spec("cir_generator_trajectories_total", "counter", "Finished trajectories.", ("finish_reason",))
GEN_TOKENS = _spec("cir_generator_sampled_tokens_total", "counter", "Tokens sampled by the model.")
GEN_ROLLOUT_S = _spec("cir_generator_rollout_seconds", "histogram", "Wall time of one trajectory.", (), LONG_BUCKETS_S)
# Weight synchronisation (learner publishes, generators load)
WEIGHT_SYNC_S = _spec(
    "cir_weight_sync_seconds", "histogram", "Time to publish (learner) or load (generator) one weight version.",
    ("side",), LATENCY_BUCKETS_S[4:] + [60.0, 120.0],
)
# Interpreter
INT_CALLS = _spec("cir_interpreter_calls_total", "counter", "Interpreter calls by outcome (ok, error, timeout).",
                  ("outcome",))
INT_LATENCY = _spec("cir_interpreter_call_seconds", "histogram", "Wall time of one interpreter call.", (),
                    LATENCY_BUCKETS_S)
INT_BUSY = _spec("cir_interpreter_busy_workers", "gauge", "Sandboxed workers running code now.")
INT_SESSIONS = _spec("cir_interpreter_sessions", "gauge", "Live interpreter sessions.")
INT_CACHE = _spec("cir_interpreter_cache_lookups_total", "counter", "Execution-cache lookups by outcome (hit, miss).",
                  ("outcome",))
INT_CACHE_REPLAYS = _spec("cir_interpreter_cache_replays_total", "counter",
                          "Cached session blocks later replayed in their session's child (hits minus these: calls saved).")
INT_CACHE_ENTRIES = _spec("cir_interpreter_cache_entries", "gauge", "Results held by the execution cache.")
INT_CACHE_BYTES = _spec("cir_interpreter_cache_bytes", "gauge", "Bytes held by the execution cache.")
# Scorer
SCO_VERDICTS = _spec("cir_scorer_verdicts_total", "counter", "Verdicts by reason (correct, wrong, no_box, "
                     "parse_failure, timeout).", ("reason",))
SCO_LATENCY = _spec("cir_scorer_seconds", "histogram", "Wall time of one verdict.", (), LATENCY_BUCKETS_S)
# Learner
LRN_STEP_S = _spec("cir_learner_step_seconds", "histogram", "Wall time of one training step.", (), LONG_BUCKETS_S)
LRN_TOKENS_PER_S = _spec("cir_learner_tokens_per_second", "gauge", "Tokens trained per second in the last step.")
LRN_TOKENS = _spec("cir_learner_tokens_total", "counter", "Tokens trained (prompt and response).")
LRN_VERSION = _spec("cir_learner_version", "gauge", "Learner policy version (steps taken).")
LRN_LOSS = _spec("cir_learner_loss", "gauge", "Policy loss of the last step.")
LRN_IS_MASKED = _spec("cir_learner_is_masked_fraction", "gauge",
                      "Sampled tokens the off-policy correction masked (weight 0) in the last step.")
LRN_IS_TRUNC = _spec("cir_learner_is_truncated_fraction", "gauge",
                     "Sampled tokens whose importance weight was truncated at the cap in the last step.")
LRN_IS_ESS = _spec("cir_learner_is_ess", "gauge",
                   "Effective sample size of the importance weights, mean(w)^2 / mean(w^2), in the last step.")
# Scheduler
SCH_VERSION = _spec("cir_scheduler_policy_version", "gauge", "Current policy version (the source of truth).")
SCH_BUDGET = _spec("cir_scheduler_tool_budget", "gauge", "Tool-call budget in force.")
SCH_INFLIGHT = _spec("cir_scheduler_groups_in_flight", "gauge", "Prompt groups admitted and not yet buffered.")
SCH_WAITING = _spec("cir_scheduler_waiting_generators", "gauge", "Generators waiting for admission.")
SCH_ADMITTED = _spec("cir_scheduler_groups_admitted_total", "counter", "Prompt groups admitted.")
SCH_ZERO_VAR = _spec("cir_scheduler_zero_variance_rate", "gauge",
                     "Dynamic sampling: moving average of the fraction of groups dropped for zero reward variance.")
SCH_OVERSAMPLE = _spec("cir_scheduler_oversample_factor", "gauge",
                       "Dynamic sampling: admission factor 1 / (1 - zero-variance rate), capped.")
# Buffer
BUF_READY = _spec("cir_buffer_groups_ready", "gauge", "Complete groups waiting for the learner.")
BUF_PARTIAL = _spec("cir_buffer_groups_partial", "gauge", "Groups with some but not all samples in.")
BUF_TRAINED = _spec("cir_buffer_trajectories_trained_total", "counter", "Trajectories handed to the learner.")
BUF_DROPPED = _spec("cir_buffer_trajectories_dropped_total", "counter", "Trajectories dropped, by reason.",
                    ("reason",))
BUF_STALENESS = _spec(
    "cir_buffer_trained_staleness_versions", "histogram",
    "Staleness of trained data: learner version minus the oldest policy version in the trajectory.",
    (), STALENESS_BUCKETS,
)
# The run (recorded by the driver after every step: cir_actors/control/trainer.py)
RUN_GROUPS = _spec("cir_run_groups", "gauge", "Prompt groups by place in the conservation identity (admitted, "
                   "trained, dropped, inflight, buffered).", ("state",))
RUN_TRAJ = _spec("cir_run_trajectories", "gauge", "Trajectories by place (added, trained, dropped, partial, ready).",
                 ("state",))
RUN_DROPPED = _spec("cir_run_groups_dropped", "gauge", "Groups that left untrained, by reason.", ("reason",))
RUN_CONSERVED = _spec("cir_run_conservation_ok", "gauge", "1 while both conservation identities hold.")
RUN_RESTARTS = _spec("cir_run_restarts", "gauge", "Actor restarts and automatic resumes so far, by role.", ("role",))
RUN_STEP_TIME = _spec("cir_run_step_time_seconds", "gauge", "Where the last step's time went, by part (learner_*, "
                      "gen_* per generator, ideal_async_step, ideal_sync_step): docs/step_time.md.", ("part",))
RUN_RECOVERY_S = _spec("cir_run_recovery_seconds", "gauge", "Duration of the latest recovery, by role.", ("role",))

_built: dict[str, Any] = {}
_lock = threading.Lock()


def _metric(spec: MetricSpec) -> Any | None:
    """The process's Ray metric for `spec`, built on first use; None outside Ray (no-op)."""
    if not ray.is_initialized():
        return None
    m = _built.get(spec.name)
    if m is None:
        from ray.util import metrics as rm

        with _lock:
            m = _built.get(spec.name)
            if m is None:
                if spec.kind == "gauge":
                    m = rm.Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
                elif spec.kind == "counter":
                    m = rm.Counter(spec.name, description=spec.description, tag_keys=spec.tags)
                else:
                    m = rm.Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries),
                                     tag_keys=spec.tags)
                _built[spec.name] = m
    return m


class _RoleMetrics:
    """Records with the actor's name as the `actor` tag and the Ray namespace as the `run` tag."""

    def __init__(self, name: str):
        self.name = name
        self._run: str | None = None

    def _tags(self, extra: dict[str, str]) -> dict[str, str]:
        if self._run is None:
            self._run = ray.get_runtime_context().namespace or ""
        return {"actor": self.name, "run": self._run, **{k: str(v) for k, v in extra.items()}}

    def _set(self, spec: MetricSpec, value: float, **tags: str) -> None:
        m = _metric(spec)
        if m is not None:
            m.set(float(value), tags=self._tags(tags))

    def _inc(self, spec: MetricSpec, value: float = 1.0, **tags: str) -> None:
        m = _metric(spec)
        if m is not None and value > 0:  # Ray rejects zero increments; a zero count changes nothing
            m.inc(float(value), tags=self._tags(tags))

    def _observe(self, spec: MetricSpec, value: float, **tags: str) -> None:
        m = _metric(spec)
        if m is not None:
            m.observe(float(value), tags=self._tags(tags))


class GeneratorMetrics(_RoleMetrics):
    def served_version(self, version: int) -> None:
        """After a weight update is loaded (invariant 5: each generator reports what it serves)."""
        self._set(GEN_VERSION, version)

    def budget(self, budget: int) -> None:
        self._set(GEN_BUDGET, budget)

    def inflight(self, n: int) -> None:
        self._set(GEN_INFLIGHT, n)

    def trajectory(self, finish_reason: str, sampled_tokens: int, duration_s: float) -> None:
        """One finished trajectory."""
        self._inc(GEN_TRAJ, 1, finish_reason=str(finish_reason))
        self._inc(GEN_TOKENS, sampled_tokens)
        self._observe(GEN_ROLLOUT_S, duration_s)

    def weight_load(self, seconds: float) -> None:
        self._observe(WEIGHT_SYNC_S, seconds, side="load")


class InterpreterMetrics(_RoleMetrics):
    def call(self, latency_s: float, ok: bool, timed_out: bool) -> None:
        """One call; outcome is timeout, ok or error (a timeout is not also counted as an error)."""
        outcome = "timeout" if timed_out else ("ok" if ok else "error")
        self._inc(INT_CALLS, 1, outcome=outcome)
        self._observe(INT_LATENCY, latency_s)

    def busy_workers(self, n: int) -> None:
        self._set(INT_BUSY, n)

    def sessions(self, n: int) -> None:
        self._set(INT_SESSIONS, n)

    def cache_lookup(self, hit: bool) -> None:
        self._inc(INT_CACHE, 1, outcome="hit" if hit else "miss")

    def cache_replays(self, n: int) -> None:
        self._inc(INT_CACHE_REPLAYS, n)

    def cache_size(self, entries: int, nbytes: int) -> None:
        self._set(INT_CACHE_ENTRIES, entries)
        self._set(INT_CACHE_BYTES, nbytes)


class ScorerMetrics(_RoleMetrics):
    def verdict(self, latency_s: float, reason: str) -> None:
        """One verdict; `reason` is a VerdictReason (timeouts are reason="timeout")."""
        self._inc(SCO_VERDICTS, 1, reason=str(reason))
        self._observe(SCO_LATENCY, latency_s)


class LearnerMetrics(_RoleMetrics):
    def step(self, step_time_s: float, tokens: int, version: int, loss: float | None = None) -> None:
        """One training step of `tokens` tokens that produced policy `version`."""
        self._observe(LRN_STEP_S, step_time_s)
        self._inc(LRN_TOKENS, tokens)
        if step_time_s > 0:
            self._set(LRN_TOKENS_PER_S, tokens / step_time_s)
        self._set(LRN_VERSION, version)
        if loss is not None:
            self._set(LRN_LOSS, loss)

    def correction(self, masked_frac: float, truncated_frac: float, ess: float) -> None:
        """The off-policy correction's diagnostics for the last step (learner.correction)."""
        self._set(LRN_IS_MASKED, masked_frac)
        self._set(LRN_IS_TRUNC, truncated_frac)
        self._set(LRN_IS_ESS, ess)

    def publish(self, seconds: float) -> None:
        """Time to publish one weight version (object-store put or broadcast)."""
        self._observe(WEIGHT_SYNC_S, seconds, side="publish")


class SchedulerMetrics(_RoleMetrics):
    def __init__(self, name: str = "scheduler"):
        super().__init__(name)

    def state(self, version: int, budget: int, groups_in_flight: int, waiting_generators: int) -> None:
        self._set(SCH_VERSION, version)
        self._set(SCH_BUDGET, budget)
        self._set(SCH_INFLIGHT, groups_in_flight)
        self._set(SCH_WAITING, waiting_generators)

    def admitted(self, n: int = 1) -> None:
        self._inc(SCH_ADMITTED, n)

    def sampling(self, zero_variance_rate: float, oversample_factor: float) -> None:
        self._set(SCH_ZERO_VAR, zero_variance_rate)
        self._set(SCH_OVERSAMPLE, oversample_factor)


class BufferMetrics(_RoleMetrics):
    def __init__(self, name: str = "buffer"):
        super().__init__(name)

    def depth(self, ready_groups: int, partial_groups: int) -> None:
        self._set(BUF_READY, ready_groups)
        self._set(BUF_PARTIAL, partial_groups)

    def trained(self, staleness_per_trajectory: list[int]) -> None:
        """Trajectories handed to the learner, each with its staleness (versions behind the learner)."""
        self._inc(BUF_TRAINED, len(staleness_per_trajectory))
        for s in staleness_per_trajectory:
            self._observe(BUF_STALENESS, max(0, int(s)))

    def dropped(self, n: int, reason: str) -> None:
        """`reason` is a DropReason (stale, aborted, zero_advantage)."""
        self._inc(BUF_DROPPED, n, reason=str(reason))


class RunMetrics(_RoleMetrics):
    """The driver's per-step view of the whole run: conservation counts, restarts, recovery times."""

    def __init__(self, name: str = "driver"):
        super().__init__(name)

    def conservation(self, groups: dict[str, Any], trajectories: dict[str, Any]) -> None:
        for state in ("admitted", "trained", "dropped", "inflight", "buffered"):
            self._set(RUN_GROUPS, groups[state], state=state)
        for state in ("added", "trained", "dropped", "partial", "ready"):
            self._set(RUN_TRAJ, trajectories[state], state=state)
        for reason, n in groups.get("dropped_by_reason", {}).items():
            self._set(RUN_DROPPED, n, reason=reason)
        self._set(RUN_CONSERVED, float(bool(groups["ok"]) and bool(trajectories["ok"])))

    def restarts(self, by_role: dict[str, int], last_recovery_s: dict[str, float]) -> None:
        for role, n in by_role.items():
            self._set(RUN_RESTARTS, n, role=role)
        for role, seconds in last_recovery_s.items():
            self._set(RUN_RECOVERY_S, seconds, role=role)

    def step_time(self, parts: dict[str, float]) -> None:
        """The step's time breakdown (cir_actors/ops/step_time.py), one series per part."""
        for part, seconds in parts.items():
            self._set(RUN_STEP_TIME, seconds, part=part)
