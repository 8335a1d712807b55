"""Set-up probes: one real interpreter call (`print(1+1)` -> 2) and one real score of a known-correct
answer on every pool and scorer actor, before any rollout; a broken one is one sentence naming it."""

from __future__ import annotations

import pytest

from cir_actors.config import InterpreterConfig, ScorerConfig
from cir_actors.sandbox.pool import InterpreterPool, probe_interpreters
from cir_actors.scoring.scorer import Scorer, probe_scorers
from cir_actors.types import ProbeFailed


def _pool(ray, cfg):
    return ray.remote(InterpreterPool).options(num_cpus=0.1, max_concurrency=8).remote(cfg)


def _scorer(ray, cfg):
    return ray.remote(Scorer).options(num_cpus=0.1, max_concurrency=8).remote(cfg)


def test_healthy_pools_and_scorers_pass(ray_session):
    ray = ray_session
    pools = [_pool(ray, InterpreterConfig(max_workers=1)) for _ in range(2)]
    scorers = [_scorer(ray, ScorerConfig(num_workers=1))]
    try:
        probe_interpreters(pools)
        probe_scorers(scorers)
    finally:
        for a in pools + scorers:
            ray.kill(a)


def test_a_pool_that_cannot_start_is_named(ray_session):
    ray = ray_session
    # the second pool's own check refuses to start (4000 slots at most): its actor dies in __init__
    pools = [_pool(ray, InterpreterConfig(max_workers=1)), _pool(ray, InterpreterConfig(max_workers=4000))]
    try:
        with pytest.raises(ProbeFailed) as err:
            probe_interpreters(pools, timeout_s=240)
    finally:
        for a in pools:
            ray.kill(a)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("set-up probe: interpreter pool 1 (actor interpreter-1)")
    assert "at most 4000" in msg


def test_a_scorer_that_cannot_score_a_correct_answer_is_named(ray_session):
    ray = ray_session
    # a deadline no check can meet: every verdict is a timeout, so the known-correct answer is not correct
    scorers = [_scorer(ray, ScorerConfig(num_workers=1, timeout_s=1e-6))]
    try:
        with pytest.raises(ProbeFailed) as err:
            probe_scorers(scorers, timeout_s=240)
    finally:
        for a in scorers:
            ray.kill(a)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("set-up probe: scorer 0 (actor scorer-0)")
    assert "as timeout, not correct" in msg
