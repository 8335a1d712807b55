"""Shared fixtures. One Ray session and one tiny model for the whole test run (2 shared cores)."""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.request
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


def short_run_config(run_dir: Path, steps: int, namespace: str = "cir-short-run"):
    """The short real run's config: 2 prompts x 4 samples a step, the budget raised 1 -> 2 at version 1."""
    from cir_actors.config import load_config

    return load_config(None, [
        f"logging.run_dir={run_dir}", "logging.wandb_mode=disabled", "logging.progress=false",
        f"scheduler.total_steps={steps}", "scheduler.max_staleness=1", "scheduler.budget_schedule=[[0,1],[1,2]]",
        "learner.prompts_per_step=2", "learner.mini_batch_prompts=2", "generator.samples_per_prompt=4",
        "generator.max_response_tokens=64", "generator.num_cpus=0.5", "learner.num_cpus=0.5",
        f"cluster.namespace={namespace}", "data.num_train=64", "dumps.per_step=6",
    ])  # fmt: skip


class Scraper:
    """Polls every node's Prometheus export while the run goes on and keeps the series names seen.
    The tiny model seldom writes code: once the run's interpreter actor is up, it gets one call
    (`print(1)`) so that the interpreter's series exist whatever the model did."""

    def __init__(self, ray, namespace: str):
        self.ray, self.namespace, self.names = ray, namespace, set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def scrape(self) -> None:
        for n in self.ray.nodes():
            if n.get("Alive") and n.get("MetricsExportPort"):
                url = f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
                try:
                    text = urllib.request.urlopen(url, timeout=10).read().decode()
                except OSError:
                    continue
                self.names |= {m.group(1) for m in re.finditer(r"^(ray_cir_[a-z0-9_]+?)(?:_bucket|_count|_sum)?[{ ]",
                                                               text, re.MULTILINE)}  # fmt: skip

    def _loop(self) -> None:
        poked = False
        while not self.stop.wait(3.0):
            if not poked:
                try:
                    pool = self.ray.get_actor("interpreter-0", namespace=self.namespace)
                    self.ray.get(pool.run_async.remote("print(1)"), timeout=60)
                    poked = True
                except Exception:  # noqa: BLE001, S110 - not created yet: try again on the next tick
                    pass
            self.scrape()


@pytest.fixture(scope="session")
def short_run(ray_session, tmp_path_factory) -> tuple[Path, dict, set[str]]:
    """One 2-step real run shared by the tests that look at a finished run (tests/control/test_train.py,
    tests/ops/test_viewer.py): its directory (treat as read-only: copy it to change it), the run's
    summary, and the Prometheus series names scraped while it ran."""
    from cir_actors.control.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("short-run") / "run"
    cfg = short_run_config(run_dir, 2)
    scraper = Scraper(ray_session, cfg.cluster.namespace)
    scraper.thread.start()
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
        time.sleep(12)  # Ray exports every 5-10 s: the last records' interval
    finally:
        scraper.stop.set()
        scraper.thread.join(timeout=30)
        scraper.scrape()
        trainer.shutdown()
    return run_dir, summary, scraper.names
