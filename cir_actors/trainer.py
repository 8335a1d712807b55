"""The driver of a training run: starts (or joins) Ray, creates the named actors of every role,
runs the learner loop, and writes the run directory.

    run_dir/config.yaml        the resolved config
    run_dir/metrics.jsonl      one line per step (rewards, accuracy, lengths, tool use, budget,
                               version, staleness, loss diagnostics, throughput, idle times, counts)
    run_dir/checkpoints/       learner state + buffer groups + scheduler position, `latest` pointer
    run_dir/curves.png         reward and accuracy per step, drawn at the end
    run_dir/wandb/             W&B (offline unless logging.wandb_mode=online)

The trajectories themselves never pass through the driver: generators put them into the object
store owned by the buffer, and the learner ranks fetch their shard by reference. The driver sees
only the few numbers the buffer keeps per sample.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cir_actors.config import Config, dump_config

log = logging.getLogger(__name__)


def init_ray(cfg: Config) -> None:
    """Join the cluster named by cluster.address or RAY_ADDRESS (as under `ray job submit`), else
    start a local Ray whose logical CPUs leave room for the fractional controller actors."""
    import ray

    if ray.is_initialized():
        return
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.cluster.address or None, namespace=cfg.cluster.namespace, log_to_driver=True)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 2, 4), namespace=cfg.cluster.namespace, log_to_driver=True)


def resolve_model_path(cfg: Config) -> str:
    """The model directory (local, hub id fetched into the node's cache, or the tiny model), after
    every load-time refusal (window, sampling the learner cannot reproduce): cir_actors/model_setup.py."""
    from cir_actors.model_setup import check_feasible, resolve_model

    path = resolve_model(cfg)
    check_feasible(cfg, path)
    return path


def step_metrics(metas: list[list[dict[str, float]]]) -> dict[str, Any]:
    """Per-step figures from the per-sample numbers the buffer keeps (pure; tested)."""
    flat = [m for group in metas for m in group]
    if not flat:
        return {}

    def mean(key: str) -> float:
        return float(np.mean([m.get(key, 0.0) for m in flat]))

    staleness = Counter(int(m.get("staleness", 0)) for m in flat)
    finish = Counter(k.removeprefix("finish_") for m in flat for k in m if k.startswith("finish_"))
    return {
        "reward_mean": mean("reward"),
        "accuracy": mean("correct"),
        "response_len": mean("response_len"),
        "code_blocks_per_response": mean("code_blocks"),
        "tool_calls_per_response": mean("executed"),
        "interp_errors_per_response": mean("interp_errors"),
        "interp_timeouts_per_response": mean("interp_timeouts"),
        "sampled_tokens": float(sum(m.get("sampled_tokens", 0.0) for m in flat)),
        "staleness_hist": {str(k): v for k, v in sorted(staleness.items())},
        "staleness_mean": float(np.mean([m.get("staleness", 0) for m in flat])),
        "finish_reasons": dict(finish),
        "trajectories": len(flat),
    }


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.history: list[dict[str, Any]] = []
        self._wandb = None

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        import ray
        from transformers import AutoTokenizer

        from cir_actors.budget_scheduler import BudgetScheduler
        from cir_actors.cluster import actor_options
        from cir_actors.data import load_tasks
        from cir_actors.interpreter import InterpreterPool
        from cir_actors.learner import Learner
        from cir_actors.replay_buffer import ReplayBuffer
        from cir_actors.rollout_worker import RolloutWorker
        from cir_actors.scorer import Scorer

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        init_ray(cfg)
        self.model_path = resolve_model_path(cfg)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        tasks = load_tasks(cfg, tokenizer, "train")
        log.info("%d training tasks; model %s", len(tasks), self.model_path)

        self.learner = Learner(cfg, self.model_path)
        self.scheduler = ray.remote(BudgetScheduler).options(**actor_options("scheduler", cfg)).remote(cfg, tasks)
        self.buffer = ray.remote(ReplayBuffer).options(**actor_options("buffer", cfg)).remote(
            cfg.scheduler.max_staleness,
            drop_zero_advantage=cfg.buffer.drop_zero_advantage_groups,
            max_groups=cfg.buffer.max_buffered_groups,
        )
        self.interpreters = [
            ray.remote(InterpreterPool).options(**actor_options("interpreter", cfg, i)).remote(cfg.interpreter)
            for i in range(cfg.interpreter.num_pools)
        ]
        self.scorers = [
            ray.remote(Scorer).options(**actor_options("scorer", cfg, i)).remote(cfg.scorer)
            for i in range(cfg.scorer.num_scorers)
        ]
        self.resumed_from = self._maybe_resume()
        self.workers = []
        for i in range(cfg.generator.num_generators):
            w = ray.remote(RolloutWorker).options(**actor_options("generator", cfg, i)).remote(
                cfg, self.model_path, f"generator-{i}", self.interpreters[i % len(self.interpreters)],
                self.scorers, self.buffer, self.scheduler, self._initial_update,
            )
            self.workers.append(w)
            ray.get(self.scheduler.register_generator.remote(f"generator-{i}", w))
        self._init_wandb()

    def _maybe_resume(self) -> int | None:
        """Restore learner, buffer and loader position from the latest checkpoint, if any."""
        import ray

        from cir_actors.serialization import decode_scored, read_frames
        from cir_actors.types import PolicyUpdate

        self._initial_update = None
        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            return None
        step_dir = self.ckpt_dir / latest.read_text().strip()
        self.learner.load_checkpoint(step_dir / "learner")
        state = json.loads((step_dir / "scheduler.json").read_text())
        with open(step_dir / "buffer.msgpack", "rb") as f:
            groups = list(read_frames(f))
        for g in groups:
            g["samples"] = [decode_scored(s) for s in g["samples"]]
        ray.get(self.buffer.restore_groups.remote(groups))
        # Generators start from the base model: hand them the restored weights with the first admission.
        self._initial_update = self.learner.publish()
        ray.get(self.scheduler.restore.remote(state, PolicyUpdate(version=self.learner.version, budget=0)))
        hist = self.run_dir / "metrics.jsonl"
        if hist.is_file():
            self.history = [json.loads(line) for line in hist.read_text().splitlines() if line.strip()]
            self.history = [h for h in self.history if h["step"] <= self.learner.version]
            hist.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        log.info("resumed from %s at version %d", step_dir, self.learner.version)
        return self.learner.version

    def _init_wandb(self) -> None:
        if self.cfg.logging.wandb_mode == "disabled":
            return
        try:
            import wandb

            self._wandb = wandb.init(
                project=self.cfg.logging.wandb_project or "cir-actors",
                mode=self.cfg.logging.wandb_mode,
                dir=str(self.run_dir),
                config=self.cfg.model_dump(mode="json"),
                resume="allow",
                id=self.run_dir.name.replace("/", "-"),
            )
        except Exception as e:  # noqa: BLE001 - W&B is an observer: a failure to log must not stop training
            log.warning("W&B disabled: %s", e)
            self._wandb = None

    # ---- the loop --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import ray

        cfg = self.cfg
        self.setup()
        runs = [w.run.remote() for w in self.workers]
        total = cfg.scheduler.total_steps
        version = self.learner.version
        t_start = time.monotonic()
        learner_wait = 0.0
        dropped_total: Counter[str] = Counter()
        from cir_actors.metrics import LearnerMetrics

        learner_metrics = LearnerMetrics("learner")
        metrics_file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        try:
            while version < total:
                t0 = time.monotonic()
                batch = None
                while batch is None or not batch.groups:
                    batch = ray.get(self.buffer.get_batch.remote(cfg.learner.prompts_per_step, version, timeout_s=2.0))
                    if batch is not None and batch.dropped:
                        dropped_total.update(batch.dropped)
                        ray.get(self.scheduler.groups_released.remote(sum(batch.dropped.values())))
                    self._check_workers(runs)
                t_batch = time.monotonic()
                learner_wait += t_batch - t0
                train_metrics = self.learner.train_step(batch.groups)
                t_train = time.monotonic()
                update = self.learner.publish()
                update = ray.get(self.scheduler.advance.remote(update))
                version = update.version
                t_pub = time.monotonic()
                learner_metrics.step(t_train - t_batch, int(train_metrics.get("seq_tokens", 0)), version,
                                     train_metrics.get("loss"))
                learner_metrics.publish(t_pub - t_train)
                row = self._row(version, batch, train_metrics, t0, t_batch, t_train, t_pub, t_start,
                                learner_wait, dropped_total)
                self.history.append(row)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                if self._wandb is not None:
                    self._wandb.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=version)
                if cfg.logging.progress:
                    print(self._progress(row, total), flush=True)
                if cfg.learner.save_every and version % cfg.learner.save_every == 0 and version < total:
                    self.save_checkpoint(version)
        finally:
            metrics_file.close()
            ray.get(self.scheduler.stop.remote())
        # Invariant 5: every generator reports the final version and the checksum it was sent.
        served = ray.get(self.scheduler.wait_served.remote(version))
        for name, rep in served.items():
            if rep.get("error") or rep.get("checksum") != rep.get("expected_checksum"):
                log.error("%s did not load version %d cleanly: %s", name, version, rep)
        worker_stats = ray.get(runs)
        self.save_checkpoint(version)
        self._plot()
        summary = {"final_version": version, "steps": len(self.history), "wall_s": time.monotonic() - t_start,
                   "served": served,
                   "workers": worker_stats, "scheduler": ray.get(self.scheduler.state.remote()),
                   "buffer": ray.get(self.buffer.stats.remote())}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if self._wandb is not None:
            self._wandb.finish()
        return summary

    def _check_workers(self, runs: list[Any]) -> None:
        """A worker whose loop ended early has failed: surface its error instead of waiting forever."""
        import ray

        done, _ = ray.wait(runs, num_returns=len(runs), timeout=0)
        for ref in done:
            ray.get(ref)  # raises the worker's exception
        if done and not ray.get(self.scheduler.stopped.remote()):
            raise RuntimeError("a rollout worker stopped while the scheduler was still admitting")

    def _row(self, version, batch, train_metrics, t0, t_batch, t_train, t_pub, t_start, learner_wait, dropped_total):
        import ray

        sm = step_metrics(batch.metas)
        sched = ray.get(self.scheduler.state.remote())
        buf = ray.get(self.buffer.stats.remote())
        wstats = ray.get([w.stats.remote() for w in self.workers])
        step_s = t_pub - t0
        return {
            "step": version,
            "version": version,
            "budget": sched["budget"],
            **sm,
            **{f"train/{k}": v for k, v in train_metrics.items() if isinstance(v, int | float)},
            "time/step_s": step_s,
            "time/wait_batch_s": t_batch - t0,
            "time/train_s": t_train - t_batch,
            "time/publish_s": t_pub - t_train,
            "time/elapsed_s": t_pub - t_start,
            "throughput/sampled_tokens_per_s": sm.get("sampled_tokens", 0.0) / max(step_s, 1e-9),
            "throughput/trajectories_per_s": sm.get("trajectories", 0) / max(step_s, 1e-9),
            "idle/learner_s": learner_wait,
            "idle/generators_s": float(sum(w["idle_s"] for w in wstats)),
            "count/admitted_groups": sched["admitted_groups"],
            "count/inflight_groups": sched["inflight_groups"],
            "count/failed_groups": sched["failed_groups"],
            "count/trained_groups": buf["served_groups"],
            "count/ready_groups": buf["ready_groups"],
            "count/partial_groups": buf["partial_groups"],
            "count/dropped_groups": sum(buf["dropped_groups"].values()),
            "count/dropped_by_reason": buf["dropped_groups"],
            "count/produced_trajectories": buf["added_trajectories"],
            "count/trained_trajectories": buf["served_trajectories"],
        }

    @staticmethod
    def _progress(row: dict[str, Any], total: int) -> str:
        return (
            f"step {row['step']:>4}/{total}  reward {row.get('reward_mean', 0):+.3f}  acc {row.get('accuracy', 0):6.1%}  "
            f"len {row.get('response_len', 0):5.1f}  tools {row.get('tool_calls_per_response', 0):.2f}  "
            f"tok/s {row['throughput/sampled_tokens_per_s']:7.0f}  staleness {row.get('staleness_mean', 0):.2f}  "
            f"budget {row['budget']}  step {row['time/step_s']:.1f}s"
        )

    # ---- checkpoints and plots -------------------------------------------------------------
    def save_checkpoint(self, version: int) -> Path:
        import ray

        from cir_actors.serialization import encode_scored, write_frames

        step_dir = self.ckpt_dir / f"step-{version:06d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        self.learner.save_checkpoint(step_dir / "learner")
        groups = ray.get(self.buffer.checkpoint_groups.remote())
        for g in groups:
            g["samples"] = [encode_scored(s) for s in g["samples"]]
        with open(step_dir / "buffer.msgpack", "wb") as f:
            write_frames(f, groups)
        state = ray.get(self.scheduler.checkpoint_state.remote())
        (step_dir / "scheduler.json").write_text(json.dumps(state))
        tmp = self.ckpt_dir / "latest.tmp"
        tmp.write_text(step_dir.name)
        tmp.replace(self.ckpt_dir / "latest")
        return step_dir

    def _plot(self) -> None:
        if not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        ax[0].plot(steps, [h.get("reward_mean", 0) for h in self.history])
        ax[0].set(title="reward (mean)", xlabel="step")
        ax[1].plot(steps, [h.get("accuracy", 0) for h in self.history])
        ax[1].set(title="training accuracy", xlabel="step", ylim=(0, 1))
        fig.tight_layout()
        fig.savefig(self.run_dir / "curves.png", dpi=100)
        plt.close(fig)

    def shutdown(self) -> None:
        """Stop the engines and kill every actor this run created (so a resume can reuse the names)."""
        import ray

        for w in getattr(self, "workers", []):
            try:
                ray.get(w.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001, S110 - best effort at exit
                pass
        if hasattr(self, "learner"):
            self.learner.shutdown()
        for name in ("workers", "interpreters", "scorers"):
            for actor in getattr(self, name, []):
                ray.kill(actor)
        for name in ("scheduler", "buffer"):
            if hasattr(self, name):
                ray.kill(getattr(self, name))


def train(cfg: Config) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.shutdown()
