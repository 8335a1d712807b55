"""The learner: DeepSpeed data-parallel ranks, one Ray actor each, and the driver-side facade.

`LearnerRank` (in `learning/learner_rank.py`, re-exported here) is plain Python (Ray is applied in
`Learner.__init__`): it holds one DeepSpeed engine (ZeRO 2 by default, 0/1/3 by config; a client
torch AdamW, because DeepSpeed's own CPU Adam takes minutes to compile) in one torch.distributed
world (gloo on CPU, nccl on GPU). Ranks are placed by Ray's scheduler as ordinary actors (no
placement group), which is right for one node; a multi-node GPU learner wants them packed.

A training step, for a batch of complete GRPO groups:
1. The driver shards groups over ranks (whole groups; round-robin inside each optimizer
   mini-batch) and passes *references*: each rank `ray.get`s only its own trajectories.
2. Advantages: every rank all-gathers the rewards of the whole batch (a few floats per sample)
   and runs the same `compute_advantages` on them, so GRPO's group statistics and the batch
   whitening of REINFORCE++-baseline are those of the full batch whatever the sharding. (Groups
   go to ranks round-robin, not by token count: the driver never sees the trajectories.)
3. Samples with advantage exactly 0 (their groups' rewards were all equal) are not run when no
   KL term, and no entropy bonus over all groups (`learner.entropy_groups`), is configured: their
   policy-gradient term is exactly zero. They are not in
   the token-mean denominator either (as if the buffer had dropped those groups, DAPO-style).
4. Proximal log-probs (the weights at the start of the step) are computed once per step, no grad.
   With a single optimizer update per step they are the first forward's own values, detached
   (same weights, same numbers), which saves a forward pass.
5. Per mini-batch: micro-batches by token count (packed: real tokens <= micro_batch_tokens in one
   row; `learner.packing: false`: padded length x rows <= micro_batch_tokens);
   every rank runs the same number of micro-batches (an empty one pads a short rank; ZeRO-2/3
   communicate inside each backward); the loss is normalised by the mini-batch's masked tokens
   summed over all ranks, times the world size (DeepSpeed averages gradients over ranks), so
   sharding and micro-batching do not change the update. Then one optimizer step.
Token alignment: the logits at position t predict token t+1, so `loss.token_logprobs` shifts them;
its column t lines up with a trajectory's `logprobs_T[t]` and `loss_mask_T[t]`.

Publishing (`Learner.publish`) takes full weights under every ZeRO stage (ZeRO-3 parameters are
gathered one at a time) under their Hugging Face names, in the configured model dtype, either into
the object store (rank 0 puts one state dict), through `weight_sync.BroadcastSender` on rank 0, or
into rank 0's shared-memory region (`shared_weights.SharedWeightsWriter`) for the generators on its
node, with the object store as well for any generator elsewhere (`receiver_nodes`).
Checkpoints (`save_checkpoint`): an HF model directory (loads in transformers and vLLM), DeepSpeed's
module + optimizer state per rank, each rank's RNG states, step and version; resume needs the same
number of ranks and ZeRO stage. The learning rate is constant, so there is no scheduler state.
What this module does not do: decide when to train or publish (the training loop and scheduler).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from cir_actors.config import Config
from cir_actors.learning.dumps import merge_turn_sums, turn_metrics
from cir_actors.learning.learner_rank import MAX_SUMS, MEAN_DIAGS, LearnerRank, plan_micro_batches
from cir_actors.ops.cluster import Role, actor_options
from cir_actors.types import LearnerHung, PolicyUpdate, Trajectory

PROBE_EVERY_S = 5.0  # the driver's liveness pings to idle ranks while it waits for a batch (Learner.probe)

__all__ = ["Learner", "LearnerRank", "plan_micro_batches"]

log = logging.getLogger(__name__)


def _merge_rank_sums(parts: list[dict], extra_keys: tuple[str, ...] = ()) -> dict:
    """Token-weighted means and maxima over ranks (each rank sent sums)."""
    tokens = sum(p.get("tokens", 0.0) for p in parts)
    out: dict[str, Any] = {"loss": sum(p["loss"] for p in parts), "tokens": tokens}
    for key in MEAN_DIAGS + ("entropy", "kl_ref") + extra_keys:
        if any(key in p for p in parts):
            out[key] = sum(p.get(key, 0.0) for p in parts) / max(tokens, 1.0)
    for key in MAX_SUMS:
        if any(key in p for p in parts):
            out[key] = max(p.get(key, 0.0) for p in parts)
    out["seq_tokens"] = sum(p.get("seq_tokens", 0.0) for p in parts)
    return out


def lr_at(step: int, cfg: Config) -> float:
    """The learning rate of RL step `step` (from 1) under `learner.lr_schedule` (config.py)."""
    lcfg, total = cfg.learner, cfg.scheduler.total_steps
    warmup = lcfg.lr_warmup_steps
    if step < warmup:
        return lcfg.lr * step / warmup
    start = max(warmup, 1)  # the peak's step; the decay ends at the last step
    if lcfg.lr_schedule == "constant" or total <= start:
        return lcfg.lr
    progress = min(1.0, (step - start) / (total - start))
    low = lcfg.lr * lcfg.lr_min_ratio
    return low + (lcfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Learner:
    """Driver-side facade: creates the rank actors (`learner-rank-{i}`, or `{name}-rank-{i}`) and
    drives them. `num_receivers`: generators in the weight broadcast group (default
    generator.num_generators). Prometheus figures are the caller's to record (`LearnerMetrics`);
    `last_publish` holds the latest publication's timings (gather, fingerprint, put or send)."""

    def __init__(
        self, cfg: Config, model_path: str | Path, *, name: str = "learner", num_receivers: int | None = None
    ):
        import ray

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model path '{path}' has no config.json (expected a Hugging Face model directory)"
            )
        self.cfg, self.model_path = cfg, str(path)
        self.num_receivers = num_receivers or cfg.generator.num_generators
        lcfg = cfg.learner
        env = {
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(max(1, int(lcfg.num_cpus))),
            # published tensors go into the store as raw bytes and come out as zero-copy (read-only) views
            "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
        }
        if cfg.model.device == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        self.last_publish: dict[str, Any] = {}
        self.incarnation = 0  # stamped on every PolicyUpdate (types.PolicyUpdate; the driver sets it)
        self._pending_t0 = self._pending_judged_from = 0.0
        # The rendezvous port is picked free by rank 0 and bound a moment later by torch.distributed;
        # another process can take it in between (EADDRINUSE): then start the ranks again.
        for attempt in range(3):
            self.ranks = []
            for i in range(lcfg.num_ranks):
                opts = actor_options(Role.LEARNER, cfg, i)  # learner-rank-i, resources, concurrency 1
                if name != "learner":
                    opts["name"] = f"{name}-rank-{i}"
                if attempt:  # the killed ranks may still hold their names for a moment
                    opts["name"] += f"-retry{attempt}"
                self.ranks.append(
                    ray.remote(LearnerRank)
                    .options(**opts, runtime_env={"env_vars": env})
                    .remote(cfg, self.model_path, i, lcfg.num_ranks)
                )
            try:
                startup_s = self.cfg.recovery.learner_startup_timeout_s
                addr, port = self._get(self.ranks[0].address.remote(), "start-up", startup_s)
                info = self._get([r.setup.remote(addr, port) for r in self.ranks], "start-up", startup_s)
                break
            except BaseException as e:
                self.shutdown()
                if attempt == 2 or "EADDRINUSE" not in str(e):
                    raise
                log.warning("learner rendezvous port %d was taken; starting the ranks again", port)
        self.num_params = info[0]["num_params"]
        self._step = 0
        self._pending: list[Any] = []  # an unfinished broadcast publication
        self._pending_address = ""  # its group's address (to abort it while it forms)
        # The latest broadcast publication that failed (a generator died or was killed during it):
        # {"version", "cause"}, until the trainer takes it (`take_failed_publication`) and publishes
        # that version again another way.
        self.failed_publication: dict[str, Any] | None = None
        # Ray node ids of the generators, for learner.publish shared_memory (set by the trainer;
        # None: unknown, see shared_weights.plan_shared_publication).
        self.receiver_nodes: list[str] | None = None
        self._rank0_node: str | None = None
        self._logged_elsewhere: list[str] = []
        self._probe: tuple[list[Any], float] | None = None  # pings outstanding, sent when (`probe`)
        self._probe_answered = time.monotonic()

    def _get(self, refs: Any, what: str, timeout: float | None = None) -> Any:
        """ray.get of calls to the ranks within `recovery.learner_timeout_s` (start-up:
        `recovery.learner_startup_timeout_s`); past it, `LearnerHung` naming the call (the trainer
        treats it like a dead rank)."""
        import ray

        key = "learner_timeout_s" if timeout is None else "learner_startup_timeout_s"
        timeout = self.cfg.recovery.learner_timeout_s if timeout is None else timeout
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise LearnerHung(f"the learner's {what} did not finish within {timeout:.0f} s "
                              f"(recovery.{key}): a rank is stuck or stopped") from e

    def probe(self, every_s: float = PROBE_EVERY_S, receivers_starting: bool = False) -> None:
        """Find a dead or stopped rank while the driver waits on something else (a batch): called
        in the driver's rounds, it never blocks. It pings the idle ranks every `every_s`; a ping
        unanswered for `recovery.call_timeout_s` raises `LearnerHung` (a dead rank: Ray's error).
        Between steps the ranks are idle and a ping is answered at once; while a broadcast
        publication runs they are not, and that publication's own age is judged instead, against
        `recovery.learner_timeout_s`, counted from when no receiver is starting any more
        (`receivers_starting`: a generator's engine is still starting, and the broadcast waits for
        it to join; the driver bounds that by `recovery.generator_start_s`). Without this, a rank
        stopped right after a step went unseen until the next step's call; when no batch came
        meanwhile, the run ended at the no-batch watchdog instead of resuming."""
        import ray

        now, rcfg = time.monotonic(), self.cfg.recovery
        if self._pending:
            if receivers_starting:
                self._pending_judged_from = time.perf_counter()
            if not self.publication_done() and time.perf_counter() - self._pending_judged_from > rcfg.learner_timeout_s:
                raise LearnerHung(f"the learner's broadcast publication did not finish within "
                                  f"{rcfg.learner_timeout_s:.0f} s (recovery.learner_timeout_s): a rank is stuck or stopped")
            return
        if self._probe is None:
            if now - self._probe_answered >= every_s:
                self._probe = ([r.ping.remote() for r in self.ranks], now)
            return
        refs, sent = self._probe
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(done) == len(refs):
            ray.get(refs)  # a dead rank raises here
            self._probe, self._probe_answered = None, now
        elif now - sent > rcfg.call_timeout_s:
            self._probe = None
            raise LearnerHung(f"a learner rank answered no ping for {now - sent:.0f} s between steps "
                              f"(recovery.call_timeout_s): a rank is stuck or stopped")

    @property
    def version(self) -> int:
        """The version of the current weights: optimizer steps (train or SFT) taken so far."""
        return self._step

    @property
    def step(self) -> int:
        return self._step

    def _wait_pending(self) -> None:
        """Wait for the unfinished broadcast publication. One that failed while the ranks are alive
        (a receiver died mid-collective, or the group was aborted) is recorded in
        `failed_publication`, not raised: a generator's death is the trainer's to heal, and rank 0
        has already dissolved the group (the next publication forms a new one)."""
        import ray

        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            send_s = self._get(pending, "broadcast publication")[0]
        except ray.exceptions.RayTaskError as e:  # the rank is alive (a dead one raises RayActorError)
            cause = e.cause if isinstance(e.cause, BaseException) else e
            self.failed_publication = {"version": self.version,
                                       "cause": f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"}
            log.warning("broadcast publication of version %d failed: %s", self.version,
                        self.failed_publication["cause"])
            return
        self.last_publish.update(send_s=send_s, total_s=time.perf_counter() - self._pending_t0)

    def publication_done(self, timeout_s: float = 0.0) -> bool:
        """Whether no broadcast publication is unfinished, waiting up to `timeout_s` for it."""
        import ray

        return not self._pending or bool(ray.wait(self._pending, num_returns=len(self._pending), timeout=timeout_s)[0])

    def take_failed_publication(self) -> dict[str, Any] | None:
        """Wait for the unfinished broadcast publication; the failed one (see `failed_publication`),
        once, or None."""
        self._wait_pending()
        failed, self.failed_publication = self.failed_publication, None
        return failed

    def train_step(self, groups: list[list[Any]], record: int = 0) -> dict:
        """One RL step on complete groups (each a list of ScoredTrajectory or ObjectRefs to them).

        `record` > 0: also return `records`, up to that many trajectories (stratified on each rank,
        `record` shared out over ranks) as `dumps.build_record` dicts with the learner's per-token
        proximal and current log-probs of this step, for `dumps.write_step`.
        The turn-indexed diagnostics are returned as `turn/<bucket>/<figure>` (`dumps.turn_metrics`).

        Returns metrics: loss (token mean, averaged over optimizer updates; `update_losses` lists
        each update's, before its step, over its mini-batch's masked tokens), the loss diagnostics
        (token-weighted over ranks), entropy, grad_norm, tokens and trajectories trained,
        zero-advantage groups, tokens/s, time, step and version."""
        self._wait_pending()
        mbp = self.cfg.learner.mini_batch_prompts
        world = len(self.ranks)
        shards: list[list[tuple[int, int, list[Any]]]] = [[] for _ in range(world)]
        for g, group in enumerate(groups):
            shards[(g % mbp) % world].append((g, g // mbp, list(group)))
        t0 = time.perf_counter()
        quota = [record // world + (i < record % world) for i in range(world)]
        lr = lr_at(self._step + 1, self.cfg)
        parts = self._get([r.train_step.remote(s, q, lr) for r, s, q in zip(self.ranks, shards, quota)], "train step")
        elapsed = time.perf_counter() - t0
        self._step += 1
        out = _merge_rank_sums(parts)
        updates = max(parts[0]["updates"], 1)
        out["loss"] /= updates
        grad_norms = parts[0].get("grad_norms", [])
        out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else None  # None: no update (no signal)
        if out.get("is_weight_sq_mean"):  # effective sample size of the correction weights, in (0, 1]
            out["is_ess"] = out["is_weight_mean"] ** 2 / out["is_weight_sq_mean"]
        out["update_losses"] = [float(sum(x)) for x in zip(*[p.get("update_losses", []) for p in parts])]
        out.update(
            lost_groups=sorted(g for p in parts for g in p.get("lost_groups", [])),
            updates=parts[0]["updates"],
            trajectories=sum(p["trajectories"] for p in parts),
            trained_trajectories=sum(p["trained_trajectories"] for p in parts),
            **{k: sum(p.get(k, 0.0) for p in parts) for k in parts[0] if k.startswith(("void_", "roc_"))},
            zero_adv_groups=parts[0]["adv_stats"]["zero_adv_groups"],
            groups=len(groups),
            adv_abs_mean=parts[0]["adv_stats"]["adv_abs_mean"],
            # the slowest rank's time in each phase (ranks run in step)
            phases={k: max(p.get("phases", {}).get(k, 0.0) for p in parts) for k in parts[0].get("phases", {})},
            lr=lr,
            time_s=elapsed,
            tokens_per_s=out["seq_tokens"] / elapsed if elapsed > 0 else 0.0,
            step=self._step,
            version=self.version,
        )
        out.update(turn_metrics(merge_turn_sums([p.get("turn_sums", {}) for p in parts])))
        if record:
            out["records"] = [r for p in parts for r in p.get("records", [])]
        return out

    def sft_step(self, trajectories: list[Trajectory]) -> dict:
        """One optimizer update of cross-entropy on loss-masked tokens; returns loss and tokens/s."""
        self._wait_pending()
        world = len(self.ranks)
        t0 = time.perf_counter()
        parts = self._get([r.sft_step.remote(trajectories[i::world]) for i, r in enumerate(self.ranks)], "SFT step")
        elapsed = time.perf_counter() - t0
        self._step += 1
        out = _merge_rank_sums(parts)
        out.update(time_s=elapsed, tokens_per_s=out["seq_tokens"] / elapsed if elapsed > 0 else 0.0,
                   step=self._step, version=self.version)  # fmt: skip
        return out

    def compute_logprobs(self, token_ids_B: list[np.ndarray], temperature: float = 1.0) -> list[np.ndarray]:
        """The learner's log-prob of every token given its prefix (entry 0 is 0), current weights,
        of the logits divided by `temperature`."""
        self._wait_pending()
        involved = self.ranks if self.cfg.learner.zero_stage == 3 else self.ranks[:1]
        return self._get([r.compute_logprobs.remote(list(token_ids_B), temperature) for r in involved], "log-probs")[0]

    def publish(self, via: str | None = None, slot_wait_s: float | None = None) -> PolicyUpdate:
        """Publish the current weights as version `self.version` (`via`: "object_store",
        "broadcast" or "shared_memory", default from the config). The object-store and the
        shared-memory paths return once the weights are in the store or the region; the latter
        raises `SlotBusy` when a generator holds the slot longer than `slot_wait_s` (default
        `recovery.push_timeout_s`). The broadcast
        path returns at once with the group address: rank 0 sends when the generators call
        `weight_sync.receive_broadcast`; the next learner call waits for that to finish. `budget` is the schedule's value at this version (the scheduler owns it)."""
        self._wait_pending()
        via = via or self.cfg.learner.publish
        budget = self.cfg.scheduler.budget_at(self.version)
        involved = self.ranks if self.cfg.learner.zero_stage == 3 else self.ranks[:1]
        t0 = time.perf_counter()
        if via == "object_store":
            (ref,), checksum, timings = self._get([r.publish_object_store.remote() for r in involved], "publication")[0]
            self.last_publish = {"via": via, "total_s": time.perf_counter() - t0, **timings}
            return PolicyUpdate(version=self.version, budget=budget, weights=ref, checksum=checksum,
                                incarnation=self.incarnation)
        if via == "shared_memory":
            return self._publish_shared(budget, involved, t0, slot_wait_s)
        if via != "broadcast":
            raise ValueError(f"publish via '{via}': expected 'object_store', 'broadcast' or 'shared_memory'")
        address, checksum, timings = self._get(
            [r.prepare_broadcast.remote(self.num_receivers) for r in involved], "publication")[0]
        self.last_publish = {"via": via, "prepare_s": time.perf_counter() - t0, **timings}
        self._pending = [r.publish_broadcast.remote(self.version) for r in involved]
        self._pending_t0, self._pending_address = t0, address
        self._pending_judged_from = t0
        return PolicyUpdate(version=self.version, budget=budget, checksum=checksum, broadcast_group=address,
                            incarnation=self.incarnation)

    def _publish_shared(self, budget: int, involved: list[Any], t0: float, slot_wait_s: float | None) -> PolicyUpdate:
        """Write the shared-memory region for the generators on rank 0's node; put the state dict
        into the object store too when some generator is (or may be) on another node."""
        import ray

        from cir_actors.learning.shared_weights import plan_shared_publication

        if self._rank0_node is None:
            self._rank0_node = ray.get(self.ranks[0].node_id.remote(), timeout=60)
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        shared, elsewhere = plan_shared_publication(self._rank0_node, self.receiver_nodes, alive)
        if elsewhere and elsewhere != self._logged_elsewhere:
            log.info("learner.publish shared_memory: generators on node(s) %s are not on learner rank 0's node %s; "
                     "they get the weights through the object store", ", ".join(elsewhere), self._rank0_node)
        self._logged_elsewhere = elsewhere
        where, ref, checksum, timings = None, None, "", {}
        if shared:
            where, checksum, timings = self._get(
                [r.publish_shared_memory.remote(self.version, slot_wait_s) for r in involved], "publication")[0]
        if elsewhere or not shared:
            (ref,), checksum, put = self._get([r.publish_object_store.remote() for r in involved], "publication")[0]
            timings = {**timings, **put}
        self.last_publish = {"via": "shared_memory", "total_s": time.perf_counter() - t0, **timings}
        return PolicyUpdate(version=self.version, budget=budget, weights=ref, checksum=checksum, shared_memory=where,
                            incarnation=self.incarnation)

    def release_shared_memory(self) -> None:
        """Unlink the shared-memory region (the next shared-memory publication creates it again)."""
        import ray

        ray.get([r.close_shared_memory.remote() for r in self.ranks[:1]], timeout=10)

    def reset_broadcast(self, reason: str = "the learner dissolved the group") -> None:
        """Dissolve the broadcast group; the next broadcast publication opens a new one (a new
        address) that every generator joins afresh. Call it when a generator was replaced: a group's
        membership is fixed when it forms. An unfinished publication is aborted if its group is
        still forming (a member that will never join is not waited for) and otherwise waited for
        (kill a hung member first: its death fails the collective at once); if it failed, it is in
        `failed_publication`."""
        from cir_actors.learning.weight_sync import abort_broadcast

        if self._pending and not self.publication_done():
            abort_broadcast(self._pending_address, reason)
        self._wait_pending()
        self._get(self.ranks[0].close_broadcast.remote(), "broadcast reset")

    def wait_published(self) -> None:
        """Block until a broadcast publication has been received by every generator; raises if it failed."""
        failed = self.take_failed_publication()
        if failed is not None:
            raise RuntimeError(f"broadcast publication of version {failed['version']} failed: {failed['cause']}")

    def save_checkpoint(self, path: str | Path) -> None:
        self._wait_pending()
        Path(path).mkdir(parents=True, exist_ok=True)

        self._get([r.save_checkpoint.remote(str(path), self._step, self.version) for r in self.ranks], "checkpoint save")

    def load_checkpoint(self, path: str | Path) -> None:
        self._wait_pending()
        meta_file = Path(path) / "learner_state.json"
        if not meta_file.is_file():
            raise ValueError(f"checkpoint '{path}' has no learner_state.json (not a learner checkpoint)")
        meta = json.loads(meta_file.read_text())
        want = (len(self.ranks), self.cfg.learner.zero_stage)
        if (meta["num_ranks"], meta["zero_stage"]) != want:
            raise ValueError(
                f"checkpoint '{path}' was saved with {meta['num_ranks']} ranks and ZeRO {meta['zero_stage']}; "
                f"learner.num_ranks and learner.zero_stage must match ({want[0]}, {want[1]} now)"
            )

        states = self._get([r.load_checkpoint.remote(str(path)) for r in self.ranks], "checkpoint load")
        self._step = states[0]["step"]

    def shutdown(self) -> None:
        import ray

        if self.ranks:
            try:  # the region outlives a killed process: unlink it first (a dead rank's is swept later)
                self.release_shared_memory()
            except Exception as e:  # noqa: BLE001 - rank 0 is dead or hung: kill the ranks anyway
                log.warning("learner shutdown: shared-memory region not released: %s", e)
        for r in self.ranks:
            ray.kill(r)
        self.ranks = []
