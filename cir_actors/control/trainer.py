"""The driver of a training run: starts (or joins) Ray, creates the named actors of every role,
runs the learner loop, and writes the run directory.

    run_dir/config.yaml        the resolved config
    run_dir/metrics.jsonl      one line per step (rewards, accuracy, lengths, tool use, budget,
                               version, staleness, loss diagnostics, throughput, idle times, counts)
    run_dir/checkpoints/       learner state + buffer groups + scheduler position, `latest` pointer
    run_dir/curves.png         reward and accuracy per step, drawn at the end
    run_dir/trajectories/      per step, a sample of trained trajectories token by token (learning/dumps.py;
                               `python entrypoints/view.py run_dir` renders them, docs/viewer.md)
    run_dir/wandb/             W&B (offline unless logging.wandb_mode=online)

The trajectories themselves never pass through the driver: generators put them into the object
store owned by the buffer, and the learner ranks fetch their shard by reference. The driver sees
only the few numbers the buffer keeps per sample.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cir_actors.config import Config, dump_config
from cir_actors.types import LearnerHung, PolicyUpdate

log = logging.getLogger(__name__)


def init_ray(cfg: Config) -> None:
    """Join the cluster when asked, else start a private local Ray (local_head.connect_ray)."""
    from cir_actors.ops.local_head import connect_ray

    connect_ray(cfg)


def resolve_model_path(cfg: Config) -> str:
    """The model directory (local, hub id fetched into the node's cache, or the tiny model), after
    every load-time refusal (window, sampling the learner cannot reproduce): cir_actors/data/model_setup.py."""
    from cir_actors.data.model_setup import check_feasible, resolve_model

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
    continued = [m for m in flat if m.get("continued_tokens", 0) > 0]
    fresh = [m for m in flat if m.get("continued_tokens", 0) <= 0]
    return {
        "reward_mean": mean("reward"),
        "accuracy": mean("correct"),
        "response_len": mean("response_len"),
        "code_blocks_per_response": mean("code_blocks"),
        "tool_calls_per_response": mean("executed"),
        "interp_errors_per_response": mean("interp_errors"),
        "interp_timeouts_per_response": mean("interp_timeouts"),
        "scorer_timeouts_per_response": mean("verdict_timeout"),
        "sampled_tokens": float(sum(m.get("sampled_tokens", 0.0) for m in flat)),
        "staleness_hist": {str(k): v for k, v in sorted(staleness.items())},
        "staleness_mean": float(np.mean([m.get("staleness", 0) for m in flat])),
        "finish_reasons": dict(finish),
        "trajectories": len(flat),
        # partial trajectories continued by another generator (after a death or a resume): how many,
        # the response tokens they inherited, and their length beside the others'
        "partial/continued_trajectories": len(continued),
        "partial/continued_tokens": float(sum(m["continued_tokens"] for m in continued)),
        "response_len_continued": float(np.mean([m["response_len"] for m in continued])) if continued else None,
        "response_len_fresh": float(np.mean([m.get("response_len", 0.0) for m in fresh])) if fresh else None,
    }


CACHE_COUNTERS = ("lookups", "hits", "calls_saved")


def cache_step_counts(last: dict[int, dict[str, int]], answered: dict[int, dict[str, int]]) -> dict[str, int]:
    """This step's execution-cache counts from the pools that answered ({pool index: cumulative
    counters}), against what each reported when it last answered (`last`, updated in place). A pool
    that did not answer is counted when it next does; one whose counters went down was restarted
    and counts from 0."""
    step = dict.fromkeys(CACHE_COUNTERS, 0)
    for i, now in answered.items():
        before = last.get(i, {})
        restarted = now["lookups"] < before.get("lookups", 0)
        for k in CACHE_COUNTERS:
            step[k] += now[k] - (0 if restarted else before.get(k, 0))
        last[i] = {k: now[k] for k in CACHE_COUNTERS}
    return step


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, for logs and recovery records."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


FINISH_ROUND_S = 2.0  # after the last step: one round of waiting for the generators (Trainer._finish_generators)
FINISH_SERVED_S = 180.0  # ... for all of them to report serving the final version
FINISH_RUN_S = 300.0  # ... for all of them to end their runs
DETACH_S = 60.0  # an automatic resume's wait for each generator to detach from the replaced run (Trainer.shutdown)
SLOT_WAIT_S = 5.0  # one round of a shared-memory publication's wait for a slot (Trainer._publish)


@contextlib.contextmanager
def _learner_calls() -> Iterator[None]:
    """Learner calls made outside the step's own: a dead or hung rank resumes the run, as in the step."""
    import ray

    try:
        yield
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, LearnerHung) as e:
        raise StatefulRoleDied("learner rank", e) from e


class StatefulRoleDied(RuntimeError):
    """A learner rank, the buffer or the scheduler died or answers nothing: the run resumes from its
    latest checkpoint."""

    def __init__(self, role: str, cause: BaseException):
        self.cause = one_line(cause)
        super().__init__(f"{role} died ({self.cause})")
        self.role = role


class ConservationError(RuntimeError):
    """admitted != trained + dropped + in flight + buffered: a group was lost or counted twice."""


class Trainer:
    def __init__(self, cfg: Config, kept: list[Any] | None = None, incarnation: int = 0):
        """`kept`, `incarnation`: an automatic resume's (see `train`): per generator index, the
        actor kept from the replaced run (None: start a new one)."""
        self.cfg = cfg
        self.kept = kept
        self.incarnation = incarnation
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.history: list[dict[str, Any]] = []
        self._wandb = None
        self.recoveries = _load_recoveries(self.run_dir)
        self._generator_restarts = 0
        self._pending_recovery: dict[str, dict[str, Any]] = {}  # generator name -> its open recovery record
        self._stateless_pids: dict[str, int] = {}  # interpreter-i / scorer-i -> the pid that last answered
        self._stateless_probes: dict[str, tuple[Any, float, bool]] = {}  # as _probes, per stateless actor
        self._probes: dict[int, tuple[Any, float, bool]] = {}  # generator -> (health check out, sent at, ever answered)
        self._health: dict[int, dict[str, Any]] = {}  # generator -> its last health answer
        self._starting: dict[int, float] = {}  # generator -> when it was started, until it asks for work
        self._cache_totals: dict[int, dict[str, int]] = {}  # each pool's cache counters when it last answered
        self.pending_resume: dict[str, Any] | None = None  # an automatic resume, closed by the first step

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        import ray
        from transformers import AutoTokenizer

        from cir_actors.control.budget_scheduler import BudgetScheduler
        from cir_actors.control.replay_buffer import ReplayBuffer
        from cir_actors.data.loaders import load_tasks
        from cir_actors.learning.learner import Learner
        from cir_actors.ops.cluster import actor_options
        from cir_actors.sandbox.pool import InterpreterPool, probe_interpreters
        from cir_actors.scoring.scorer import Scorer, probe_scorers

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        init_ray(cfg)
        taken = wait_names_free(cfg, 60.0, skip=kept_names(self.kept))
        if taken:
            raise RuntimeError(f"actors named {', '.join(taken)} are alive in namespace '{cfg.cluster.namespace}': "
                               "another run of this config is going on (or use another cluster.namespace)")
        self.model_path = resolve_model_path(cfg)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        tasks = load_tasks(cfg, tokenizer, "train")
        log.info("%d training tasks; model %s", len(tasks), self.model_path)

        self.scheduler = ray.remote(BudgetScheduler).options(**actor_options("scheduler", cfg)).remote(cfg, tasks)
        self.buffer = ray.remote(ReplayBuffer).options(**actor_options("buffer", cfg)).remote(
            cfg.scheduler.max_staleness,
            drop_zero_advantage=cfg.buffer.drops_zero_variance,
            max_groups=cfg.buffer.max_buffered_groups,
            ledger=self.scheduler,
            continue_partials=cfg.generator.continue_partials,
            take_timeout_s=cfg.recovery.generator_hang_s,
        )
        self.interpreters = [
            ray.remote(InterpreterPool).options(**actor_options("interpreter", cfg, i)).remote(cfg.interpreter)
            for i in range(cfg.interpreter.num_pools)
        ]
        self.scorers = [
            ray.remote(Scorer).options(**actor_options("scorer", cfg, i)).remote(cfg.scorer)
            for i in range(cfg.scorer.num_scorers)
        ]
        probe_interpreters(self.interpreters)  # a broken sandbox or scorer: one sentence (ProbeFailed) here,
        probe_scorers(self.scorers)  # not "3 groups in a row failed" later
        # A fresh run's generators start their engines (the slowest start) while the learner starts:
        # they load nothing from it first. A resume's get the learner's restored weights first.
        fresh = not (self.ckpt_dir / "latest").is_file() and not any(w is not None for w in self.kept or [])
        if fresh:
            self._initial_update = None
            self._start_generators()
        self.learner = Learner(cfg, self.model_path)
        self.learner.incarnation = self.incarnation
        self.resumed_from = self._maybe_resume()
        if not fresh:
            self._start_generators()
        if cfg.learner.publish == "shared_memory":  # who can read rank 0's region, who needs the object store
            self.learner.receiver_nodes = ray.get([w.node_id.remote() for w in self.workers], timeout=300)
        for i, w in enumerate(self.workers):
            self._get(self.scheduler.register_generator.remote(f"generator-{i}", w), "scheduler")
        self._init_wandb()

    def _start_generators(self) -> None:
        """One generator per `generator.num_generators`: the one kept from the replaced run when it
        attaches, else a new one; each loads `_initial_update` first (None: serves the model as is)."""
        import ray

        self.workers = []
        for i in range(self.cfg.generator.num_generators):
            w = self.kept[i] if self.kept else None
            if w is None:
                self.workers.append(self._new_generator(i, self._initial_update))
                continue
            try:  # kept from the run this one resumes: its engine holds that run's weights, replaced first
                ray.get(w.attach.remote(self._interpreters_for(i), self.scorers, self.buffer, self.scheduler,
                                        self._initial_update), timeout=60)
            except Exception as e:  # noqa: BLE001 - it died since it detached: a new one
                log.warning("generator-%d kept for the resume did not attach (%s); starting a new one", i, one_line(e))
                ray.kill(w, no_restart=True)
                w = self._new_generator(i, self._initial_update)
            self.workers.append(w)
        self._starting = {i: time.monotonic() for i in range(len(self.workers))}

    def _interpreters_for(self, i: int) -> list[Any]:
        """Generator i's interpreter pools: its own first, then the others (where retries go)."""
        k = i % len(self.interpreters)
        return self.interpreters[k:] + self.interpreters[:k]

    def _new_generator(self, i: int, initial_update: Any) -> Any:
        import ray

        from cir_actors.generation.rollout_worker import RolloutWorker
        from cir_actors.ops.cluster import actor_options

        deadline = time.monotonic() + 60.0
        while True:
            try:
                return ray.remote(RolloutWorker).options(**actor_options("generator", self.cfg, i)).remote(
                    self.cfg, self.model_path, f"generator-{i}", self._interpreters_for(i),
                    self.scorers, self.buffer, self.scheduler, initial_update,
                )
            except ValueError as e:  # the dead actor's name is released a moment after its death
                if "already taken" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _get(self, ref: Any, role: str, timeout: float | None = None) -> Any:
        """ray.get from the buffer or the scheduler with a deadline. Its death, or no answer before
        the deadline (a stopped or wedged process), becomes StatefulRoleDied: the run resumes."""
        import ray
        import ray.exceptions as rex

        setting = "" if timeout else " (recovery.call_timeout_s)"
        timeout = timeout or self.cfg.recovery.call_timeout_s
        try:
            return ray.get(ref, timeout=timeout)
        except (rex.RayActorError, rex.ActorUnavailableError, rex.ObjectLostError) as e:  # lost: its owner died
            raise StatefulRoleDied(role, e) from e
        except rex.GetTimeoutError as e:
            hung = TimeoutError(f"the {role} answered nothing for {timeout:.0f} s{setting}")
            raise StatefulRoleDied(role, hung) from e

    def _maybe_resume(self) -> int | None:
        """Restore learner, buffer, scheduler and counters from the latest checkpoint, if any."""
        from cir_actors.serialization import decode_partial, decode_scored, read_frames

        self._initial_update = None
        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            # Nothing to resume: steps a run logged before dying without a checkpoint are not trained.
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            if self.kept and any(w is not None for w in self.kept):  # they serve trained weights:
                self._initial_update = self.learner.publish()  # back to the start's
            return None
        step_dir = self.ckpt_dir / latest.read_text().strip()
        cut = json.loads((step_dir / "cut.json").read_text())
        self.learner.load_checkpoint(step_dir / "learner")
        with open(step_dir / "buffer.msgpack", "rb") as f:
            groups = list(read_frames(f))
        for g in groups:
            g["samples"] = [decode_scored(s) for s in g["samples"]]
        # Generators start from the base model (or a kept one from the replaced run's weights): they
        # get the restored weights first (RolloutWorker.run), and a restarted one from the scheduler.
        self._initial_update = self.learner.publish()
        self._get(self.scheduler.restore.remote(cut["scheduler"], self._initial_update), "scheduler")
        self._get(self.buffer.restore_groups.remote(groups), "buffer")
        inflight_file = step_dir / "inflight.msgpack"
        if inflight_file.is_file():  # in-flight groups' samples and partials (generator.continue_partials)
            with open(inflight_file, "rb") as f:
                inflight = list(read_frames(f))
            for g in inflight:
                for item in g["finished"]:
                    item["data"] = decode_scored(item["data"])
                for item in g["partials"]:
                    item["data"] = decode_partial(item["data"])
            self._get(self.buffer.restore_inflight.remote(inflight), "buffer")
        self._get(self.buffer.restore_counters.remote(cut["counters"]), "buffer")
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

        from cir_actors.ops.metrics import LearnerMetrics, RunMetrics
        from cir_actors.types import DropReason

        cfg = self.cfg
        self.setup()
        self.runs = [w.run.remote() for w in self.workers]
        total = cfg.scheduler.total_steps
        version = self.learner.version
        t_start = time.monotonic()
        learner_wait = 0.0
        dropped_total: Counter[str] = Counter()
        from cir_actors.learning.dumps import dump_step

        learner_metrics = LearnerMetrics("learner")
        self._run_metrics = RunMetrics()
        self._step_times: list[float] = []
        metrics_file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        try:
            while version < total:
                t0 = time.monotonic()
                self._check_workers()  # every step, not only while waiting: a dead generator is healed at once
                batch = self._wait_batch(version, t0, dropped_total)
                self._settle_publication()
                t_batch = time.monotonic()
                learner_wait += t_batch - t0
                try:
                    train_metrics = self.learner.train_step(batch.groups, record=cfg.dumps.per_step)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, LearnerHung) as e:
                    raise StatefulRoleDied("learner rank", e) from e
                dump_row = dump_step(self.run_dir, self.learner.version, train_metrics.pop("records", []), cfg)
                lost_idx = set(train_metrics.pop("lost_groups", []))
                lost_ids = [gid for k, gid in enumerate(batch.group_ids) if k in lost_idx]
                trained_ids = [gid for k, gid in enumerate(batch.group_ids) if k not in lost_idx]
                if lost_ids:
                    lost_traj = sum(len(batch.groups[k]) for k in lost_idx)
                    self._get(self.scheduler.groups_dropped.remote(lost_ids, DropReason.LOST), "scheduler")
                    self._get(self.buffer.mark_lost.remote(lost_ids, lost_traj), "buffer")
                    log.warning("step %d: %d groups lost with their objects (counted, not trained)",
                                version + 1, len(lost_ids))
                self._get(self.scheduler.groups_trained.remote(trained_ids), "scheduler")
                t_train = time.monotonic()
                update = self._get(self.scheduler.advance.remote(self._publish()), "scheduler")
                version = update.version
                t_pub = time.monotonic()
                self._step_times.append(t_pub - t0)
                learner_metrics.step(t_train - t_batch, int(train_metrics.get("seq_tokens", 0)), version,
                                     train_metrics.get("loss"))
                learner_metrics.publish(t_pub - t_train)
                learner_metrics.correction(train_metrics.get("is_masked_frac", 0.0),
                                           train_metrics.get("is_cap_frac", 0.0), train_metrics.get("is_ess", 1.0))
                row = self._row(version, batch, train_metrics, t0, t_batch, t_train, t_pub, t_start,
                                learner_wait, dropped_total)
                row["group_ids"] = trained_ids
                if self.pending_resume is not None:
                    rec, self.pending_resume = self.pending_resume, None
                    rec["resumed_after_s"] = round(time.monotonic() - rec.pop("_t0"), 2)
                    self._record_recovery(rec)
                    log.warning("training again %.1f s after %s died", rec["resumed_after_s"], rec["name"])
                row.update(self._conservation_row())
                row.update(dump_row)
                self.history.append(row)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                if self._wandb is not None:
                    self._wandb.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=version)
                if cfg.logging.progress:
                    print(self._progress(row, total), flush=True)
                if cfg.learner.save_every and version % cfg.learner.save_every == 0 and version < total:
                    self.save_checkpoint(version)
            self._settle_publication()  # the last version reaches every generator
        finally:
            metrics_file.close()
        # The final checkpoint comes first: a late failure below loses nothing that was trained.
        self._get(self.scheduler.stop.remote(), "scheduler")
        self.save_checkpoint(version)
        served, worker_stats = self._finish_generators(version)
        for rec in self._pending_recovery.values():  # restarted, but the run ended before it served
            rec["serving_again_s"] = None
            self._record_recovery(rec)
        self._pending_recovery.clear()
        self._plot()
        summary = {"final_version": version, "steps": len(self.history), "wall_s": time.monotonic() - t_start,
                   "served": served, "recoveries": self.recoveries,
                   "workers": worker_stats, "scheduler": self._get(self.scheduler.state.remote(), "scheduler"),
                   "buffer": self._get(self.buffer.stats.remote(), "buffer")}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if self._wandb is not None:
            self._wandb.finish()
        return summary

    def _finish_generators(self, version: int) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """After the last step (trained and saved): every generator reports serving `version` with
        the checksum it was sent (invariant 5), then ends its run; (the serving reports, each run's
        stats). Waited for in rounds of FINISH_ROUND_S under one deadline per phase, hangs judged
        between rounds as during the run. A generator that died, or hangs, is neither restarted
        (nothing is left to generate) nor waited for: it is killed with its engine processes and
        named in one sentence in its report and its stats."""
        import ray

        n = len(self.workers)
        given_up: dict[int, str] = {}

        def give_up(i: int, why: str) -> None:  # killed with its engine processes, not waited for
            given_up[i] = why
            log.error("generator-%d %s; not waited for", i, why)
            self._kill_engine_processes(i)
            ray.kill(self.workers[i], no_restart=True)

        def give_up_hung() -> None:
            for i, why in self._hung_generators():
                if i not in given_up:
                    give_up(i, f"is alive but {why} after the last step (killed)")

        def ended(i: int) -> dict[str, Any] | None:  # its run's result once it ended (died: given up)
            if i in given_up or not ray.wait([self.runs[i]], timeout=0)[0]:
                return None
            try:
                return ray.get(self.runs[i])
            except Exception as e:  # noqa: BLE001 - training is done and saved; say which worker and go on
                given_up[i] = f"died after the last step: {one_line(e)}"
                log.error("generator-%d %s", i, given_up[i])
                return None

        stats: list[dict[str, Any] | None] = [None] * n
        deadline = time.monotonic() + FINISH_SERVED_S
        while True:
            served = self._get(self.scheduler.wait_served.remote(version, timeout_s=FINISH_ROUND_S), "scheduler")
            for i in range(n):
                stats[i] = stats[i] or ended(i)
            waiting = [i for i in range(n) if i not in given_up and stats[i] is None
                       and not served.get(f"generator-{i}", {}).get("error")
                       and (served.get(f"generator-{i}", {}).get("version") or -1) < version]
            if not waiting:
                break
            if time.monotonic() > deadline:
                for i in waiting:
                    give_up(i, f"did not report serving version {version} within {FINISH_SERVED_S:.0f} s (killed)")
                break
            give_up_hung()
        deadline = time.monotonic() + FINISH_RUN_S
        while left := [i for i in range(n) if i not in given_up and stats[i] is None]:
            ray.wait([self.runs[i] for i in left], num_returns=len(left), timeout=FINISH_ROUND_S)
            for i in left:
                stats[i] = ended(i)
            if time.monotonic() > deadline:
                for i in left:
                    if stats[i] is None and i not in given_up:
                        give_up(i, f"did not end its run within {FINISH_RUN_S:.0f} s of the last step (killed)")
                break
            give_up_hung()
        for i, why in given_up.items():
            stats[i] = {"error": f"generator-{i} {why}"}
            served[f"generator-{i}"] = {**served.get(f"generator-{i}", {}), "error": f"generator-{i} {why}"}
        for name, rep in served.items():
            if rep.get("error") or rep.get("checksum") != rep.get("expected_checksum"):
                log.error("%s did not load version %d cleanly: %s", name, version, rep)
        return served, [s or {} for s in stats]

    def _wait_batch(self, version: int, t0: float, dropped_total: Counter[str]) -> Any:
        """The next batch; meanwhile heal generators, watch the weight pushes and the progress.
        (The buffer reports its drops to the scheduler's ledger itself; they are only counted here.)"""
        cfg = self.cfg
        stall_s = max(cfg.recovery.min_stall_s, cfg.recovery.stall_factor * float(np.median(self._step_times))
                      if self._step_times else cfg.recovery.min_stall_s)
        while True:
            batch = self._get(self.buffer.get_batch.remote(cfg.learner.prompts_per_step, version, timeout_s=2.0),
                              "buffer")
            if batch is not None and batch.dropped:
                dropped_total.update(batch.dropped)
            if batch is not None and cfg.buffer.dynamic_sampling:
                self._get(self.scheduler.batch_inspected.remote(len(batch.groups), batch.dropped), "scheduler")
            if batch is not None and batch.groups:
                return batch
            self._check_workers()
            with _learner_calls():  # a rank stopped after the last step is found here, not at the next
                self.learner.probe(receivers_starting=bool(self._starting))
            if time.monotonic() - t0 > stall_s:
                raise RuntimeError(f"no batch for {time.monotonic() - t0:.0f} s at version {version} "
                                   f"(watchdog: {stall_s:.0f} s); {self._stall_report()}")

    def _stall_report(self) -> str:
        """What the scheduler, the buffer and each generator say, for the no-batch watchdog's error."""
        import ray

        sched = self._get(self.scheduler.state.remote(), "scheduler")
        buf = self._get(self.buffer.stats.remote(), "buffer")
        keys = ("version", "inflight_groups", "capacity", "admitted_groups", "waiting_generators", "dropped_groups",
                "verified", "dead_generators", "served")
        gens = {}
        for i, w in enumerate(self.workers):
            try:
                h = ray.get(w.health.remote(), timeout=10)
                gens[f"generator-{i}"] = {k: h[k] for k in ("served_version", "loading", "asking", "inflight_groups",
                                                             "inflight_trajectories", "engine_silent_s")}
            except Exception as e:  # noqa: BLE001 - a report: say what it answered
                gens[f"generator-{i}"] = one_line(e)
        return (f"scheduler {json.dumps({k: sched[k] for k in keys}, default=str)}; "
                f"buffer {json.dumps({k: buf[k] for k in ('partial_groups', 'ready_groups', 'dropped_groups')})}; "
                f"generators {json.dumps(gens, default=str)}")

    def _publish(self) -> PolicyUpdate:
        """The learner's new version. Under `learner.publish: shared_memory` a generator whose engine
        is stuck in a load holds the slot this version goes into: wait for it in short rounds while
        healing generators (the health check finds the stuck one, and its death frees the slot), up
        to `recovery.push_timeout_s`, instead of blocking where no health check runs."""
        from cir_actors.learning.shared_weights import SlotBusy

        rounds = self.cfg.learner.publish == "shared_memory"
        deadline = time.monotonic() + self.cfg.recovery.push_timeout_s
        while True:
            try:
                with _learner_calls():
                    return self.learner.publish(slot_wait_s=SLOT_WAIT_S if rounds else None)
            except SlotBusy as e:  # raised by rank 0: Ray's error is also a SlotBusy, `cause` the original
                if time.monotonic() > deadline:
                    cause = getattr(e, "cause", e)
                    raise RuntimeError(f"{(str(cause).splitlines() or [''])[0]}: no generator freed it within "
                                       f"recovery.push_timeout_s ({self.cfg.recovery.push_timeout_s:.0f} s)") from e
                self._check_workers()

    def _settle_publication(self) -> None:
        """Under `learner.publish: broadcast`, before the learner moves on: wait for the last
        publication while healing generators (one collective over all of them: a hung generator
        stalls it for everyone until the health check finds and kills it), and send a version that
        did not reach every generator again through the object store. Nothing to do otherwise."""
        if self.cfg.learner.publish != "broadcast":
            return
        deadline = time.monotonic() + self.cfg.recovery.learner_timeout_s
        with _learner_calls():
            while not self.learner.publication_done(timeout_s=1.0):
                self._check_workers()
                if self._starting:  # it waits for that engine to join, bounded by recovery.generator_start_s
                    deadline = time.monotonic() + self.cfg.recovery.learner_timeout_s
                if time.monotonic() > deadline:
                    raise LearnerHung(f"the learner's broadcast publication did not finish within "
                                      f"{self.cfg.recovery.learner_timeout_s:.0f} s (recovery.learner_timeout_s)")
            failed = self.learner.take_failed_publication()
        if failed is not None or self._get(self.scheduler.broadcast_failures.remote(), "scheduler"):
            self._republish(failed)

    def _republish(self, failed: dict[str, Any] | None) -> None:
        """The current version's broadcast did not reach every generator: dissolve the group (the
        next publication forms a new one) and send this version through the object store."""
        with _learner_calls():
            self.learner.reset_broadcast("republished through the object store")
            update = self.learner.publish(via="object_store")
        receivers = self._get(self.scheduler.broadcast_failures.remote(), "scheduler")
        self._get(self.scheduler.republish.remote(update), "scheduler")
        why = failed["cause"] if failed else "; ".join(f"{k}: {v}" for k, v in receivers.items())
        log.warning("version %d did not reach every generator by broadcast (%s); sent again through the object store",
                    update.version, why)

    def _check_workers(self) -> None:
        """Heal dead generators, end the run on a persistent weight-push failure, and close the
        recovery records of generators that are serving again."""
        import ray

        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        healed = set()
        for ref in done:
            i = self.runs.index(ref)
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                self._heal_generator(i, e)
                healed.add(i)
                continue
            if not self._get(self.scheduler.stopped.remote(), "scheduler"):
                raise RuntimeError(f"generator-{i} stopped while the scheduler was still admitting")
        for i, why in self._hung_generators():
            if i not in healed:
                self._heal_generator(i, TimeoutError(f"generator-{i} is alive but {why}"))
        self._watch_stateless()
        failures = self._get(self.scheduler.push_failures.remote(), "scheduler")
        if failures:
            raise RuntimeError(next(iter(failures.values())))
        if (self.cfg.learner.publish == "broadcast" and self.learner.publication_done()
                and self._get(self.scheduler.broadcast_failures.remote(), "scheduler")):
            self._republish(None)
        if self._pending_recovery:
            state = self._get(self.scheduler.state.remote(), "scheduler")
            for name, rec in list(self._pending_recovery.items()):
                if state["verified"].get(name):
                    rec["serving_again_s"] = round(time.monotonic() - rec.pop("_t0"), 2)
                    self._record_recovery(rec)
                    log.warning("%s serving again after %.1f s (version %d)", name, rec["serving_again_s"],
                                state["version"])
                    del self._pending_recovery[name]

    def _hung_generators(self) -> list[tuple[int, str]]:
        """Generators that are alive but answer nothing (an event loop stuck, a process stopped),
        with what they failed to do: a health check outstanding for `recovery.generator_hang_s`
        (judged only once the generator has answered one or asked the scheduler for work, so an
        engine still starting is not hung), a sample the buffer could not take from them within
        that deadline, or no request for work `recovery.generator_start_s` after they were started
        (an engine start that never ends)."""
        import ray

        from cir_actors.control.replay_buffer import actor_id

        hang_s, start_s = self.cfg.recovery.generator_hang_s, self.cfg.recovery.generator_start_s
        named = self._get(self.buffer.unresponsive.remote(), "buffer")
        now, hung, asked = time.monotonic(), [], None
        if self._starting:
            asked = set(self._get(self.scheduler.asked.remote(), "scheduler"))
            for i, started in list(self._starting.items()):
                if f"generator-{i}" in asked:
                    del self._starting[i]
                elif now - started > start_s:
                    why = f"has not started serving {now - started:.0f} s after it was started (recovery.generator_start_s)"
                    hung.append((i, why))
        for i, w in enumerate(self.workers):
            if any(i == j for j, _ in hung):
                continue
            ref, sent, answered = self._probes.get(i, (None, now, False))
            if ref is not None and not answered and not ray.wait([ref], timeout=0)[0]:
                # Stopped before its first answer was read (CI, 2026-12-06: found only by Ray, 8 min
                # later)? Once its run loop has asked for work it has started: judged from then.
                asked = asked if asked is not None else set(self._get(self.scheduler.asked.remote(), "scheduler"))
                if f"generator-{i}" in asked:
                    sent, answered = now, True
                    self._probes[i] = (ref, sent, answered)
            if ref is None or ray.wait([ref], timeout=0)[0]:  # answered (or failed: the run's ref tells)
                self._probes[i] = (w.health.remote(), now, answered or ref is not None)
                try:
                    health = ray.get(ref) if ref is not None else {}
                except Exception:  # noqa: BLE001 - it died: the run's ref tells
                    health = {}
                if health:
                    self._health[i] = health
                silent = health.get("engine_silent_s", 0.0)
                if silent > hang_s:
                    hung.append((i, f"its engine produced nothing for {silent:.0f} s while requests waited on it"))
                    continue
            elif answered and now - sent > hang_s:
                hung.append((i, f"answered no health check for {now - sent:.0f} s"))
                continue
            if actor_id(w) in named:
                hung.append((i, named[actor_id(w)]))
        return hung

    def _watch_stateless(self, wait_s: float = 0.0) -> None:
        """Interpreter pools and scorers: count a restart by Ray (a new pid answers the health
        check), and kill one that is alive but has answered no health check for
        `recovery.stateless_hang_s` (judged only once it has answered one): Ray restarts it, and
        the calls stuck in it fail over to the other replicas at once instead of at their deadlines.
        A health check is sent, and read at a later call. A step's row (`wait_s`) reads the answers
        in, sends every actor a fresh check and gives them `wait_s`, together, to answer: an answer
        sent just before a kill would otherwise hide the kill from that row, and a resume of the run
        starting next would recreate the actor without its death ever being counted."""
        import ray

        self._read_stateless()  # every answered check is read and a fresh one sent
        if wait_s:
            out = [p[0] for p in self._stateless_probes.values()]
            ray.wait(out, num_returns=len(out), timeout=wait_s)
            self._read_stateless()

    def _read_stateless(self) -> None:
        """One pass of `_watch_stateless`: read each answered health check, count a restart, judge
        a hang, send the next check."""
        import ray

        hang_s = self.cfg.recovery.stateless_hang_s
        actors = [("interpreter", i, a) for i, a in enumerate(self.interpreters)]
        actors += [("scorer", i, a) for i, a in enumerate(self.scorers)]
        now = time.monotonic()
        for role, i, actor in actors:
            key = f"{role}-{i}"
            ref, sent, answered = self._stateless_probes.get(key, (None, now, False))
            if ref is not None and not ray.wait([ref], timeout=0)[0]:
                if answered and now - sent > hang_s:
                    cause = f"TimeoutError: {key} is alive but answered no health check for {now - sent:.0f} s"
                    log.warning("recovery: %s killed (%s); Ray restarts it", key, cause)
                    ray.kill(actor, no_restart=False)
                    self._stateless_probes.pop(key)
                    self._stateless_pids.pop(key, None)  # its restart is this record, not another
                    self._record_recovery({"role": role, "name": key, "healed_by": "ray", "cause": cause})
                continue
            if ref is not None:
                try:
                    pid = ray.get(ref)["pid"]
                except Exception:  # noqa: BLE001 - it died: Ray restarts it; judged again once it answers
                    answered = False
                    if self._stateless_pids.pop(key, None) is not None:
                        self._record_recovery({"role": role, "name": key, "healed_by": "ray"})
                        log.warning("recovery: %s died and is restarted by Ray", key)
                else:
                    answered = True
                    old = self._stateless_pids.get(key)
                    if old is not None and old != pid:
                        self._record_recovery({"role": role, "name": key, "healed_by": "ray"})
                        log.warning("recovery: %s was restarted by Ray (pid %d -> %d)", key, old, pid)
                    self._stateless_pids[key] = pid
            self._stateless_probes[key] = (actor.health.remote(), now, answered)

    def _kill_engine_processes(self, i: int) -> list[int]:
        """SIGKILL generator i's vLLM engine processes (from its last health answer) by a task on its
        node. Killing the actor alone leaves them to notice its death by themselves, which a
        wedged or stopped engine core may not do soon: meanwhile it holds its sockets (a weight
        broadcast waits on them) and, on a GPU, the memory its replacement needs."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from cir_actors.ops.processes import kill_processes

        health = self._health.pop(i, {})
        if not health.get("engine_processes"):
            return []
        task = ray.remote(num_cpus=0, max_retries=0)(kill_processes).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(health["node_id"], soft=False))
        try:
            killed = ray.get(task.remote(health["engine_processes"]), timeout=60)
        except Exception as e:  # noqa: BLE001 - the node may be gone with them; the actor's kill still follows
            log.warning("recovery: could not kill generator-%d's engine processes: %s", i, one_line(e))
            return []
        if killed:
            log.warning("recovery: killed generator-%d's engine processes %s", i, killed)
        return killed

    def _heal_generator(self, i: int, err: BaseException) -> None:
        """Generator i died: release its in-flight groups (their prompts are admitted again),
        restart it under the same name and send it the current weights; the scheduler admits it
        once it echoed their fingerprint."""
        import ray

        from cir_actors.types import DropReason

        name = f"generator-{i}"
        t0 = time.monotonic()
        if self._generator_restarts >= self.cfg.recovery.max_generator_restarts:
            raise RuntimeError(f"{name} died and recovery.max_generator_restarts "
                               f"({self.cfg.recovery.max_generator_restarts}) is spent: {err}") from err
        self._generator_restarts += 1
        lost = self._get(self.scheduler.fail_generator.remote(name), "scheduler")
        if self.cfg.generator.continue_partials:  # the others continue them from the buffer's samples and partials
            samples = 0
            log.warning("recovery: %s died (%s); %d groups in flight handed to the other generators, restarting it",
                        name, type(err).__name__, len(lost))
        else:
            samples = self._get(self.buffer.discard_groups.remote(lost, DropReason.GENERATOR_LOST), "buffer")
            log.warning("recovery: %s died (%s); %d groups in flight released (%d samples dropped), restarting it",
                        name, type(err).__name__, len(lost), samples)
        engine_killed = self._kill_engine_processes(i)
        ray.kill(self.workers[i], no_restart=True)
        self._probes.pop(i, None)
        update = self._get(self.scheduler.current_update.remote(), "scheduler")
        broadcast_failed = None
        if self.cfg.learner.publish == "broadcast":
            # A broadcast group's membership is fixed when it forms: the next one re-forms with the new
            # actor. The killed one fails a publication still under way; the others then get its
            # version through the object store, like the new actor.
            with _learner_calls():
                self.learner.reset_broadcast(f"{name} is being replaced")
                update = self.learner.publish(via="object_store")
                broadcast_failed = self.learner.take_failed_publication()
        self.workers[i] = self._new_generator(i, None)
        self._starting[i] = time.monotonic()
        if self.cfg.learner.publish == "shared_memory":
            node = ray.get(self.workers[i].node_id.remote(), timeout=300)
            if self.learner.receiver_nodes is not None:
                self.learner.receiver_nodes[i] = node
            if update.shared_memory is not None and update.weights is None and node != update.shared_memory.node_id:
                update = self.learner.publish()  # the new actor is on another node: with an object-store copy
        self._get(self.scheduler.register_generator.remote(name, self.workers[i], update), "scheduler")
        if broadcast_failed is not None or self._get(self.scheduler.broadcast_failures.remote(), "scheduler"):
            self._get(self.scheduler.republish.remote(update, [name]), "scheduler")
            log.warning("recovery: version %d sent again to the other generators through the object store "
                        "(the broadcast under way when %s was killed failed)", update.version, name)
        self.runs[i] = self.workers[i].run.remote()
        self._pending_recovery[name] = {"role": "generator", "name": name, "cause": one_line(err),
                                        "at_version": update.version,
                                        "groups_released": len(lost), "samples_dropped": samples,
                                        "groups_continued": len(lost) if self.cfg.generator.continue_partials else 0,
                                        "engine_processes_killed": engine_killed, "_t0": t0}

    def _record_recovery(self, rec: dict[str, Any]) -> None:
        rec = {k: v for k, v in rec.items() if not k.startswith("_")}
        rec["time"] = time.time()
        self.recoveries.append(rec)
        with open(self.run_dir / "recoveries.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _conservation_row(self) -> dict[str, Any]:
        """Check both conservation identities at one instant and return them for metrics.jsonl."""
        self._watch_stateless(wait_s=5.0)  # restarts by Ray since the last step are counted in this row
        snap = self._get(self.buffer.snapshot.remote(), "buffer")
        groups, traj = snap["groups"], snap["trajectories"]
        if not groups["ok"]:
            raise ConservationError(f"groups: admitted {groups['admitted']} != trained {groups['trained']} + "
                                    f"dropped {groups['dropped']} + in flight {groups['inflight']} + "
                                    f"buffered {groups['buffered']}")
        if not traj["ok"]:
            raise ConservationError(f"trajectories: added {traj['added']} != trained {traj['trained']} + "
                                    f"dropped {traj['dropped']} + partial {traj['partial']} + ready {traj['ready']}")
        restarts = Counter(r["role"] for r in self.recoveries)
        last_s: dict[str, float] = {}
        for r in self.recoveries:
            for k in ("serving_again_s", "resumed_after_s"):
                if r.get(k) is not None:  # None: restarted, but the run stopped before it served
                    last_s[r["role"]] = r[k]
        self._run_metrics.conservation(groups, traj)
        self._run_metrics.restarts(dict(restarts), last_s)
        row: dict[str, Any] = {f"conservation/groups_{k}": v for k, v in groups.items() if k != "dropped_by_reason"}
        row["conservation/groups_dropped_by_reason"] = groups["dropped_by_reason"]
        row.update({f"conservation/trajectories_{k}": v for k, v in traj.items() if k != "dropped_by_reason"})
        row["conservation/trajectories_dropped_by_reason"] = traj["dropped_by_reason"]
        row.update({f"recovery/restarts_{role}": n for role, n in restarts.items()})
        row.update({f"recovery/last_s_{role}": s for role, s in last_s.items()})
        return row

    def _row(self, version, batch, train_metrics, t0, t_batch, t_train, t_pub, t_start, learner_wait, dropped_total):
        from cir_actors.ops.step_time import answers, answers_by_index, step_time_row

        sm = step_metrics(batch.metas)
        sched = self._get(self.scheduler.state.remote(), "scheduler")
        buf = self._get(self.buffer.stats.remote(), "buffer")
        # Generators still starting after a restart are not asked (their calls would wait for the
        # engine); one that hangs costs this row at most one short deadline (and is healed by `_check_workers`).
        serving = [w for i, w in enumerate(self.workers) if f"generator-{i}" not in self._pending_recovery]
        stats_refs, times_refs = [w.stats.remote() for w in serving], [w.step_times.remote() for w in serving]
        cache_refs = [p.cache_stats.remote() for p in self.interpreters]
        deadline = time.monotonic() + 5.0
        wstats = answers(stats_refs, 5.0)
        # The interpreter pools' execution caches (cumulative counters; zeros when off), under the
        # same deadline; a pool that does not answer (Ray is restarting it) is counted at a later step.
        step_cache = cache_step_counts(self._cache_totals,
                                       answers_by_index(cache_refs, max(0.0, deadline - time.monotonic())))
        lookups, hits = step_cache["lookups"], step_cache["hits"]
        totals = {k: sum(c[k] for c in self._cache_totals.values()) for k in ("lookups", "hits")}
        # where the step's time went (cir_actors/ops/step_time.py)
        gen_times = answers(times_refs, max(0.0, deadline - time.monotonic()))
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
            **step_time_row(train_metrics, t_batch - t0, t_train - t_batch, t_pub - t_train, step_s, gen_times),
            # partial trajectories this step: streamed to the buffer, continued, not continued (by reason)
            **{"partial/" + k.removeprefix("partials_"): int(sum(g.get(k, 0) for g in gen_times))
               for k in ("partials_streamed", "partials_continued", "partials_stale", "partials_unreadable")},
            "throughput/sampled_tokens_per_s": sm.get("sampled_tokens", 0.0) / max(step_s, 1e-9),
            "throughput/trajectories_per_s": sm.get("trajectories", 0) / max(step_s, 1e-9),
            "idle/learner_s": learner_wait,
            "idle/generators_s": float(sum(w["idle_s"] for w in wstats)),
            # infrastructure faults met and retried (a group that still failed is dropped as `infra`)
            "infra/interpreter_faults": int(sum(w.get("interpreter_faults", 0) for w in wstats)),
            "infra/scorer_faults": int(sum(w.get("scorer_faults", 0) for w in wstats)),
            "interp_cache/lookups": lookups, "interp_cache/hits": hits, "interp_cache/hit_rate": hits / max(lookups, 1),
            "interp_cache/calls_saved": step_cache["calls_saved"],
            "interp_cache/lookups_total": totals["lookups"], "interp_cache/hits_total": totals["hits"],
            "count/admitted_groups": sched["admitted_groups"],
            "count/inflight_groups": sched["inflight_groups"],
            "count/failed_groups": sched["failed_groups"],
            "count/trained_groups": buf["served_groups"],
            "count/ready_groups": buf["ready_groups"],
            "count/partial_groups": buf["partial_groups"],
            "count/dropped_groups": sum(buf["dropped_groups"].values()),
            "count/dropped_by_reason": buf["dropped_groups"],
            "count/produced_trajectories": buf["added_trajectories"],
            **{f"sampling/{k}": v for k, v in sched.items() if k.startswith(("zero_variance", "oversample"))},
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
        """A consistent cut: learner at `version`, and the buffer's ready groups with the scheduler's
        state taken at one instant by the buffer (in-flight groups re-queued, counters included).
        Written to a temporary directory renamed into place, then `latest` moves: a crash while
        saving leaves the previous checkpoint as the latest."""
        import shutil

        from cir_actors.control.replay_buffer import cut_refs, fill_cut
        from cir_actors.serialization import encode_partial, encode_scored, write_frames

        step_dir = self.ckpt_dir / f"step-{version:06d}"
        tmp_dir = self.ckpt_dir / f".step-{version:06d}.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        try:
            self.learner.save_checkpoint(tmp_dir / "learner")
        except Exception as e:
            import ray.exceptions as rex

            if isinstance(e, rex.RayActorError | rex.ActorUnavailableError | LearnerHung):
                raise StatefulRoleDied("learner rank", e) from e
            raise
        # The buffer answers with references at once; their data is fetched here, so a buffer that
        # stops at any point of this is found within recovery.call_timeout_s.
        cut = self._get(self.buffer.checkpoint_cut.remote(fetch=False), "buffer")
        fill_cut(cut, self._get(cut_refs(cut), "buffer"))
        for g in cut["groups"]:
            g["samples"] = [encode_scored(s) for s in g["samples"]]
        with open(tmp_dir / "buffer.msgpack", "wb") as f:
            write_frames(f, cut["groups"])
        for g in cut["inflight"]:
            for item in g["finished"]:
                item["data"] = encode_scored(item["data"])
            for item in g["partials"]:
                item["data"] = encode_partial(item["data"])
        with open(tmp_dir / "inflight.msgpack", "wb") as f:
            write_frames(f, cut["inflight"])
        (tmp_dir / "cut.json").write_text(json.dumps({"version": version, "scheduler": cut["scheduler"],
                                                      "counters": cut["counters"]}))
        shutil.rmtree(step_dir, ignore_errors=True)
        tmp_dir.rename(step_dir)
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

    def shutdown(self, keep: bool = False) -> list[Any] | None:
        """Stop the engines and kill every actor this run created, then wait until their names are
        free (an automatic resume creates them again under the same names). With `keep` (an
        automatic resume), the generators that detach in time (`_detach_generators`) are kept with their vLLM
        engines for the next run instead (returned, None for one that did not): starting an engine
        is the slowest part of a resume. Under `learner.publish: broadcast` an engine may be inside
        a receive from the replaced learner: killing its ranks (below) fails that collective, and
        the new learner's first publication forms a new group (`weight_sync.receive_broadcast`)."""
        import ray

        for rec in self._pending_recovery.values():  # restarted, but the run stopped (to resume) before it served
            rec["serving_again_s"] = None
            self._record_recovery(rec)
        self._pending_recovery.clear()
        workers = list(getattr(self, "workers", []))
        complete = len(workers) == self.cfg.generator.num_generators
        # Generators kept for this run that set-up did not reach (it failed first) are not kept again.
        workers += [w for w in self.kept or [] if w is not None and not any(w is x for x in workers)]
        kept = None
        if keep and complete:
            kept = self._detach_generators()
        keeping = [w for w in kept or [] if w is not None]
        for w in workers:
            if any(w is k for k in keeping):
                continue
            try:
                ray.get(w.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001, S110 - best effort at exit (the actor may be dead)
                pass
        if hasattr(self, "learner"):
            try:
                self.learner.shutdown()
            except Exception as e:  # noqa: BLE001 - a dead rank: kill what is left below
                log.warning("learner shutdown: %s", e)
                for r in getattr(self.learner, "ranks", []):
                    ray.kill(r)
        actors = workers + [a for name in ("interpreters", "scorers") for a in getattr(self, name, [])]
        actors += [getattr(self, name) for name in ("scheduler", "buffer") if hasattr(self, name)]
        for actor in actors:
            if any(actor is k for k in keeping):
                continue
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        wait_names_free(self.cfg, 30.0, skip=kept_names(kept))
        return kept

    def _detach_generators(self) -> list[Any]:
        """Detach every generator from this run (RolloutWorker.detach), in parallel; those that do
        not by the end of the wait (dead, hung, or slow) are killed with their engine processes,
        None in the list returned. The wait ends at the latest deadline of those not yet detached
        (one that detaches late while the wait goes on for another is kept). The deadline is DETACH_S, or for a generator still starting (it
        has not asked for work: its engine may still be loading, and the detach waits behind it)
        what is left of its `recovery.generator_start_s`, the time it would be given anyway:
        killing it would cost the resume a whole engine start."""
        import ray

        t0 = time.monotonic()
        refs = [w.detach.remote(DETACH_S) for w in self.workers]
        start_s = self.cfg.recovery.generator_start_s
        for i, ref in enumerate(refs):  # absolute deadlines: the longest bounds the whole wait
            deadline = t0 + DETACH_S + 5.0
            if i in self._starting:
                deadline = max(deadline, self._starting[i] + start_s)
            ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
        kept: list[Any] = []
        for i, (w, ref) in enumerate(zip(self.workers, refs, strict=True)):
            try:
                ray.get(ref, timeout=0)
                kept.append(w)
                log.info("generator-%d kept for the resume with its engine (all detached after %.1f s)", i,
                         time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - dead, hung or slow: it starts anew
                log.warning("generator-%d not kept for the resume (%s): it is restarted", i, one_line(e))
                self._kill_engine_processes(i)
                with contextlib.suppress(Exception):
                    ray.kill(w, no_restart=True)
                kept.append(None)
        return kept

def actor_names(cfg: Config) -> list[str]:
    """The names of every actor a run creates (cir_actors/ops/cluster.py names them)."""
    names = [f"generator-{i}" for i in range(cfg.generator.num_generators)]
    names += [f"interpreter-{i}" for i in range(cfg.interpreter.num_pools)]
    names += [f"scorer-{i}" for i in range(cfg.scorer.num_scorers)]
    return names + ["scheduler", "buffer"] + [f"learner-rank-{i}" for i in range(cfg.learner.num_ranks)]


def kept_names(kept: list[Any] | None) -> set[str]:
    """The names of the generators a resume kept (Trainer.shutdown)."""
    return {f"generator-{i}" for i, w in enumerate(kept or []) if w is not None}


def wait_names_free(cfg: Config, timeout_s: float, skip: set[str] | None = None) -> list[str]:
    """Wait until no live actor holds one of the run's names but `skip` (a killed driver's actors
    die a moment after it); returns the names still taken at the deadline."""
    import ray

    deadline = time.monotonic() + timeout_s
    taken = []
    for name in [n for n in actor_names(cfg) if n not in (skip or set())]:
        while True:
            try:
                ray.get_actor(name, namespace=cfg.cluster.namespace)
            except ValueError:
                break
            if time.monotonic() > deadline:
                taken.append(name)
                break
            time.sleep(0.2)
    return taken


def _load_recoveries(run_dir: Path) -> list[dict[str, Any]]:
    f = run_dir / "recoveries.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def train(cfg: Config) -> dict[str, Any]:
    """Run training; when a stateful role dies (a learner rank, the buffer, the scheduler), restart
    every actor and resume from the latest checkpoint, up to recovery.max_recoveries times."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recoveries = 0
    pending: dict[str, Any] | None = None
    kept: list[Any] | None = None
    while True:
        trainer = Trainer(cfg, kept, incarnation=recoveries)
        trainer.pending_resume = pending
        resuming = False
        try:
            return trainer.run()
        except StatefulRoleDied as e:
            if recoveries >= cfg.recovery.max_recoveries:
                raise RuntimeError(f"{e}; recovery.max_recoveries ({cfg.recovery.max_recoveries}) spent") from e
            recoveries += 1
            with contextlib.suppress(Exception):  # a pool or scorer that died just before is counted,
                trainer._watch_stateless(wait_s=5.0)  # not absorbed unseen by the restart of every actor
            latest = trainer.ckpt_dir / "latest"
            where = latest.read_text().strip() if latest.is_file() else "the start (no checkpoint yet)"
            log.warning("recovery %d/%d: %s; restarting the run's actors and resuming from %s",
                        recoveries, cfg.recovery.max_recoveries, e, where)
            # The next Trainer resumes; its first step closes the record with the time to train again.
            pending = {"role": e.role.split()[0], "name": e.role, "cause": e.cause, "resumed_from": where,
                       "_t0": time.monotonic()}
            resuming = True
        finally:
            kept = trainer.shutdown(keep=resuming)
            if pending is not None and resuming:
                pending["generators_kept"] = sum(w is not None for w in kept or [])
