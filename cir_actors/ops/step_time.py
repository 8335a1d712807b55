"""Where a step's time goes: the learner's phases and the generators' time, one row per step.

The learner's phases come from `Learner.train_step` (`phases`: the slowest rank's fetch, separate
proximal forward and forward/backward/optimizer) and the driver's clock (waiting for a batch,
publication). Each generator reports, since the driver last asked (`RolloutWorker.step_times`),
its wall time, idle time (no trajectory running) and weight-load time, and the trajectory-seconds
(summed over its concurrent trajectories, so they can exceed the wall time) spent generating,
waiting for tools (queue and execution) and waiting for a verdict.

From them, per step: the learner is busy L = train + publish, a generator G = wall - idle (mean
over generators). Nothing overlapping, a step takes L + G (`ideal_sync_step_s`); perfectly
overlapped, max(L, G) (`ideal_async_step_s`); `overlap_efficiency` = max(L, G) / the measured step.
"""

from __future__ import annotations

import statistics
from typing import Any


def answers(refs: list[Any], timeout_s: float) -> list[Any]:
    """The results of the calls that answered within one shared deadline, in call order; a call
    that failed or did not answer in time (its actor died, hangs or is still starting) is left out."""
    return list(answers_by_index(refs, timeout_s).values())


def answers_by_index(refs: list[Any], timeout_s: float) -> dict[int, Any]:
    """`answers`, keyed by each answered call's position in `refs`."""
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    out = {}
    for i, ref in enumerate(refs):
        if ref not in ready:
            continue
        try:
            out[i] = ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001, S112 - an actor that just died: healed at the next check
            continue
    return out


def step_time_row(train_metrics: dict[str, Any], wait_batch_s: float, train_s: float, publish_s: float,
                  step_s: float, gens: list[dict[str, float]]) -> dict[str, float]:
    """The `time/...` keys of one metrics.jsonl row (also exported as cir_run_step_time_seconds)."""
    phases = train_metrics.get("phases") or {}
    learner_busy = train_s + publish_s
    parts: dict[str, float] = {
        "learner_wait_batch_s": wait_batch_s,
        "learner_fetch_s": float(phases.get("fetch_s", 0.0)),
        "learner_proximal_s": float(phases.get("proximal_s", 0.0)),
        "learner_update_s": float(phases.get("update_s", 0.0)),
        "learner_publish_s": publish_s,
        "learner_busy_s": learner_busy,
    }
    if gens:
        def mean(key: str) -> float:
            return statistics.fmean(g.get(key, 0.0) for g in gens)

        gen_busy = statistics.fmean(max(0.0, g["wall_s"] - g["idle_s"]) for g in gens)
        parts.update({
            "gen_wall_s": mean("wall_s"), "gen_idle_s": mean("idle_s"), "gen_busy_s": gen_busy,
            "gen_weight_load_s": mean("weight_load_s"),
            "gen_generation_traj_s": mean("generation_s"), "gen_tool_wait_traj_s": mean("tool_wait_s"),
            # the tool wait split: the programs running, and the rest (queue for a worker, transport)
            "gen_tool_exec_traj_s": mean("tool_exec_s"),
            "gen_tool_queue_traj_s": max(0.0, mean("tool_wait_s") - mean("tool_exec_s")),
            "gen_scoring_traj_s": mean("scoring_s"),
        })
        ideal_async = max(learner_busy, gen_busy)
        parts.update({"ideal_sync_step_s": learner_busy + gen_busy, "ideal_async_step_s": ideal_async,
                      "overlap_efficiency": ideal_async / step_s if step_s > 0 else 0.0})
    from cir_actors.ops.metrics import RunMetrics

    RunMetrics().step_time(parts)
    return {f"time/{k}": v for k, v in parts.items()}
