"""The rollout worker: one per inference engine, the Ray actor named `generator-<i>`.

It composes a `Generator` (the vLLM engine and the multi-turn state machine) and runs the
streaming loop of the design: ask the scheduler for a prompt group, run its n rollouts
concurrently, and as *each* trajectory finishes send it to a scorer and announce it to the buffer,
which takes it with `take(key)` — so the object is owned by the buffer and survives this actor.
Many groups are in flight at once, up to the engine's trajectory capacity.

It does not decide what to generate or when weights change: the scheduler admits groups and pushes
`PolicyUpdate`s, which this actor forwards to its generator.

Failures (cir_actors/control/failures.py): interpreter calls and verdicts go through retrying adapters over
every interpreter pool and scorer (its own pool first). When they give up (`InfraFault`) the group
is dropped with reason `infra` and its prompt re-admitted — an infrastructure fault is never shown
to the model as an observation nor scored. A group's completion is reported to the scheduler's
ledger by the buffer, not by this actor, so a group is complete or not whether or not this actor
lives to say so.

Partial trajectories (`generator.continue_partials`): at each segment boundary an unfinished sample
is streamed to the buffer the same way (`pull_partial` / `take_partial`). A group handed over from
a dead generator or a resumed checkpoint (`GroupRequest.continued`) runs only its missing samples,
each continued from its latest partial unless that partial's oldest token is beyond the staleness
bound (then it starts over, counted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from cir_actors.config import Config
from cir_actors.scoring.scorer import training_reward
from cir_actors.types import (
    DropReason,
    FinishReason,
    GroupRequest,
    InfraFault,
    PartialTrajectory,
    PolicyUpdate,
    ScoredTrajectory,
    ServedPolicy,
    VerdictReason,
)

log = logging.getLogger(__name__)
# Per-step partial-trajectory counts (`step_times`): streamed, continued, and not continued by reason.
PARTIAL_COUNTS = ("partials_streamed", "partials_continued", "partials_stale", "partials_unreadable")


class RolloutWorker:
    def __init__(
        self,
        cfg: Config,
        model_path: str,
        name: str,
        interpreters: Any,
        scorers: list[Any],
        buffer: Any,
        scheduler: Any,
        initial_update: PolicyUpdate | None = None,
    ):
        from cir_actors.control.failures import ReplicatedInterpreter, ReplicatedScorer
        from cir_actors.generation.generator import Generator

        self._cfg = cfg
        self._name = name
        pools = list(interpreters) if isinstance(interpreters, list | tuple) else [interpreters]
        retries = cfg.recovery.call_retries
        self._interp = ReplicatedInterpreter(pools, retries=retries, timeout_s=cfg.recovery.interpreter_call_s)
        self._gen = Generator(cfg, model_path, self._interp, name=name)
        self._engine_processes: list[tuple[int, int]] = []  # see `health`
        self._scorer = ReplicatedScorer(list(scorers), retries=retries)
        self._buffer = buffer
        self._scheduler = scheduler
        self._initial_update = initial_update
        self._max_groups = max(1, cfg.generator.max_inflight_trajectories // cfg.generator.samples_per_prompt)
        self._inflight: set[asyncio.Task] = set()
        self._loop: asyncio.Task | None = None  # the run loop (`run`; `detach` cancels it)
        self._detached = False
        self._asking = False  # the run loop waits in the scheduler's `admit` (see `health`)
        self._loading: tuple[int, float] | None = None  # (version, since when) of a weight load under way
        self._active_trajectories = 0
        self._idle_since: float | None = time.monotonic()
        self._idle_s = 0.0
        self._started = time.monotonic()
        self._consecutive_failures = 0
        self._last_error: BaseException | None = None
        self._counts = {"trajectories": 0, "groups": 0, "failed_groups": 0, "infra_groups": 0, "sampled_tokens": 0,
                        "partials_streamed": 0, "continued_groups": 0, "partials_continued": 0,
                        "partials_stale": 0, "partials_unreadable": 0}
        self._metrics = None
        self._outbox: dict[str, ScoredTrajectory] = {}  # finished samples until the buffer takes them
        self._partial_outbox: dict[str, PartialTrajectory] = {}  # streamed partials until the buffer takes them
        # Where this generator's time went since the driver last asked (`step_times`): wall seconds
        # loading weights; trajectory-seconds generating, waiting for tools, waiting for a verdict.
        self._times = {"weight_load_s": 0.0, "generation_s": 0.0, "tool_wait_s": 0.0, "tool_exec_s": 0.0,
                       "scoring_s": 0.0}
        self._times_since = (time.monotonic(), 0.0)  # (when, idle_s then)
        self._partials_since = dict.fromkeys(PARTIAL_COUNTS, 0)

    # ---- what the scheduler and driver call ---------------------------------------------------
    async def update_weights(self, update: PolicyUpdate) -> ServedPolicy:
        t0 = time.monotonic()
        self._loading = (update.version, t0)
        try:
            served = await self._gen.update_weights(update)
        finally:
            self._loading = None
        self._times["weight_load_s"] += time.monotonic() - t0
        if self._metrics is not None:
            self._metrics.served_version(served.version)
            self._metrics.budget(served.budget)
        return served

    def node_id(self) -> str:
        """The Ray node this generator runs on (for the learner's shared-memory publication)."""
        from cir_actors.learning.shared_weights import local_node_id

        return local_node_id()

    def take(self, key: str) -> tuple[bool, ScoredTrajectory]:
        """The buffer takes a finished sample (called with two returns: a receipt the buffer reads,
        and the sample it keeps unread); both objects are owned by the buffer."""
        return True, self._outbox.pop(key)

    def take_partial(self, key: str) -> tuple[bool, PartialTrajectory]:
        """The buffer takes an unfinished sample's latest state (as `take`)."""
        return True, self._partial_outbox.pop(key)

    def served_policy(self) -> ServedPolicy:
        return self._gen.served_policy()

    def health(self) -> dict[str, Any]:
        """This actor's process id, the version it serves, its trajectories in flight, how long
        its engine process has produced nothing while something waited on it (`engine_silent_s`),
        and, for the driver to kill them with it, its node and the (pid, start time) of the
        processes it started (the vLLM engine core and workers)."""
        import os

        from cir_actors.ops.processes import descendants

        if not self._engine_processes:  # started with the engine, in the constructor: found once
            self._engine_processes = descendants(os.getpid())
        loading = None if self._loading is None else {"version": self._loading[0],
                                                      "for_s": round(time.monotonic() - self._loading[1], 1)}
        return {"pid": os.getpid(), "served_version": self._gen.served_version(), "loading": loading,
                "inflight_groups": len(self._inflight), "asking": self._asking,
                "inflight_trajectories": self._active_trajectories, "engine_silent_s": self._gen.engine_silent_s(),
                "node_id": self.node_id(), "engine_processes": self._engine_processes}

    def stats(self) -> dict[str, Any]:
        idle = self._idle_s + (time.monotonic() - self._idle_since if self._idle_since is not None else 0.0)
        return {**self._counts, "idle_s": idle, "uptime_s": time.monotonic() - self._started,
                "served_version": self._gen.served_version(),
                "interpreter_faults": self._interp.faults, "scorer_faults": self._scorer.faults}

    def step_times(self) -> dict[str, float]:
        """Seconds spent since the previous call (the driver calls it once per step, so these are
        per-step): `wall_s`, `idle_s` (no trajectory running), `weight_load_s` (wall), and the
        trajectory-seconds (summed over concurrent trajectories) of generation, tool wait, scoring; and
        the partial-trajectory counts of PARTIAL_COUNTS since then."""
        now, idle = time.monotonic(), self.stats()["idle_s"]
        since, idle_then = self._times_since
        out = {"wall_s": now - since, "idle_s": idle - idle_then, **self._times}
        out.update({k: float(self._counts[k] - self._partials_since[k]) for k in PARTIAL_COUNTS})
        self._partials_since = {k: self._counts[k] for k in PARTIAL_COUNTS}
        self._times_since = (now, idle)
        self._times = dict.fromkeys(self._times, 0.0)
        return out

    async def run(self) -> dict[str, Any]:
        """The loop: runs until the scheduler stops admitting and every group in flight is done, or
        until `detach` stops it (then its stats say `detached`)."""
        from cir_actors.ops import metrics

        if self._metrics is None:
            self._metrics = metrics.GeneratorMetrics(self._name)
        self._loop = loop = asyncio.create_task(self._run_loop())
        try:
            return await loop
        except asyncio.CancelledError:
            if self._detached:  # by `detach`, not by Ray cancelling this call
                return {**self.stats(), "detached": True}
            raise

    async def detach(self, timeout_s: float) -> dict[str, Any]:
        """The run's stateful roles (learner, buffer, scheduler) are restarting for a resume and
        keep this actor and its engine: stop the run loop, cancel every group in flight (their
        engine requests are aborted; the resumed checkpoint has their prompts), forget the samples
        the old buffer did not take, and serve version -1 until `attach`'s update (`Generator.retire`).
        Raises TimeoutError when that takes longer than `timeout_s` (the driver then restarts it)."""
        self._gen.retire()
        self._detached = True
        tasks = [t for t in (self._loop, *self._inflight) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            if pending:
                raise TimeoutError(f"{self._name}: {len(pending)} tasks did not end within {timeout_s:.0f} s of "
                                   "their cancellation")
        self._loop = None
        self._outbox.clear()
        self._partial_outbox.clear()
        self._consecutive_failures, self._last_error, self._asking = 0, None, False
        return self.stats()

    def attach(self, interpreters: list[Any], scorers: list[Any], buffer: Any, scheduler: Any,
               initial_update: PolicyUpdate | None) -> None:
        """After `detach`: work with the restarted interpreter pools, scorers, buffer and scheduler;
        `run` loads `initial_update` (the resumed learner's weights) first."""
        self._interp.replace(list(interpreters))
        self._scorer.replace(list(scorers))
        self._buffer, self._scheduler, self._initial_update = buffer, scheduler, initial_update
        self._detached = False
        self._times = dict.fromkeys(self._times, 0.0)
        self._times_since = (time.monotonic(), self.stats()["idle_s"])

    async def _run_loop(self) -> dict[str, Any]:
        if self._initial_update is not None:
            await self.update_weights(self._initial_update)
        while True:
            if self._consecutive_failures >= 3:  # not a passing fault: stop and surface it to the driver
                raise RuntimeError(f"{self._name}: 3 groups in a row failed") from self._last_error
            if len(self._inflight) >= self._max_groups:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            self._asking = True
            try:
                req = await self._scheduler.admit.remote(self._name, self._gen.served_version())
            finally:
                self._asking = False
            if req is None:
                if await self._scheduler.stopped.remote():
                    break
                continue
            task = asyncio.create_task(self._run_group(req))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        if self._inflight:
            await asyncio.wait(self._inflight)
        return self.stats()

    # ---- one group --------------------------------------------------------------------------
    async def _run_group(self, req: GroupRequest) -> None:
        indices, partials = list(range(req.n)), {}
        if req.continued:  # handed over: run the samples the buffer does not have, from their partials
            cont = await self._buffer.continuation.remote(req.group_id)
            indices = [] if cont["done"] else [i for i in indices if i not in set(cont["have"])]
            partials = cont["partials"]
            self._counts["continued_groups"] += 1
            log.info("%s: continuing group %d: %d samples in, %d partials", self._name, req.group_id,
                     len(cont["have"]), len(partials))
        results = await asyncio.gather(*(self._run_one(req, i, partials.get(i)) for i in indices),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        infra = [e for e in errors if isinstance(e, InfraFault)]
        if errors or not all(results):
            self._counts["failed_groups"] += 1
            reason = DropReason.INFRA if infra else DropReason.ABORTED
            if infra:
                self._counts["infra_groups"] += 1
                log.warning("%s: group %d dropped (infra): %s", self._name, req.group_id, infra[0])
            elif errors:  # not the infrastructure's: a bug or a broken engine; 3 in a row end the run
                self._consecutive_failures += 1
                self._last_error = errors[0]
                log.error("%s: group %d failed: %r", self._name, req.group_id, errors[0])
            # Ledger first (it stops the buffer from completing the group), then the buffer forgets it.
            await self._scheduler.group_failed.remote(req.group_id, reason)
            await self._buffer.discard_partial.remote(req.group_id, reason)
            return
        self._counts["groups"] += 1
        self._consecutive_failures = 0

    def _busy(self, delta: int) -> None:
        now = time.monotonic()
        if self._active_trajectories == 0 and delta > 0 and self._idle_since is not None:
            self._idle_s += now - self._idle_since
            self._idle_since = None
        self._active_trajectories += delta
        if self._active_trajectories == 0:
            self._idle_since = now

    def _self_handle(self) -> Any:
        import ray

        return ray.get_runtime_context().current_actor

    async def _resume_from(self, partial_ref: list[Any] | None) -> PartialTrajectory | None:
        """The partial to continue, or None to start over (none streamed, unreadable, or stale)."""
        if partial_ref is None:
            return None
        try:
            partial = await partial_ref[0]
        except Exception as e:  # noqa: BLE001 - its object is gone (e.g. its node left): start over, counted
            self._counts["partials_unreadable"] += 1
            log.warning("%s: a partial could not be read (%s); starting that sample over", self._name, type(e).__name__)
            return None
        oldest = partial.min_version()
        if 0 <= oldest < self._gen.served_version() - self._cfg.scheduler.max_staleness:
            self._counts["partials_stale"] += 1
            return None
        self._counts["partials_continued"] += 1
        return partial

    def _streamer(self, req: GroupRequest, index: int) -> Any:
        """The rollout's `on_partial`: hand each boundary's state to the buffer (None when off)."""
        if not self._cfg.generator.continue_partials:
            return None
        key = f"{req.group_id}/{index}/partial"

        async def stream(partial: PartialTrajectory) -> None:
            self._partial_outbox[key] = partial
            try:
                await self._buffer.pull_partial.remote(req.group_id, index, self._self_handle(), key,
                                                       partial.response_len, partial.min_version())
            finally:
                self._partial_outbox.pop(key, None)
            self._counts["partials_streamed"] += 1

        return stream

    async def _run_one(self, req: GroupRequest, index: int, partial_ref: list[Any] | None = None) -> bool:
        resume = await self._resume_from(partial_ref)
        self._busy(+1)
        try:
            traj = await self._gen.rollout(req.task, index, req.budget, resume=resume,
                                           on_partial=self._streamer(req, index))
        finally:
            self._busy(-1)
        if traj.finish_reason == FinishReason.ABORTED:
            return False
        t_score = time.monotonic()
        verdict = await self._scorer.score(traj.sampled_text, req.task.gold)
        self._times["scoring_s"] += time.monotonic() - t_score
        self._times["generation_s"] += traj.gen_time_s
        self._times["tool_wait_s"] += traj.interp_wait_s
        self._times["tool_exec_s"] += min(traj.interp_exec_s, traj.interp_wait_s)  # a cache hit replays old time
        reward = training_reward(self._cfg.scorer, verdict, truncated=traj.finish_reason == FinishReason.LENGTH)
        scored = ScoredTrajectory(trajectory=traj, verdict=verdict, reward=reward)
        key = f"{req.group_id}/{index}"
        self._outbox[key] = scored
        meta = {
            "correct": float(verdict.correct),
            "response_len": float(traj.response_len),
            "sampled_tokens": float(traj.num_sampled),
            "code_blocks": float(traj.num_code_blocks),
            "executed": float(traj.num_executed),
            "interp_errors": float(traj.num_interp_errors),
            "interp_timeouts": float(traj.num_interp_timeouts),
            "verdict_timeout": float(verdict.reason == VerdictReason.TIMEOUT),  # a genuine deadline (a crash is retried)
            "finish_" + str(traj.finish_reason): 1.0,
            "gen_time_s": traj.gen_time_s,
            "interp_wait_s": traj.interp_wait_s,
            "budget": float(traj.budget),
            "continued_tokens": float(traj.continued_tokens),
        }
        try:
            await self._buffer.pull.remote(
                req.group_id, req.n, req.admitted_version, index, self._self_handle(), key, reward,
                traj.min_version(), meta,
            )
        finally:
            self._outbox.pop(key, None)
        self._counts["trajectories"] += 1
        self._counts["sampled_tokens"] += traj.num_sampled
        if self._metrics is not None:
            self._metrics.trajectory(str(traj.finish_reason), traj.num_sampled, traj.gen_time_s + traj.interp_wait_s)
            self._metrics.inflight(self._active_trajectories)
        return True

    def shutdown(self) -> None:
        self._gen.shutdown()
