"""The replay buffer: references to scored trajectories, assembled into complete GRPO groups.

The trajectory data is never deserialized by this actor. It must survive the death of the
generator that produced it, so the buffer, not the generator, owns each object: the generator
announces a finished sample (`pull`) with the few numbers the buffer decides on (reward, oldest
sampling version, metrics), and the buffer calls back `source.take(key)`. The return value of an
actor call is owned by the caller, so the reference the buffer keeps lives as long as the buffer,
whatever happens to the generator. `take` returns two objects, a receipt and the sample: the buffer
reads only the receipt, and keeps the sample only if it came (a generator that dies between its
`pull` and the `take` leaves an error in both; kept, it would be a group lost at training time).
(Ray 2.56 removed `ray.put(..., _owner=)`, the other way to do this. Ray stores returns under
100 KiB inline in the owner's memory store: for small trajectories the bytes sit in this process's
memory, still never deserialized here; larger ones stay in the node's object store.)

A group is served once all n samples are in. At serve time, groups older than the staleness bound
(oldest token version < learner version - max_staleness) are dropped and counted, as are, when
configured, groups whose rewards are all equal (they carry no GRPO signal). Every group is in
exactly one place: partial, ready, served, or dropped; `stats()` adds them up.

The ledger: with the scheduler as `ledger`, every change of a group's place is reported to it
before it takes effect here (completion, drops), all under one lock, so that `snapshot()` and
`checkpoint_cut()` see the scheduler's ledger and this buffer at one instant: the conservation
identity can be checked exactly while generators run, and a checkpoint is a true cut (no group both
saved and re-queued, none in neither).

Partial trajectories: a generator also streams each unfinished sample at its segment boundaries
(`pull_partial`, owned here the same way). When a group goes on elsewhere — its generator died, or
the run resumed — the generator that takes it asks `continuation(group_id)`: which samples are
already in and the latest partial of each other one. A continued group may see a sample twice (the
dead generator's copy landed after the hand-over): one is kept, the other counted `duplicate`.

Checkpoints: `checkpoint_cut()` returns the ready groups' data (fetched from the object store only
then; or their references, which the driver fetches itself) with the scheduler's state of the same
instant; `restore()` puts both back. With
`continue_partials`, the in-flight groups' finished samples and partials are part of the cut
(`inflight`) and continue after the resume; without, they are not saved and their tasks re-queued.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cir_actors.types import DropReason, TrainBatch


@dataclass
class _Group:
    group_id: int
    n: int
    admitted_version: int
    refs: dict[int, Any] = field(default_factory=dict)  # sample_index -> ObjectRef
    rewards: dict[int, float] = field(default_factory=dict)
    min_versions: dict[int, int] = field(default_factory=dict)
    metas: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.refs) == self.n

    def min_version(self) -> int:
        versions = [v for v in self.min_versions.values() if v >= 0]
        return min(versions) if versions else self.admitted_version


@dataclass
class _Partial:
    """The latest streamed state of one unfinished sample."""

    ref: Any  # ObjectRef of a PartialTrajectory (or the object itself, restored from a checkpoint)
    response_len: int
    min_version: int


def actor_id(handle: Any) -> str:
    """An actor handle's id, the same in every process that holds a handle to that actor."""
    return handle._actor_id.hex()


class ReplayBuffer:
    """Plain Python; the system runs it as the async Ray actor named `buffer`."""

    def __init__(
        self, max_staleness: int, *, drop_zero_advantage: bool = False, max_groups: int = 1024, ledger: Any = None,
        continue_partials: bool = False, take_timeout_s: float = 300.0,
    ):
        self._ledger_handle = ledger  # the scheduler (an actor handle or, in tests, the object)
        self._continue_partials = continue_partials
        self._partials: dict[int, dict[int, _Partial]] = {}  # group -> sample index -> latest partial
        self._continued: set[int] = set()  # groups handed to another generator (duplicates possible)
        self._partials_streamed = 0
        self._takes_failed = 0  # samples whose producer died before handing them over (run again elsewhere)
        self._take_timeout_s = take_timeout_s
        self._unresponsive: dict[str, str] = {}  # producer's actor id -> what it did not hand over in time
        self._max_staleness = max_staleness
        self._drop_zero_adv = drop_zero_advantage
        self._max_groups = max_groups
        self._partial: dict[int, _Group] = {}
        self._ready: dict[int, _Group] = {}  # insertion order = completion order
        self._served_groups = 0
        self._served_trajectories = 0
        self._added_trajectories = 0
        self._dropped: Counter[str] = Counter()
        self._dropped_trajectories: Counter[str] = Counter()
        self._served_staleness: Counter[int] = Counter()
        self._closed: set[int] = set()  # groups served or dropped: a late sample would duplicate data
        self._changed: asyncio.Condition | None = None
        from cir_actors.ops.metrics import BufferMetrics

        self._metrics = BufferMetrics()

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _ledger(self, method: str, *args: Any) -> Any:
        """Report to the scheduler's ledger (None without one)."""
        if self._ledger_handle is None:
            return None
        fn = getattr(self._ledger_handle, method)
        if hasattr(fn, "remote"):
            return await fn.remote(*args)
        out = fn(*args)
        return await out if inspect.isawaitable(out) else out

    async def add(
        self,
        group_id: int,
        n: int,
        admitted_version: int,
        sample_index: int,
        ref: list[Any],
        reward: float,
        min_version: int,
        meta: dict[str, float] | None = None,
    ) -> bool:
        """Accept one sample of a group (`ref` is a one-element list holding the ObjectRef; `meta`
        a few numbers for the step's metrics, e.g. correct, response_len, num_executed).
        Returns True when this sample completed the group."""
        cond = self._condition()
        async with cond:
            if not 0 <= sample_index < n:
                raise ValueError(f"sample_index {sample_index} outside [0, {n})")
            closed = group_id in self._ready or group_id in self._closed
            twice = not closed and sample_index in getattr(self._partial.get(group_id), "refs", {})
            if (closed or twice) and group_id in self._continued:
                self._added_trajectories += 1  # the other copy of a continued sample: counted, not kept
                self._dropped_trajectories[DropReason.DUPLICATE] += 1
                return False
            if closed:
                raise ValueError(f"group {group_id} is already complete or closed; sample {sample_index} would duplicate it")
            if twice:
                raise ValueError(f"group {group_id} sample {sample_index} added twice")
            group = self._partial.setdefault(group_id, _Group(group_id, n, admitted_version))
            self._partials.get(group_id, {}).pop(sample_index, None)
            group.refs[sample_index] = ref[0]
            group.rewards[sample_index] = float(reward)
            group.min_versions[sample_index] = int(min_version)
            group.metas[sample_index] = dict(meta or {})
            self._added_trajectories += 1
            if not group.complete:
                self._metrics.depth(len(self._ready), len(self._partial))
                return False
            del self._partial[group_id]
            self._partials.pop(group_id, None)
            if await self._ledger("group_buffered", group_id) is False:
                # The scheduler had already given the group up (its generator was declared dead).
                self._closed.add(group_id)
                self._dropped_trajectories[DropReason.GENERATOR_LOST] += len(group.refs)
                return False
            self._ready[group_id] = group
            self._metrics.depth(len(self._ready), len(self._partial))
            cond.notify_all()
        return True

    async def pull(
        self,
        group_id: int,
        n: int,
        admitted_version: int,
        sample_index: int,
        source: Any,
        key: str,
        reward: float,
        min_version: int,
        meta: dict[str, float] | None = None,
    ) -> bool:
        """Take ownership of a finished sample held by `source` (an actor with `take(key)`), then
        `add` it. Returns once the object exists, so the producer may die afterwards; True when the
        sample completed its group (False also when the producer died before handing it over)."""
        ref = await self._take(source, "take", key)
        if ref is None:
            return False
        return await self.add(group_id, n, admitted_version, sample_index, [ref], reward, min_version, meta)

    async def pull_partial(
        self, group_id: int, sample_index: int, source: Any, key: str, response_len: int, min_version: int
    ) -> bool:
        """Take ownership of an unfinished sample's latest state held by `source` (an actor with
        `take_partial(key)`), then `add_partial` it. Returns whether it was kept."""
        if group_id in self._closed or group_id in self._ready:
            return False
        ref = await self._take(source, "take_partial", key)
        if ref is None:
            return False
        return await self.add_partial(group_id, sample_index, [ref], response_len, min_version)

    async def _take(self, source: Any, method: str, key: str) -> Any:
        """A reference, owned here, to what `source.method(key)` hands over; None when its actor died first
        (the sample is then not here, and whoever continues its group runs it again) or did not
        answer within the take deadline: then it is named in `unresponsive()`, and the driver
        restarts it like a dead one (its groups go on elsewhere, this sample among them)."""
        import ray.exceptions as rex

        receipt, ref = getattr(source, method).options(num_returns=2).remote(key)
        try:
            await asyncio.wait_for(receipt, timeout=self._take_timeout_s)
        except (rex.RayActorError, rex.ActorUnavailableError):
            self._takes_failed += 1
            return None
        except TimeoutError:
            self._takes_failed += 1
            self._unresponsive[actor_id(source)] = (
                f"did not hand over sample {key} to the buffer within {self._take_timeout_s:.0f} s")
            return None
        return ref

    def unresponsive(self) -> dict[str, str]:
        """Producers (by `actor_id`) that did not hand over a sample within the take deadline."""
        return dict(self._unresponsive)

    async def add_partial(self, group_id: int, sample_index: int, ref: list[Any], response_len: int,
                          min_version: int) -> bool:
        """Keep `ref[0]` as the sample's latest partial, unless the sample or its group is already
        done or a longer state of it is here. Returns whether it was kept."""
        async with self._condition():
            group = self._partial.get(group_id)
            if group_id in self._closed or group_id in self._ready or (group and sample_index in group.refs):
                return False
            held = self._partials.setdefault(group_id, {})
            if sample_index in held and held[sample_index].response_len > response_len:
                return False
            held[sample_index] = _Partial(ref[0], int(response_len), int(min_version))
            self._partials_streamed += 1
        return True

    def partials_held(self, group_ids: list[int]) -> int:
        """How many streamed partials this buffer holds for these groups."""
        return sum(len(self._partials.get(g, {})) for g in group_ids)

    def inflight_tokens(self, group_ids: list[int]) -> dict[str, int]:
        """Response tokens held for these in-flight groups: in finished samples and in partials
        (what a generator's death would throw away without continuation), and the oldest policy
        version in those partials (-1: none)."""
        finished = sum(int(m.get("response_len", 0)) for g in group_ids if g in self._partial
                       for m in self._partial[g].metas.values())
        held = [p for g in group_ids for p in self._partials.get(g, {}).values()]
        return {"finished_tokens": finished, "partial_tokens": sum(p.response_len for p in held),
                "oldest_partial_version": min((p.min_version for p in held), default=-1)}

    async def continuation(self, group_id: int) -> dict[str, Any]:
        """What a generator taking over an in-flight group needs: `have` (sample indices already
        here) and `partials` ({sample index: [ref to its latest PartialTrajectory]}); `done` when the
        group completed (the dead generator's last sample landed) or was dropped meanwhile."""
        async with self._condition():
            self._continued.add(group_id)
            if group_id in self._ready or group_id in self._closed:  # completed (or dropped) meanwhile
                return {"done": True, "have": [], "partials": {}}
            group = self._partial.get(group_id)
            have = sorted(group.refs) if group is not None else []
            held = self._partials.get(group_id, {})
            return {"done": False, "have": have,
                    "partials": {i: [p.ref] for i, p in sorted(held.items()) if i not in have}}

    def discard_partial(self, group_id: int, reason: str = DropReason.ABORTED) -> int:
        """Forget an incomplete group (its generator failed; the scheduler already dropped it from
        its ledger); returns how many samples it held (counted as dropped trajectories)."""
        self._closed.add(group_id)
        self._partials.pop(group_id, None)
        group = self._partial.pop(group_id, None)
        if group is None:
            return 0
        self._dropped_trajectories[str(reason)] += len(group.refs)
        return len(group.refs)

    def discard_groups(self, group_ids: list[int], reason: str) -> int:
        """`discard_partial` for several groups (a dead generator's); returns the samples dropped."""
        return sum(self.discard_partial(gid, reason) for gid in group_ids)

    def mark_lost(self, group_ids: list[int], trajectories: int) -> None:
        """Served groups whose objects were gone when the learner fetched them: not trained."""
        self._served_groups -= len(group_ids)
        self._served_trajectories -= trajectories
        self._dropped[DropReason.LOST] += len(group_ids)
        self._dropped_trajectories[DropReason.LOST] += trajectories

    def _take_servable(self, learner_version: int, num_groups: int) -> tuple[list[_Group], dict[str, list[_Group]]]:
        dropped: dict[str, list[_Group]] = {}
        # Oldest data first: it is the closest to the staleness bound.
        for gid in sorted(self._ready, key=lambda g: self._ready[g].min_version()):
            group = self._ready[gid]
            if group.min_version() < learner_version - self._max_staleness:
                del self._ready[gid]
                self._closed.add(gid)
                dropped.setdefault(DropReason.STALE, []).append(group)
            elif self._drop_zero_adv and len(set(group.rewards.values())) == 1:
                del self._ready[gid]
                self._closed.add(gid)
                dropped.setdefault(DropReason.ZERO_ADVANTAGE, []).append(group)
        if len(self._ready) < num_groups:
            return [], dropped
        chosen = sorted(self._ready.values(), key=lambda g: g.min_version())[:num_groups]
        for g in chosen:
            del self._ready[g.group_id]
            self._closed.add(g.group_id)
        return chosen, dropped

    async def get_batch(self, num_groups: int, learner_version: int, timeout_s: float = 1.0) -> TrainBatch | None:
        """`num_groups` complete, fresh-enough groups for the learner at `learner_version`, or None
        after timeout_s. Stale groups met on the way are dropped and reported in `dropped`."""
        cond = self._condition()
        all_dropped: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with cond:
            while True:
                chosen, dropped = self._take_servable(learner_version, num_groups)
                for reason, groups in dropped.items():
                    await self._ledger("groups_dropped", [g.group_id for g in groups], reason)
                    all_dropped[reason] += len(groups)
                    self._dropped[reason] += len(groups)
                    self._dropped_trajectories[reason] += sum(len(g.refs) for g in groups)
                if chosen:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None if not all_dropped else TrainBatch([], [], [], dict(all_dropped))
                try:
                    await asyncio.wait_for(cond.wait(), remaining)
                except TimeoutError:
                    pass
        self._served_groups += len(chosen)
        for g in chosen:
            self._served_trajectories += len(g.refs)
            self._served_staleness[learner_version - g.min_version()] += 1
            self._metrics.trained([learner_version - v for v in g.min_versions.values()])
        for reason, count in all_dropped.items():
            self._metrics.dropped(count, reason)
        self._metrics.depth(len(self._ready), len(self._partial))
        return TrainBatch(
            groups=[[g.refs[i] for i in range(g.n)] for g in chosen],
            group_ids=[g.group_id for g in chosen],
            admitted_versions=[g.admitted_version for g in chosen],
            dropped=dict(all_dropped),
            metas=[[{**g.metas.get(i, {}), "reward": g.rewards[i], "staleness": learner_version - g.min_versions[i]}
                    for i in range(g.n)] for g in chosen],
        )

    def stats(self) -> dict[str, Any]:
        return {
            "partial_groups": len(self._partial),
            "ready_groups": len(self._ready),
            "served_groups": self._served_groups,
            "served_trajectories": self._served_trajectories,
            "added_trajectories": self._added_trajectories,
            "dropped_groups": dict(self._dropped),
            "dropped_trajectories": dict(self._dropped_trajectories),
            "partial_trajectories": sum(len(g.refs) for g in self._partial.values()),
            "ready_trajectories": sum(len(g.refs) for g in self._ready.values()),
            "served_staleness": {str(k): v for k, v in sorted(self._served_staleness.items())},
            "partials_held": sum(len(h) for h in self._partials.values()),
            "partials_streamed": self._partials_streamed,
            "takes_failed": self._takes_failed,
            "takes_timed_out": len(self._unresponsive),
        }

    def trajectory_conservation(self) -> dict[str, Any]:
        """added = trained (served, not lost) + dropped (by reason) + partial + ready, for trajectories."""
        st = self.stats()
        out = {
            "added": st["added_trajectories"],
            "trained": st["served_trajectories"],
            "dropped": sum(st["dropped_trajectories"].values()),
            "dropped_by_reason": st["dropped_trajectories"],
            "partial": st["partial_trajectories"],
            "ready": st["ready_trajectories"],
        }
        out["ok"] = out["added"] == out["trained"] + out["dropped"] + out["partial"] + out["ready"]
        return out

    async def snapshot(self) -> dict[str, Any]:
        """The scheduler's ledger and this buffer at one instant (for the driver's conservation check)."""
        async with self._condition():
            ledger = await self._ledger("conservation")
            return {"groups": ledger, "trajectories": self.trajectory_conservation(), "buffer": self.stats()}

    async def checkpoint_cut(self, fetch: bool = True) -> dict[str, Any]:
        """A consistent cut: the scheduler's checkpoint state, the ready groups' data and (with
        `continue_partials`) the in-flight groups' finished samples and partials, at one instant
        (nothing completes or drops in between). With `fetch=False` the data stays references
        (`refs` of a group, `ref` of an item) for the caller to fetch under its own deadline and
        put in with `fill_cut`: the driver does, so that this call answers at once and a buffer
        stopped mid-checkpoint is found within `recovery.call_timeout_s`."""
        async with self._condition():
            scheduler = await self._ledger("checkpoint_state")
            groups = self.checkpoint_groups_refs()
            inflight = self._inflight_refs(scheduler.get("inflight", [])) if self._continue_partials else []
            lost_partials = 0 if self._continue_partials else sum(len(g.refs) for g in self._partial.values())
            counters = {
                "served_groups": self._served_groups,
                "served_trajectories": self._served_trajectories,
                "added_trajectories": self._added_trajectories,
                "dropped": dict(self._dropped),
                # without continuation, partial groups are not saved: their samples are regenerated
                "dropped_trajectories": dict(self._dropped_trajectories + Counter({DropReason.RESUMED: lost_partials})),
                "served_staleness": {str(k): v for k, v in self._served_staleness.items()},
            }
            cut = {"scheduler": scheduler, "groups": groups, "inflight": inflight, "counters": counters}
            if fetch:
                fill_cut(cut, await asyncio.to_thread(_ray_get, cut_refs(cut), 300.0))
            return cut

    def _inflight_refs(self, inflight: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The scheduler's in-flight groups with references to what this buffer holds of each."""
        out = []
        for req in inflight:
            gid = int(req["group_id"])
            group = self._partial.get(gid)
            finished = [] if group is None else [
                {"index": i, "ref": group.refs[i], "reward": group.rewards[i], "min_version": group.min_versions[i],
                 "meta": group.metas.get(i, {})} for i in sorted(group.refs)]
            partials = [{"index": i, "ref": p.ref} for i, p in sorted(self._partials.get(gid, {}).items())]
            out.append({"group_id": gid, "n": int(req["n"]), "admitted_version": int(req["admitted_version"]),
                        "finished": finished, "partials": partials})
        return out

    @staticmethod
    def _put(obj: Any) -> Any:
        """Into the object store, owned by this actor (a seam for in-process tests)."""
        import ray

        return ray.put(obj)

    def restore_inflight(self, groups: list[dict[str, Any]]) -> None:
        """Put back in-flight groups saved by `checkpoint_cut` (data decoded): their finished samples
        and partials, for the generators that continue them."""
        for d in groups:
            gid = int(d["group_id"])
            if d["finished"]:
                g = self._partial.setdefault(gid, _Group(gid, int(d["n"]), int(d["admitted_version"])))
                for s in d["finished"]:
                    i = int(s["index"])
                    g.refs[i] = self._put(s["data"])
                    g.rewards[i], g.min_versions[i], g.metas[i] = float(s["reward"]), int(s["min_version"]), s["meta"]
            for p in d["partials"]:
                part = p["data"]
                self._partials.setdefault(gid, {})[int(p["index"])] = _Partial(
                    self._put(part), part.response_len, part.min_version())
            self._continued.add(gid)

    def restore_counters(self, counters: dict[str, Any]) -> None:
        """Counters of the run before a resume, so the conservation identities hold across resumes."""
        self._served_groups = int(counters["served_groups"])
        self._served_trajectories = int(counters["served_trajectories"])
        self._added_trajectories = int(counters["added_trajectories"])
        self._dropped = Counter(counters["dropped"])
        self._dropped_trajectories = Counter(counters["dropped_trajectories"])
        self._served_staleness = Counter({int(k): int(v) for k, v in counters.get("served_staleness", {}).items()})

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint_groups_refs(self) -> list[dict[str, Any]]:
        """The ready groups with references to their samples (`refs`), for a checkpoint."""
        return [
            {
                "group_id": g.group_id,
                "n": g.n,
                "admitted_version": g.admitted_version,
                "refs": [g.refs[i] for i in range(g.n)],
                "rewards": [g.rewards[i] for i in range(g.n)],
                "min_versions": [g.min_versions[i] for i in range(g.n)],
                "metas": [g.metas.get(i, {}) for i in range(g.n)],
            }
            for g in self._ready.values()
        ]

    def restore_groups(self, groups: list[dict[str, Any]]) -> None:
        import ray

        for d in groups:
            g = _Group(d["group_id"], d["n"], d["admitted_version"])
            for i, sample in enumerate(d["samples"]):
                g.refs[i] = ray.put(sample)  # owned by this actor
                g.rewards[i] = d["rewards"][i]
                g.min_versions[i] = d["min_versions"][i]
                g.metas[i] = d.get("metas", [{}] * g.n)[i]
            self._ready[g.group_id] = g


def cut_refs(cut: dict[str, Any]) -> list[Any]:
    """The object references of a cut taken with `fetch=False`, in the order `fill_cut` takes their
    data (restored partials are held as plain objects, as in-process tests hold everything: skipped)."""
    import ray

    refs = [r for g in cut["groups"] for r in g["refs"]]
    refs += [item["ref"] for g in cut["inflight"] for item in g["finished"] + g["partials"]]
    return [r for r in refs if isinstance(r, ray.ObjectRef)]


def fill_cut(cut: dict[str, Any], fetched: list[Any]) -> dict[str, Any]:
    """Put the data of `cut_refs(cut)` (`fetched`, in that order) into the cut in place of the references."""
    import ray

    data = iter(fetched)

    def resolve(r: Any) -> Any:
        return next(data) if isinstance(r, ray.ObjectRef) else r

    for g in cut["groups"]:
        g["samples"] = [resolve(r) for r in g.pop("refs")]
    for g in cut["inflight"]:
        for item in g["finished"] + g["partials"]:
            item["data"] = resolve(item.pop("ref"))
    return cut


def _ray_get(refs: list[Any], timeout: float) -> list[Any]:
    import ray

    return ray.get(refs, timeout=timeout) if refs else []
