"""Shared fixtures. One Ray session and one tiny model for the whole test run (2 shared cores)."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports ray, deepspeed or vllm.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = PROJECT_ROOT.parent / "shared" / "data" / "benchmarks"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs one (logical CPUs > physical: actors take fractions)."""
    import ray

    if not ray.is_initialized():
        # address="local": a private instance even when `ray start --head` runs on the machine.
        ray.init(address="local", num_cpus=8, namespace="cir-actors-test", include_dashboard=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The locally built tiny model (built once, reused from .cache)."""
    from cir_actors.data.tiny_model import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir):
    """One vLLM Generator on the tiny model (real engine, real InterpreterPool) for the whole run,
    on its own event loop: `tiny_generator.run(tiny_generator.gen.rollout(task, 0, 2))`.
    Tests may change `gen.cfg.generator.update_policy`; they restore it."""
    from cir_actors.config import load_config
    from cir_actors.generation.generator import LocalGenerator
    from cir_actors.sandbox.pool import InterpreterPool

    cfg = load_config(None, ["generator.max_response_tokens=96", "generator.max_inflight_trajectories=16"])
    pool = InterpreterPool(cfg.interpreter)
    local = LocalGenerator(cfg, str(tiny_model_dir), pool)
    yield local
    local.close()
    pool.close()
