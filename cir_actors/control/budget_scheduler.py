"""The budget scheduler: the one source of truth for the policy version, the tool-call budget and
admission of prompt groups.

- Version: the number of learner steps whose weights have been published. `advance(update)` moves
  it, looks up the tool-call budget for the new version in `scheduler.budget_schedule`, and pushes
  one `PolicyUpdate` {version, weights, budget} to every registered generator, so a generator never
  serves new weights with an old budget or the reverse.
- Admission (AReaL's rule): a generator may start a new group only while
  admitted - released <= (version + max_staleness + 1) * prompts_per_step, where `released` counts
  groups that left the system without being trained (dropped, failed). So nothing is generated only
  to be thrown away, and max_staleness = 0 is synchronous on-policy training through the same code.
  A generator that still serves an older version is not admitted until it has loaded the new one.
- The data-loader position (`TaskStream`) lives here, so a checkpoint of the scheduler plus the
  buffer's complete groups resumes with nothing lost and nothing repeated: groups in flight at the
  checkpoint are re-queued.

What it does not do: move trajectories (they travel generator -> scorer -> buffer by reference) or
judge staleness of finished data (the buffer does, at the moment it serves the learner).
The clock is injected so the logic is tested under plain pytest.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cir_actors.config import Config
from cir_actors.types import DropReason, GroupRequest, PolicyUpdate, Task, replace


class TaskStream:
    """An endless, deterministic stream of tasks: epoch by epoch, shuffled from (seed, epoch).

    `position()` / `restore()` make it checkpointable; re-queued tasks (from groups lost in flight)
    are served before new ones.
    """

    def __init__(self, tasks: list[Task], *, seed: int = 0, shuffle: bool = True):
        if not tasks:
            raise ValueError("TaskStream needs at least one task")
        self._tasks = tasks
        self._seed = seed
        self._shuffle = shuffle
        self._epoch = 0
        self._index = 0
        self._requeued: list[int] = []  # task indices
        self._order = self._order_for(0)
        self._by_id = {t.task_id: i for i, t in enumerate(tasks)}

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self._tasks)))
        if self._shuffle:
            random.Random(self._seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> Task:
        if self._requeued:
            return self._tasks[self._requeued.pop(0)]
        if self._index >= len(self._order):
            self._epoch += 1
            self._index = 0
            self._order = self._order_for(self._epoch)
        task = self._tasks[self._order[self._index]]
        self._index += 1
        return task

    def task(self, task_id: str) -> Task:
        return self._tasks[self._by_id[task_id]]

    def requeue(self, task: Task) -> None:
        self._requeued.append(self._by_id[task.task_id])

    @property
    def epoch(self) -> int:
        return self._epoch

    def position(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "index": self._index, "requeued": list(self._requeued)}

    def restore(self, pos: dict[str, Any]) -> None:
        self._epoch, self._index = int(pos["epoch"]), int(pos["index"])
        self._order = self._order_for(self._epoch)
        self._requeued = [int(i) for i in pos["requeued"]]


@dataclass
class _Counts:
    admitted: int = 0  # groups handed to generators, ever (including before a resume)
    completed: int = 0  # groups whose n samples all reached the buffer
    trained: int = 0  # groups the learner trained on
    dropped: Counter[str] = field(default_factory=Counter)  # groups that left untrained, by DropReason
    by_generator: dict[str, int] = field(default_factory=dict)

    @property
    def released(self) -> int:
        return sum(self.dropped.values())


def data_key(cfg: Config) -> dict[str, Any]:
    """What a resumed run's data must match (file, seed, order, kinds): a different data config
    would make the saved loader position point at other prompts."""
    return {k: v for k, v in cfg.data.model_dump(mode="json").items() if k != "num_cpus"}


class BudgetScheduler:
    """Plain Python; the system runs it as the async Ray actor named `scheduler`.

    It also keeps the run's ledger of groups: each admitted group is in exactly one of in flight,
    buffered (complete in the buffer), trained or dropped (by reason). The buffer reports completion
    and its drops here before acting on them, the driver reports training and lost objects, so
    `conservation()` is exact at any instant.
    """

    def __init__(
        self,
        cfg: Config,
        tasks: list[Task],
        *,
        initial_update: PolicyUpdate | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._cfg = cfg
        self._batch = cfg.learner.prompts_per_step
        from cir_actors.control.sampling import roc_group_size

        self._n = roc_group_size(cfg.generator.samples_per_prompt, cfg.scheduler.roc, cfg.scheduler.roc_oversample)
        self._max_staleness = cfg.scheduler.max_staleness
        self._total_steps = cfg.scheduler.total_steps
        self._stream = TaskStream(tasks, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self._clock = clock
        self._version = 0
        self._update = initial_update or PolicyUpdate(version=0, budget=cfg.scheduler.budget_at(0))
        self._update = PolicyUpdate(**{**self._update.__dict__, "budget": cfg.scheduler.budget_at(self._update.version)})
        self._version = self._update.version
        self._counts = _Counts()
        self._inflight: dict[int, tuple[GroupRequest, str]] = {}  # group -> (request, generator or "")
        self._continue = cfg.generator.continue_partials
        self._orphans: list[int] = []  # in-flight groups without a generator: the next one admitted continues them
        self._continued_groups = 0
        self._buffered: set[int] = set()
        self._next_group_id = 0
        self._generators: dict[str, Any] = {}  # name -> handle with update_weights(update)
        self._verified: dict[str, bool] = {}  # name -> echoed the fingerprint of what it was last sent
        self._served: dict[str, dict[str, Any]] = {}  # name -> what it reported after its last update
        self._push_failures: dict[str, str] = {}  # name -> the sentence the driver ends the run with
        self._broadcast_failed: dict[str, str] = {}  # name -> why it did not receive the current broadcast
        self._dead: set[str] = set()  # generators whose actor died (the driver restarts them)
        self._pushes: set[asyncio.Task] = set()
        self._waiting: dict[str, float] = {}  # generator -> since when it waits for admission
        self._asked: set[str] = set()  # generators that asked for work since registered: past start-up
        self._wait_s: dict[str, float] = {}  # accumulated admission wait per generator
        self._stopped = False
        self._changed: asyncio.Condition | None = None
        from cir_actors.ops.metrics import SchedulerMetrics

        self._metrics = SchedulerMetrics()
        from cir_actors.control.sampling import ZeroVarianceRate

        buf = cfg.buffer
        self._zero_var = ZeroVarianceRate(buf.zero_variance_ema, buf.max_oversample) if buf.dynamic_sampling else None

    # ---- admission -------------------------------------------------------------------------
    def capacity(self) -> int:
        """Groups that may still be admitted at the current version."""
        live = self._counts.admitted - self._counts.released
        return (self._version + self._max_staleness + 1) * self._batch + self._oversample() - live

    def _oversample(self) -> int:
        """Dynamic sampling's headroom: the staleness window's groups scaled by 1 / (1 - zero-variance rate)."""
        return self._zero_var.extra_groups((self._max_staleness + 1) * self._batch) if self._zero_var else 0

    async def batch_inspected(self, served: int, dropped: dict[str, int]) -> None:
        """The buffer served `served` groups and dropped `dropped` (by reason) on the way: measure the
        zero-variance rate (dynamic sampling) and wake generators if the headroom grew."""
        if self._zero_var is not None:
            zero = int(dropped.get(DropReason.ZERO_ADVANTAGE, 0))
            self._zero_var.observe(served + zero, zero)
            self._metrics.sampling(self._zero_var.rate, self._zero_var.factor())
            await self._notify()

    def try_admit(self, generator: str, served_version: int) -> GroupRequest | None:
        """A new group for `generator`, or None (at capacity, generator behind or not yet verified,
        stopped, or all steps' data admitted)."""
        if self._stopped or served_version < self._version:
            return None
        if not self._verified.get(generator, True) or generator in self._dead:
            return None
        if self._orphans:  # already admitted and counted: continued first, outside the capacity
            gid = self._orphans.pop(0)
            req, _ = self._inflight[gid]
            self._inflight[gid] = (req, generator)
            self._continued_groups += 1
            self._export()
            return req
        if self.capacity() <= 0:
            return None
        if self._counts.admitted - self._counts.released >= self._total_steps * self._batch + self._oversample():
            return None  # every group the run will train on has been admitted
        task = self._stream.next()
        req = GroupRequest(
            group_id=self._next_group_id,
            task=task,
            n=self._n,
            budget=self._update.budget,
            admitted_version=self._version,
        )
        self._next_group_id += 1
        self._counts.admitted += 1
        self._counts.by_generator[generator] = self._counts.by_generator.get(generator, 0) + 1
        self._inflight[req.group_id] = (req, generator)
        self._metrics.admitted()
        self._export()
        return req

    def _export(self) -> None:
        self._metrics.state(self._version, self._update.budget, len(self._inflight), len(self._waiting))

    async def admit(self, generator: str, served_version: int, timeout_s: float = 1.0) -> GroupRequest | None:
        """Wait (up to timeout_s) for admission; None means ask again (or stop, see `stopped`)."""
        cond = self._condition()
        start = self._clock()
        self._waiting.setdefault(generator, start)
        self._asked.add(generator)
        try:
            async with cond:
                req = self.try_admit(generator, served_version)
                if req is None and not self._stopped:
                    try:
                        await asyncio.wait_for(
                            cond.wait_for(lambda: self._stopped or self._admissible(generator, served_version)),
                            timeout_s,
                        )
                    except TimeoutError:
                        return None
                    req = self.try_admit(generator, served_version)
                return req
        finally:
            self._wait_s[generator] = self._wait_s.get(generator, 0.0) + self._clock() - self._waiting.pop(generator)

    def _admissible(self, generator: str, served_version: int) -> bool:
        return (served_version >= self._version and (self.capacity() > 0 or bool(self._orphans))
                and self._verified.get(generator, True) and generator not in self._dead)

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    # ---- the ledger: group lifecycle -------------------------------------------------------
    def group_buffered(self, group_id: int) -> bool:
        """The buffer completed the group (all n samples in). False: the group had already left
        (its generator was declared dead and its prompt re-admitted), so the buffer must discard it."""
        entry = self._inflight.pop(group_id, None)
        if entry is None:
            return False
        if group_id in self._orphans:  # the dead generator's last sample completed it
            self._orphans.remove(group_id)
        self._buffered.add(group_id)
        self._counts.completed += 1
        self._export()
        return True

    async def group_completed(self, group_id: int) -> None:
        """All n samples reached the buffer (a buffer without a ledger; see `group_buffered`)."""
        self.group_buffered(group_id)

    def groups_trained(self, group_ids: list[int]) -> None:
        """The learner trained on these buffered groups."""
        for gid in group_ids:
            if gid not in self._buffered:
                raise ValueError(f"group {gid} trained but not buffered (trained twice, or never completed)")
            self._buffered.discard(gid)
            self._counts.trained += 1

    async def groups_dropped(self, group_ids: list[int], reason: str, requeue: bool = False) -> int:
        """Groups that leave untrained (buffered or in flight): counted by `reason`; with `requeue`
        their prompts are admitted again. Returns how many were still here to drop."""
        n = 0
        for gid in group_ids:
            if gid in self._buffered:
                self._buffered.discard(gid)
            elif gid in self._inflight:
                req, _ = self._inflight.pop(gid)
                if gid in self._orphans:
                    self._orphans.remove(gid)
                if requeue:
                    self._stream.requeue(req.task)
            else:
                continue
            self._counts.dropped[str(reason)] += 1
            n += 1
        if n:
            await self._notify()
        self._export()
        return n

    async def group_failed(self, group_id: int, reason: str = DropReason.ABORTED) -> None:
        """A group was lost in flight (an infrastructure fault, an engine error): re-queue its task."""
        await self.groups_dropped([group_id], reason, requeue=True)

    async def groups_released(self, count: int) -> None:
        """A buffer without a ledger dropped `count` complete groups: free their slots."""
        self._counts.dropped["released"] += count
        await self._notify()

    def asked(self) -> list[str]:
        """The generators that have asked for work since they were registered: their run loop is
        going, so their engine has started (the driver judges their health checks from then)."""
        return sorted(self._asked)

    def inflight_of(self, generator: str) -> list[int]:
        return [gid for gid, (_, g) in self._inflight.items() if g == generator]

    async def fail_generator(self, generator: str) -> list[int]:
        """The generator died: its in-flight groups are handed to the next generators that ask
        (`generator.continue_partials`: they continue the buffer's samples and partials) or dropped
        (reason generator_lost) with their prompts re-queued; the generator is admitted again only
        once registered anew and verified. Returns the group ids."""
        self._dead.add(generator)
        self._asked.discard(generator)
        self._verified[generator] = False
        lost = self.inflight_of(generator)
        if self._continue:
            for gid in lost:
                req, _ = self._inflight[gid]
                self._inflight[gid] = (replace(req, continued=True), "")
                self._orphans.append(gid)
            self._export()
            await self._notify()
        else:
            await self.groups_dropped(lost, DropReason.GENERATOR_LOST, requeue=True)
        return lost

    def conservation(self) -> dict[str, Any]:
        """admitted = trained + dropped (by reason) + in flight + buffered, for groups; `ok` says it holds."""
        c = self._counts
        out = {
            "admitted": c.admitted,
            "trained": c.trained,
            "dropped": sum(c.dropped.values()),
            "dropped_by_reason": dict(c.dropped),
            "inflight": len(self._inflight),
            "buffered": len(self._buffered),
        }
        out["ok"] = out["admitted"] == out["trained"] + out["dropped"] + out["inflight"] + out["buffered"]
        return out

    # ---- versions and budget ---------------------------------------------------------------
    async def register_generator(self, name: str, handle: Any, update: PolicyUpdate | None = None) -> None:
        """Register a generator. With `update` (a restarted generator: the current version's weights),
        push it and admit the generator only after it echoed the fingerprint."""
        self._generators[name] = handle
        self._dead.discard(name)
        self._asked.discard(name)
        self._push_failures.pop(name, None)
        if update is None:
            self._verified.setdefault(name, True)
            return
        self._verified[name] = False
        self._served.pop(name, None)  # the dead incarnation's report says nothing of the new one
        self._spawn_push(name, handle, update)

    def _spawn_push(self, name: str, handle: Any, update: PolicyUpdate) -> None:
        task = asyncio.create_task(self._push(name, handle, update))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    async def advance(self, update: PolicyUpdate) -> PolicyUpdate:
        """A new learner version is published: attach its budget and push it to every generator."""
        if update.version <= self._version:
            raise ValueError(f"version must increase: have {self._version}, got {update.version}")
        self._version = update.version
        self._update = PolicyUpdate(**{**update.__dict__, "budget": self._cfg.scheduler.budget_at(update.version)})
        self._broadcast_failed.clear()  # about an older version; the new one reaches them or fails anew
        for name, handle in self._generators.items():
            if name not in self._dead:
                # Not awaited here (the learner goes on); the generator is not admitted until it has loaded.
                self._spawn_push(name, handle, self._update)
        self._export()
        await self._notify()
        return self._update

    async def _push(self, name: str, handle: Any, update: PolicyUpdate) -> None:
        """Send `update` to one generator, retried (recovery.push_retries) on a transient error or a
        fingerprint mismatch; a dead generator is left to the driver; anything else that persists is
        recorded in `push_failures()` as the sentence the driver ends the run with."""
        rcfg = self._cfg.recovery
        problem = ""
        for attempt in range(rcfg.push_retries + 1):
            if self._generators.get(name) is not handle or update.version < self._version or (
                    update.broadcast_group and update.broadcast_group != self._update.broadcast_group):
                return  # superseded: a newer version, a new incarnation or a republication has its own push
            try:
                served = await asyncio.wait_for(_await(handle.update_weights.remote(update)), rcfg.push_timeout_s)
            except Exception as e:  # noqa: BLE001 - sorted below
                import ray.exceptions as rex

                if isinstance(e, rex.RayActorError | rex.ActorUnavailableError):
                    self._served[name] = {"version": None, "error": f"{type(e).__name__}: generator died"}
                    self._dead.add(name)
                    await self._notify()
                    return  # the driver restarts it
                kind = "timed out" if isinstance(e, TimeoutError) else f"failed ({type(e).__name__}: {e})"
                problem = f"{kind}; received fingerprint none"
            else:
                if served.version > update.version:
                    return  # superseded: the generator loaded a newer version first, whose push reports
                self._served[name] = {"version": served.version, "budget": served.budget, "checksum": served.checksum,
                                      "expected_checksum": update.checksum, "error": None}
                if not update.checksum or served.checksum == update.checksum:
                    if update.version >= self._version:
                        self._verified[name] = True
                    await self._notify()
                    return
                problem = f"fingerprint mismatch: received {served.checksum or 'none'}"
            if update.broadcast_group and (update.broadcast_group != self._update.broadcast_group
                                           or update.version < self._version):
                return  # superseded while it failed: the republication's push reports for it
            self._served[name] = {"version": None, "error": problem, "expected_checksum": update.checksum}
            if update.broadcast_group:
                # One member cannot retry a collective: the driver publishes this version again
                # another way (`broadcast_failures`, `republish`). Not admitted until then.
                self._verified[name] = False
                self._broadcast_failed[name] = f"broadcast of version {update.version} {problem}"
                await self._notify()
                return
            if attempt < rcfg.push_retries:
                await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
        self._verified[name] = False
        self._push_failures[name] = (
            f"weight push to {name} failed after {rcfg.push_retries + 1} attempts: version {update.version}, "
            f"expected fingerprint {update.checksum or 'none'}, {problem}"
        )
        await self._notify()

    def push_failures(self) -> dict[str, str]:
        return dict(self._push_failures)

    def broadcast_failures(self) -> dict[str, str]:
        """Generators that did not receive the current version's broadcast, and why."""
        return dict(self._broadcast_failed)

    async def republish(self, update: PolicyUpdate, skip: Sequence[str] = ()) -> PolicyUpdate:
        """The current version's broadcast failed: `update` carries the same version another way
        (the object store); push it to every live generator but `skip` (one that was just sent it),
        superseding the broadcast's pushes."""
        if update.version != self._version:
            raise ValueError(f"republish of version {update.version}, the current version is {self._version}")
        self._update = PolicyUpdate(**{**update.__dict__, "budget": self._cfg.scheduler.budget_at(update.version)})
        self._broadcast_failed.clear()
        for name, handle in self._generators.items():
            if name not in self._dead and name not in skip:
                self._spawn_push(name, handle, self._update)
        await self._notify()
        return self._update

    def dead_generators(self) -> list[str]:
        return sorted(self._dead)

    def current_update(self) -> PolicyUpdate:
        return self._update

    async def stop(self) -> None:
        self._stopped = True
        await self._notify()

    def stopped(self) -> bool:
        return self._stopped

    # ---- observability and checkpoints -----------------------------------------------------
    def state(self) -> dict[str, Any]:
        c = self._counts
        return {
            "version": self._version,
            "budget": self._update.budget,
            "epoch": self._stream.epoch,
            "inflight_groups": len(self._inflight),
            "orphan_groups": len(self._orphans),
            "continued_groups": self._continued_groups,
            "buffered_groups": len(self._buffered),
            "capacity": self.capacity(),
            "waiting_generators": len(self._waiting),
            "admitted_groups": c.admitted,
            "completed_groups": c.completed,
            "trained_groups": c.trained,
            "failed_groups": sum(v for k, v in c.dropped.items()
                                 if k in (DropReason.ABORTED, DropReason.INFRA, DropReason.GENERATOR_LOST)),
            "released_groups": c.released,
            "dropped_groups": dict(c.dropped),
            "admitted_by_generator": dict(c.by_generator),
            "admission_wait_s": dict(self._wait_s),
            **(self._zero_var.state() if self._zero_var else {}),
            "served": {k: dict(v) for k, v in self._served.items()},
            "verified": dict(self._verified),
            "dead_generators": sorted(self._dead),
            "push_failures": dict(self._push_failures),
            "broadcast_failures": dict(self._broadcast_failed),
        }

    async def wait_served(self, version: int, timeout_s: float = 120.0) -> dict[str, dict[str, Any]]:
        """Wait until every generator reports serving `version` (or an error); returns the reports."""
        cond = self._condition()

        def done() -> bool:
            return all(
                self._served.get(n, {}).get("error") or (self._served.get(n, {}).get("version") or -1) >= version
                for n in self._generators
            )

        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(done), timeout_s)
            except TimeoutError:
                pass
        return {k: dict(v) for k, v in self._served.items()}

    def checkpoint_state(self) -> dict[str, Any]:
        """The scheduler's half of a consistent cut (the buffer calls it while holding its own state
        still): loader position with in-flight groups re-queued (they are regenerated after a resume
        and counted as dropped `resumed`), the ledger's counts and the buffered group ids."""
        pos = self._stream.position()
        c = self._counts
        dropped = Counter(c.dropped)
        inflight = []
        if self._continue:  # continued after the resume (the buffer saves their samples and partials)
            inflight = [{"group_id": r.group_id, "task_id": r.task.task_id, "n": r.n, "budget": r.budget,
                         "admitted_version": r.admitted_version} for r, _ in self._inflight.values()]
        else:  # regenerated after the resume
            inflight_ids = [self._stream._by_id[req.task.task_id] for req, _ in self._inflight.values()]
            pos["requeued"] = inflight_ids + pos["requeued"]
            dropped[DropReason.RESUMED] += len(self._inflight)
        return {
            "version": self._version,
            "stream": pos,
            "next_group_id": self._next_group_id,
            "admitted": c.admitted,
            "completed": c.completed,
            "trained": c.trained,
            "dropped": dict(dropped),
            "buffered": sorted(self._buffered),
            "inflight": inflight,
            "by_generator": dict(c.by_generator),
            "data": data_key(self._cfg),
            **({"zero_variance": self._zero_var.state()} if self._zero_var else {}),
        }

    def restore(self, state: dict[str, Any], update: PolicyUpdate) -> None:
        saved, now = state.get("data"), data_key(self._cfg)
        if saved is not None and saved != now:
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ValueError(
                f"cannot resume: the checkpoint was written with a different data config "
                f"({', '.join('data.' + k for k in changed)}); use a new logging.run_dir or the original data"
            )
        self._stream.restore(state["stream"])
        self._next_group_id = int(state["next_group_id"])
        self._counts = _Counts(
            admitted=int(state["admitted"]),
            completed=int(state["completed"]),
            trained=int(state.get("trained", 0)),
            dropped=Counter({str(k): int(v) for k, v in state.get("dropped", {}).items()}),
            by_generator=dict(state.get("by_generator", {})),
        )
        self._buffered = {int(g) for g in state.get("buffered", [])}
        if self._zero_var is not None and "zero_variance" in state:
            self._zero_var.restore(state["zero_variance"])
        self._inflight.clear()
        self._orphans.clear()
        for r in state.get("inflight", []):
            task = self._stream.task(r["task_id"])
            req = GroupRequest(int(r["group_id"]), task, int(r["n"]), int(r["budget"]), int(r["admitted_version"]),
                               continued=True)
            self._inflight[req.group_id] = (req, "")
            self._orphans.append(req.group_id)
        self._version = update.version
        self._update = PolicyUpdate(**{**update.__dict__, "budget": self._cfg.scheduler.budget_at(update.version)})


async def _await(ref: Any) -> Any:
    return await ref
