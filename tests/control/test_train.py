"""A short real training run: every actor real (vLLM generator, sandboxed interpreter pool,
math-verify scorer, buffer, scheduler, DeepSpeed learner), then a resume from its checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import short_run_config

from cir_actors.control.trainer import Trainer, step_metrics

pytestmark = pytest.mark.slow


def test_step_metrics_adds_up():
    metas = [[{"reward": 1.0, "correct": 1.0, "response_len": 10, "executed": 1, "staleness": 0, "finish_stop": 1.0},
              {"reward": -1.0, "correct": 0.0, "response_len": 20, "executed": 0, "staleness": 1, "finish_length": 1.0}]]
    m = step_metrics(metas)
    assert m["accuracy"] == 0.5 and m["reward_mean"] == 0.0 and m["response_len"] == 15
    assert m["staleness_hist"] == {"0": 1, "1": 1} and m["finish_reasons"] == {"stop": 1, "length": 1}
    assert m["tool_calls_per_response"] == 0.5


def test_short_training_run_and_resume(short_run, tmp_path):
    """The shared 2-step run (tests/conftest.py), then a resume of a copy of it to 3 steps."""
    shared_dir, summary, _ = short_run
    run_dir = tmp_path / "run"
    shutil.copytree(shared_dir, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["budget"] for r in rows] == [2, 2]  # budget of the version each step published
    for r in rows:
        assert r["trajectories"] == 8 and max(int(k) for k in r["staleness_hist"]) <= 1
        # where the step went (cir_actors/ops/step_time.py): the learner's phases fit in its train time,
        # the generator did generate, and the ideal steps bracket each other
        phases = r["time/learner_fetch_s"] + r["time/learner_proximal_s"] + r["time/learner_update_s"]
        assert 0 < phases <= r["time/train_s"] + 1e-6 and r["time/learner_update_s"] > 0
        assert r["time/gen_wall_s"] > 0 and r["time/ideal_async_step_s"] <= r["time/ideal_sync_step_s"]
        assert r["interp_cache/lookups"] == 0  # the cache is off by default
        assert r["partial/continued"] == r["partial/continued_trajectories"] == 0  # nothing died
        assert r["partial/streamed"] >= 0 and r["response_len_fresh"] == r["response_len"]
    # a step's samples may all have been generated inside the previous step's window: sum over steps
    assert sum(r["time/gen_generation_traj_s"] for r in rows) > 0
    # the weights reached the generator: it serves the final version with the learner's checksum
    (served,) = summary["served"].values()
    assert served["version"] == 2 and served["error"] is None
    assert served["checksum"] == served["expected_checksum"] != ""
    # accounting adds up: admitted = trained + dropped + ready + in flight
    sched, buf = summary["scheduler"], summary["buffer"]
    dropped = sum(buf["dropped_groups"].values())
    assert sched["admitted_groups"] == buf["served_groups"] + dropped + buf["ready_groups"] + sched["inflight_groups"]
    assert buf["served_groups"] == 4
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert (run_dir / "curves.png").stat().st_size > 0

    # Resume: the same run dir with more steps continues from version 2 and trains only new groups.
    trainer = Trainer(short_run_config(run_dir, 3))
    try:
        summary2 = trainer.run()
    finally:
        trainer.shutdown()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert summary2["final_version"] == 3
    assert next(iter(summary2["served"].values()))["version"] == 3
