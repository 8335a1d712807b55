"""The step-time row: learner phases passed through, generators averaged, the ideal overlap."""

from __future__ import annotations

import pytest

from cir_actors.ops.step_time import step_time_row


def test_row_from_learner_and_generators():
    gens = [
        {"wall_s": 10.0, "idle_s": 4.0, "weight_load_s": 0.5, "generation_s": 20.0, "tool_wait_s": 3.0, "tool_exec_s": 1.0,
         "scoring_s": 1.0},
        {"wall_s": 10.0, "idle_s": 2.0, "weight_load_s": 0.3, "generation_s": 30.0, "tool_wait_s": 5.0, "tool_exec_s": 2.0,
         "scoring_s": 2.0},
    ]
    tm = {"phases": {"fetch_s": 0.1, "proximal_s": 0.0, "update_s": 2.9}}
    row = step_time_row(tm, wait_batch_s=6.0, train_s=3.0, publish_s=1.0, step_s=10.0, gens=gens)
    assert row["time/learner_update_s"] == 2.9 and row["time/learner_busy_s"] == 4.0
    assert row["time/gen_busy_s"] == pytest.approx(7.0)  # mean of 6 and 8
    assert row["time/gen_generation_traj_s"] == pytest.approx(25.0)
    assert row["time/gen_weight_load_s"] == pytest.approx(0.4)
    assert row["time/gen_tool_exec_traj_s"] == pytest.approx(1.5) and row["time/gen_tool_queue_traj_s"] == pytest.approx(2.5)
    assert row["time/ideal_sync_step_s"] == pytest.approx(11.0)
    assert row["time/ideal_async_step_s"] == pytest.approx(7.0)
    assert row["time/overlap_efficiency"] == pytest.approx(0.7)


def test_row_without_generators_has_learner_parts_only():
    row = step_time_row({}, wait_batch_s=1.0, train_s=2.0, publish_s=0.5, step_s=3.5, gens=[])
    assert row["time/learner_busy_s"] == 2.5 and row["time/learner_fetch_s"] == 0.0
    assert not any(k.startswith("time/gen_") or "ideal" in k for k in row)
