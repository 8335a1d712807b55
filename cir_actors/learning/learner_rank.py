"""One learner rank: a DeepSpeed engine in one torch.distributed world, as a plain class.

`LearnerRank` is what `learner.Learner` runs as a Ray actor per rank (see `learning/learner.py` for the step
it implements, the sharding, the loss normalisation and the publication paths). Here: batching
(`plan_micro_batches`, packing or padding), the forward/backward loop in step with the other ranks, proximal
log-probs, the optional KL and entropy terms, full-weight iteration under every ZeRO stage, and the
per-rank halves of publishing and checkpointing. It does not talk to other actors except through
torch.distributed collectives, the weight broadcast group, and `ray.get`/`ray.put`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cir_actors.config import Config
from cir_actors.control.sampling import VoidTurn, roc_down_sample, void_turn_reason
from cir_actors.learning.advantages import compute_advantages
from cir_actors.learning.dumps import build_record, select_stratified, stratum, turn_sums
from cir_actors.learning.loss import forward_logprobs, policy_loss
from cir_actors.types import FinishReason, ScoredTrajectory, Trajectory

MAX_SUMS = ("ratio_max", "is_weight_max")
FETCH_TIMEOUT_S = 300.0  # a trajectory not fetched by then is lost (its node is gone)
log = logging.getLogger(__name__)
MEAN_DIAGS = (
    "clip_frac_low",
    "clip_frac_high",
    "dual_clip_frac",
    "ratio_mean",
    "is_weight_mean",
    "is_weight_sq_mean",
    "is_cap_frac",
    "is_masked_frac",
    "kl_prox_behav",
    "logprob_abs_diff",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def plan_micro_batches(lengths: list[int], max_tokens: int, packed: bool = False) -> list[list[int]]:
    """Indices grouped into micro-batches, longest first. Padded (default): rows x longest <=
    max_tokens, so rows of similar length share a batch. Packed: the sum of lengths <= max_tokens,
    first fit (each sequence goes to the first batch with room). A sequence longer than max_tokens
    is alone either way."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    if packed:
        room: list[int] = []
        for i in order:
            j = next((j for j, r in enumerate(room) if lengths[i] <= r), None)
            if j is None:
                batches.append([i])
                room.append(max_tokens - lengths[i])
            else:
                batches[j].append(i)
                room[j] -= lengths[i]
        return batches
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass
class _Sample:
    """One trajectory on a rank, with what the step computed for it."""

    traj: Trajectory
    advantage: float
    minibatch: int
    proximal_T: torch.Tensor | None = None
    current_T: torch.Tensor | None = None  # the loss forward's log-probs (detached), kept for dumps
    group: int = -1


def _collate(samples: list[_Sample], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] tensors; the first token never has a log-prob, so its mask is 0."""
    T = max(len(s.traj.token_ids_T) for s in samples) if samples else 2
    B = max(len(samples), 1)
    ids = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    behav = torch.zeros(B, T)
    prox = torch.zeros(B, T)
    adv = torch.zeros(B)
    for b, s in enumerate(samples):
        n = len(s.traj.token_ids_T)
        ids[b, :n] = torch.from_numpy(s.traj.token_ids_T.astype(np.int64))
        attn[b, :n] = 1
        mask[b, :n] = torch.from_numpy(s.traj.loss_mask_T.astype(np.float32))
        behav[b, :n] = torch.from_numpy(s.traj.logprobs_T.astype(np.float32))
        if s.proximal_T is not None:
            prox[b, :n] = s.proximal_T
        adv[b] = s.advantage
    if not samples:  # an empty micro-batch that keeps a short rank in step with the others
        attn[0] = 1
    mask[:, 0] = 0
    out = {"input_ids": ids, "attention_mask": attn, "mask": mask, "behav": behav, "prox": prox, "adv": adv}
    return {k: v.to(device) for k, v in out.items()}


def _collate_packed(samples: list[_Sample], device: torch.device) -> dict[str, torch.Tensor]:
    """The samples end to end in one [1, L] row, no padding: `position_ids` restart at 0 per
    sample (transformers builds a block-causal mask from them when no attention mask is given),
    `segments` numbers the samples (sequence-level corrections), `adv` is per token, and each
    sample's first token has mask 0 (its log-prob would be predicted from the previous sample)."""
    lengths = [len(s.traj.token_ids_T) for s in samples] or [2]
    L = sum(lengths)
    ids = torch.zeros(1, L, dtype=torch.long)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    seg = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)]).unsqueeze(0)
    mask = torch.zeros(1, L)
    behav = torch.zeros(1, L)
    prox = torch.zeros(1, L)
    adv = torch.zeros(1, L)
    off = 0
    for s, n in zip(samples, lengths):
        ids[0, off : off + n] = torch.from_numpy(s.traj.token_ids_T.astype(np.int64))
        mask[0, off : off + n] = torch.from_numpy(s.traj.loss_mask_T.astype(np.float32))
        mask[0, off] = 0
        behav[0, off : off + n] = torch.from_numpy(s.traj.logprobs_T.astype(np.float32))
        if s.proximal_T is not None:
            prox[0, off : off + n] = s.proximal_T
        adv[0, off : off + n] = s.advantage
        off += n
    out = {"input_ids": ids, "attention_mask": torch.ones(1, L, dtype=torch.long), "position_ids": pos,
           "segments": seg, "mask": mask, "behav": behav, "prox": prox, "adv": adv}
    return {k: v.to(device) for k, v in out.items()}


def _per_sample(batch: dict[str, torch.Tensor], values_B_T: torch.Tensor, samples: list[_Sample]) -> list[torch.Tensor]:
    """Each sample's [T] slice of a [B, T] result of `_collate` or `_collate_packed`, detached on
    the CPU in float32, entry 0 = 0 as in `token_logprobs`."""
    out = []
    if "position_ids" in batch:
        off = 0
        for s in samples:
            n = len(s.traj.token_ids_T)
            v = values_B_T[0, off : off + n].detach().float().cpu().clone()
            v[0] = 0.0
            out.append(v)
            off += n
        return out
    return [values_B_T[b, : len(s.traj.token_ids_T)].detach().float().cpu() for b, s in enumerate(samples)]


def _as_trajectory(token_ids: np.ndarray) -> Trajectory:
    """A bare sequence wrapped for the batching code (all tokens count as sampled)."""
    ids = np.asarray(token_ids, dtype=np.int32)
    n = len(ids)
    return Trajectory(
        "",
        0,
        ids,
        np.ones(n, np.int8),
        np.zeros(n, np.float32),
        np.zeros(n, np.int32),
        1,
        FinishReason.STOP,
        0,
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LearnerRank:
    """One DeepSpeed data-parallel rank (a Ray actor in `Learner`; usable alone for world size 1)."""

    def __init__(self, cfg: Config, model_path: str, rank: int, world_size: int) -> None:
        self.cfg, self.model_path = cfg, str(model_path)
        self.rank, self.world_size = rank, world_size
        self.lcfg = cfg.learner
        self.device = torch.device("cuda" if cfg.model.device == "cuda" else "cpu")
        self.engine: Any = None
        self.sender: Any = None
        self.shm_writer: Any = None  # shared_weights.SharedWeightsWriter, created at the first publication
        # Behaviour log-probs are of the distribution sampled from (logits / T); the learner's RL
        # log-probs use the same T, as verl does (T = 0 is refused for training at load).
        self.temperature = cfg.generator.temperature if cfg.generator.temperature > 0 else 1.0
        torch.set_num_threads(max(1, int(self.lcfg.num_cpus)))
        self._roc_rng = random.Random(self.lcfg.seed * 1_000_003 + rank)

    def address(self) -> tuple[str, int]:
        """Where rank 0 hosts the torch.distributed rendezvous."""
        from cir_actors.learning.weight_sync import node_ip

        ip = node_ip()
        return ip, _free_port(ip)

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the world, load the model, build the engine (blocks until every rank joined)."""
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",  # under Ray each rank sees only its own device
        )
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from transformers import AutoModelForCausalLM

        seed = self.lcfg.seed
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed)  # identical on every rank: the model is loaded, not initialised
        from cir_actors.data.model_setup import ensure_local, load_hf_config

        self.model_path = ensure_local(self.model_path, self.cfg)
        self.hf_config = load_hf_config(self.model_path, self.cfg)  # the engine's window settings too
        deepspeed.init_distributed(dist_backend=self.lcfg.backend, auto_mpi_discovery=False, verbose=False)
        # Loaded in the training dtype: bf16 training keeps its fp32 master copy in the optimizer, so
        # an fp32 host copy of the weights per rank would only be a transient to cast from.
        load_dtype = torch.bfloat16 if self.lcfg.bf16 else torch.float32
        attn = {"attn_implementation": self.lcfg.attn_implementation} if self.lcfg.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(self.model_path, config=self.hf_config, dtype=load_dtype, **attn)
        if self.lcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.publish_dtype = getattr(torch, self.cfg.model.dtype)
        self.ref_model = None
        if self.lcfg.kl_coef > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                self.model_path, config=self.hf_config, dtype=self.publish_dtype, **attn
            )
            self.ref_model.to(self.device).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.lcfg.lr, weight_decay=self.lcfg.weight_decay
        )
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # we call backward once per micro-batch and step() once per mini-batch ourselves
            "managed_gradient_accumulation": False,
            "gradient_clipping": self.lcfg.grad_clip,
            "zero_optimization": {
                "stage": self.lcfg.zero_stage,
                "stage3_param_persistence_threshold": self.lcfg.zero3_persistence_threshold,
            },
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.lcfg.bf16},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.engine.train()
        self.zero3 = self.lcfg.zero_stage == 3
        return {
            "rank": self.rank,
            "num_params": sum(self._shape_numel(p) for p in self.engine.module.parameters()),
        }

    # ---------------------------------------------------------------- collectives
    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # ---------------------------------------------------------------- forward passes
    def _logprobs(
        self, batch: dict[str, torch.Tensor], model: Any, temperature: float = 1.0, entropy: str = "none"
    ) -> tuple[torch.Tensor, Any]:
        """Token log-probs of `logits / temperature`, and (entropy [B, T], where it is valid) or
        None (`loss.forward_logprobs`: chunked, without the full logits, except under ZeRO-3 whose
        parameter hooks expect one forward through the module)."""
        module = model.module if hasattr(model, "module") else model
        chunk = 0 if self.zero3 and module is self.engine.module else self.lcfg.logprob_chunk_tokens
        # the full-logits path calls the engine itself (ZeRO-3's forward bookkeeping lives there); the
        # chunked one calls the module's body and head, which ZeRO-0/1/2 need no engine for
        lp, ent, valid = forward_logprobs(
            model if chunk == 0 else module, batch["input_ids"], batch["attention_mask"], temperature=temperature, chunk_tokens=chunk,
            entropy=entropy, loss_mask_B_T=batch["mask"], entropy_sample_tokens=self.lcfg.entropy_sample_tokens,
            position_ids_B_T=batch.get("position_ids"),
        )  # fmt: skip
        return lp, (None if ent is None else (ent, valid))

    def _micro_batches(self, samples: list[_Sample]) -> list[list[_Sample]]:
        plan = plan_micro_batches([len(s.traj.token_ids_T) for s in samples], self.lcfg.micro_batch_tokens,
                                  packed=self.lcfg.packing)  # fmt: skip
        return [[samples[i] for i in mb] for mb in plan]

    def _collate(self, samples: list[_Sample]) -> dict[str, torch.Tensor]:
        return (_collate_packed if self.lcfg.packing else _collate)(samples, self.device)

    @torch.no_grad()
    def _fill_proximal(self, samples: list[_Sample], temperature: float = 1.0) -> None:
        micro = self._micro_batches(samples)
        # ZeRO-3 gathers parameters collectively inside every forward: all ranks run as many
        n_micro = int(self._all_reduce([len(micro)], "max")[0]) if self.zero3 else len(micro)
        for k in range(n_micro):
            mb = micro[k] if k < len(micro) else []
            batch = self._collate(mb)
            lp, _ = self._logprobs(batch, self.engine, temperature)
            for s, v in zip(mb, _per_sample(batch, lp, mb)):
                s.proximal_T = v

    def _run_minibatch(self, samples: list[_Sample], loss_fn: Any, temperature: float = 1.0) -> dict:
        """Forward/backward over micro-batches in step with the other ranks, then one optimizer step.
        Returns summed diagnostics, `loss` being this rank's share of the global token-mean loss."""
        micro = self._micro_batches(samples)
        (n_micro,) = self._all_reduce([len(micro)], "max")
        (n_tokens,) = self._all_reduce([sum(float(s.traj.loss_mask_T[1:].sum()) for s in samples)])
        sums: dict[str, float] = {"loss": 0.0}
        if n_tokens == 0:  # nothing to learn from on any rank: no update (all ranks agree)
            return sums
        for k in range(int(n_micro)):
            mb = micro[k] if k < len(micro) else []
            batch = self._collate(mb)
            lp, ent = self._logprobs(batch, self.engine, temperature, entropy=self._entropy_mode(loss_fn))
            for s, v in zip(mb, _per_sample(batch, lp, mb)):
                s.current_T = v
            loss, diag = loss_fn(batch, lp, ent, n_tokens)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            sums["loss"] += float(loss.item())
            n = diag.pop("num_tokens", 0.0)
            for key, v in diag.items():
                if key in MAX_SUMS:
                    sums[key] = max(sums.get(key, 0.0), v)
                else:
                    sums[key] = sums.get(key, 0.0) + v * n
            sums["tokens"] = sums.get("tokens", 0.0) + n
            sums["seq_tokens"] = sums.get("seq_tokens", 0.0) + float(batch["attention_mask"].sum()) * (
                k < len(micro)
            )
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        sums["grad_norm"] = float(norm) if norm is not None else float("nan")
        return sums

    # ---------------------------------------------------------------- steps
    def train_step(self, shard: list[tuple[int, int, list[Any]]], record: int = 0, lr: float | None = None) -> dict:
        """`shard`: (global group index, mini-batch index, the group's ScoredTrajectory or refs to
        them). Returns this rank's sums; the driver merges ranks (`Learner.train_step`).
        Also `turn_sums` (turn-indexed diagnostics of the trained tokens, `dumps.turn_sums`) and,
        with `record` > 0, `records`: up to `record` trajectories of the shard chosen by
        `dumps.select_stratified`, each a `dumps.build_record` with the log-probs of this step's
        own forwards (the proximal values; the current ones from the loss forward). `lr`: this
        step's learning rate (`learner.lr_at`; None keeps the optimizer's)."""
        import ray

        if lr is not None:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
        t0 = time.perf_counter()
        groups: dict[int, tuple[int, list[ScoredTrajectory]]] = {}
        lost: list[int] = []  # groups whose objects are gone (node lost): every rank leaves them out
        for gidx, mb, items in shard:
            refs = [i for i in items if isinstance(i, ray.ObjectRef)]
            try:
                got = iter(ray.get(refs, timeout=FETCH_TIMEOUT_S)) if refs else iter(())
            except (ray.exceptions.RayError, TimeoutError) as e:
                log.warning("rank %d: group %d lost (%s); not trained", self.rank, gidx, type(e).__name__)
                lost.append(gidx)
                continue
            groups[gidx] = (mb, [next(got) if isinstance(i, ray.ObjectRef) else i for i in items])
        roc_dropped = 0
        if self.cfg.scheduler.roc:  # GRPO-RoC: down-sample each over-sampled group to n
            n = self.cfg.generator.samples_per_prompt
            roc_dropped = sum(max(len(sts) - n, 0) for _, sts in groups.values())
            groups = {g: (mb, roc_down_sample(sts, n, self._roc_rng)) for g, (mb, sts) in groups.items()}
        local = {
            g: ([s.reward for s in st], [s.trajectory.num_sampled for s in st])
            for g, (_, st) in groups.items()
        }
        merged: dict[int, Any] = {}
        for part in self._all_gather_object(local):
            merged.update(part)
        order = sorted(merged)
        advs, adv_stats = compute_advantages(
            [np.asarray(merged[g][0]) for g in order],
            self.lcfg.advantage,
            num_tokens_list=[np.asarray(merged[g][1]) for g in order],
        )
        adv_of = dict(zip(order, advs))
        # A KL term, or an entropy bonus over every group, trains the zero-advantage samples too.
        extra_terms = self.lcfg.kl_coef > 0 or (self.lcfg.entropy_coef > 0 and self.lcfg.entropy_groups == "all")
        void = Counter(void_turn_reason(st) for _, sts in groups.values() for st in sts)  # counted even unfiltered
        every = [
            (st, _Sample(st.trajectory, float(a), mb, group=g))
            for g, (mb, sts) in sorted(groups.items())
            for st, a in zip(sts, adv_of[g])
        ]
        samples = [s for st, s in every if (s.advantage != 0.0 or extra_terms)
                   and not (self.cfg.buffer.void_turn_filter and void_turn_reason(st))]
        chosen = [every[i] for i in select_stratified([stratum(st) for st, _ in every], record)] if record else []
        if record:  # collective under ZeRO-3: every rank calls it (they all got the same `record`)
            self._fill_proximal([s for _, s in chosen if s.advantage == 0.0 and not extra_terms])
        n_mb = int(self._all_reduce([max([mb for mb, _ in groups.values()], default=-1) + 1], "max")[0])
        reuse_forward = n_mb == 1
        t_fetched = time.perf_counter()
        if not reuse_forward:
            self._fill_proximal(samples, self.temperature)
        t_prox = time.perf_counter()

        def loss_fn(batch, lp, ent, n_tokens):
            prox = lp.detach() if reuse_forward else batch["prox"]
            loss, diag = policy_loss(
                lp, prox, batch["behav"], batch["adv"], batch["mask"],
                clip_low=self.lcfg.clip_low, clip_high=self.lcfg.clip_high, is_cap=self.lcfg.is_cap,
                dual_clip=self.lcfg.dual_clip, num_tokens=n_tokens, correction=self.lcfg.correction,
                is_band=self.lcfg.is_band, geo_band=self.lcfg.geo_band, segments=batch.get("segments"),
            )  # fmt: skip
            return self._extra_terms(loss, diag, batch, lp, ent, n_tokens)

        totals: dict[str, float] = {"loss": 0.0, "updates": 0}
        for mb in range(n_mb):
            sums = self._run_minibatch([s for s in samples if s.minibatch == mb], loss_fn, self.temperature)
            totals.setdefault("update_losses", []).append(sums["loss"])
            for k, v in sums.items():
                if k in MAX_SUMS:
                    totals[k] = max(totals.get(k, 0.0), v)
                elif k == "grad_norm":
                    totals.setdefault("grad_norms", []).append(v)
                else:
                    totals[k] = totals.get(k, 0.0) + v
            totals["updates"] += "grad_norm" in sums
        totals.update(
            lost_groups=lost,
            trajectories=sum(len(st) for _, st in groups.values()),
            trained_trajectories=len(samples),
            roc_dropped=roc_dropped,
            **{f"void_{reason}": float(void[reason]) for reason in VoidTurn},
            minibatches=n_mb,
            adv_stats=adv_stats,
            time_s=time.perf_counter() - t0,
        )
        turn: dict = {}
        for s in samples:
            if s.current_T is None:  # no forward ran (no masked token in the whole batch)
                continue
            t = s.traj
            prox = s.current_T if reuse_forward else s.proximal_T
            turn_sums(t.logprobs_T, prox.numpy(), s.current_T.numpy(), s.advantage, t.loss_mask_T,
                      t.prompt_len, t.tool_calls, lcfg=self.lcfg, into=turn)  # fmt: skip
        totals["turn_sums"] = turn
        if chosen:
            totals["records"] = self._records(chosen, samples, reuse_forward)
        # Where this rank's step went: fetching the batch and the advantages' all-gather, the separate
        # proximal forward (0 when one mini-batch reuses its own forward), forward/backward/optimizer.
        totals["phases"] = {"fetch_s": t_fetched - t0, "proximal_s": t_prox - t_fetched,
                            "update_s": time.perf_counter() - t_prox}
        return totals

    def _records(self, chosen: list[tuple[ScoredTrajectory, _Sample]], trained: list[_Sample], reuse_forward: bool):
        """Dump records of the chosen samples: proximal log-probs from the step's first forward
        (or `_fill_proximal`), current ones from the loss forward; untrained samples have no current."""
        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        trained_ids = {id(s) for s in trained}
        out = []
        for st, s in chosen:
            is_trained = id(s) in trained_ids
            is_trained = is_trained and s.current_T is not None
            prox = s.current_T if (is_trained and reuse_forward) else s.proximal_T
            cur = s.current_T if is_trained else None
            if prox is None:  # a batch with no masked token anywhere: no forward ran, nothing to show
                continue
            pieces = self._tokenizer.batch_decode([[int(i)] for i in s.traj.token_ids_T])
            out.append(build_record(st, prox.numpy(), None if cur is None else cur.numpy(), s.advantage,
                                    pieces=pieces, trained=is_trained, group=s.group, lcfg=self.lcfg))  # fmt: skip
        return out

    def _entropy_mode(self, loss_fn: Any) -> str:
        if getattr(loss_fn, "is_sft", False):
            return "none"
        if self.lcfg.entropy_coef > 0:
            return "full"
        return "sample" if self.lcfg.entropy_sample_tokens > 0 else "none"

    def _extra_terms(self, loss, diag, batch, lp, ent, n_tokens):
        """Optional KL (k3, against the frozen initial model) and entropy-bonus terms, token-mean.
        `ent`: (entropy [B, T], positions where it is valid) or None; with entropy_coef 0 it is the
        diagnostic on a sample of the trained tokens (`learner.entropy_sample_tokens`)."""
        mask = batch["mask"]
        if ent is not None:
            ent_T, valid = ent
            if self.lcfg.entropy_coef > 0:
                loss = loss - self.lcfg.entropy_coef * (ent_T * mask).sum() / n_tokens
            where = mask * valid
            diag["entropy"] = float((ent_T.detach() * where).sum() / where.sum().clamp(min=1))
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _ = self._logprobs(batch, self.ref_model, self.temperature)
            d = ref.float() - lp
            kl = torch.exp(d) - d - 1.0
            loss = loss + self.lcfg.kl_coef * (kl * mask).sum() / n_tokens
            diag["kl_ref"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
        return loss, diag

    def sft_step(self, trajectories: list[Trajectory]) -> dict:
        """One optimizer update of cross-entropy on the loss-masked tokens (token mean over ranks)."""
        t0 = time.perf_counter()
        samples = [_Sample(t, 0.0, 0) for t in trajectories]

        def loss_fn(batch, lp, ent, n_tokens):
            mask = batch["mask"]
            n = float(mask.sum())
            return -(lp * mask).sum() / n_tokens, {"num_tokens": n}

        loss_fn.is_sft = True

        sums = self._run_minibatch(samples, loss_fn)
        sums.update(trajectories=len(trajectories), time_s=time.perf_counter() - t0)
        return sums

    @torch.no_grad()
    def compute_logprobs(self, token_ids_B: list[np.ndarray], temperature: float = 1.0) -> list[np.ndarray]:
        """log p(token t | tokens < t) under the current weights at `temperature` (the RL step uses
        generator.temperature), per sequence; entry 0 is 0."""
        samples = [_Sample(_as_trajectory(ids), 0.0, 0) for ids in token_ids_B]
        self._fill_proximal(samples, temperature)
        return [s.proximal_T.numpy() for s in samples]

    def partition_numel(self) -> int:
        """Parameter elements this rank holds (under ZeRO-3 its partition, else the whole model)."""
        return sum(
            int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
            for p in self.engine.module.parameters()
        )

    # ---------------------------------------------------------------- weights
    @staticmethod
    def _shape_numel(p: torch.nn.Parameter) -> int:
        return int(np.prod(getattr(p, "ds_shape", p.shape)))

    def weight_specs(self) -> list:
        from cir_actors.learning.weight_sync import TensorSpec

        dtype = str(self.publish_dtype).removeprefix("torch.")
        return [
            TensorSpec(name, dtype, tuple(getattr(p, "ds_shape", p.shape)))
            for name, p in self.engine.module.named_parameters()
        ]

    def iter_full_weights(self, clone: bool):
        """(hf_name, full tensor on CPU in the publish dtype) per parameter; under ZeRO-3 every rank
        must iterate (each parameter is gathered collectively) and only rank 0 gets tensors."""
        import deepspeed

        for name, p in self.engine.module.named_parameters():
            if self.zero3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    t = p.data.detach().to("cpu", self.publish_dtype)
                    yield name, (t.clone() if clone and t.data_ptr() == p.data.data_ptr() else t)
            else:
                t = p.detach().to("cpu", self.publish_dtype)
                yield name, (t.clone() if clone and t.data_ptr() == p.data_ptr() else t)

    def publish_object_store(self) -> tuple[list[Any], str, dict] | None:
        """Rank 0: ([ref to the state dict], fingerprint, timings). Other ranks (ZeRO-3 only) help
        gather. Tensors are stored as raw bytes (Ray's zero-copy tensor serialisation, set in the
        rank's environment by `Learner`): readers get read-only views of the store, no copy."""
        import ray

        from cir_actors.learning.weight_sync import fingerprint

        if self.rank != 0:
            for _ in self.iter_full_weights(clone=False):
                pass
            return None
        t0 = time.perf_counter()
        # ray.put copies the bytes into the store at once; only gathered ZeRO-3 tensors, which are
        # freed when their gather ends, must be cloned first.
        state = dict(self.iter_full_weights(clone=self.zero3))
        t1 = time.perf_counter()
        checksum = fingerprint(state.items())
        t2 = time.perf_counter()
        ref = ray.put(state)
        t3 = time.perf_counter()
        return [ref], checksum, {"gather_s": t1 - t0, "fingerprint_s": t2 - t1, "put_s": t3 - t2}

    def prepare_broadcast(self, num_receivers: int) -> tuple[str, str, dict] | None:
        """Rank 0: open (once) the broadcast group's rendezvous; (address, fingerprint of the
        current weights, timings). Other ranks (ZeRO-3 only) help gather."""
        from cir_actors.learning.weight_sync import BroadcastSender, StreamingFingerprint

        t0 = time.perf_counter()
        fp = StreamingFingerprint()
        for name, t in self.iter_full_weights(clone=False):
            fp.add(name, t)
        if self.rank != 0:
            return None
        if self.sender is None or self.sender.world_size != num_receivers + 1:
            self.sender = BroadcastSender(num_receivers, self.lcfg.backend, device=str(self.device))
        return self.sender.address, fp.digest(), {"fingerprint_s": time.perf_counter() - t0}

    def publish_broadcast(self, version: int) -> float | None:
        """Rank 0 streams the weights to the receivers (other ranks help gather under ZeRO-3);
        returns the seconds it took, from the first receiver's join to the last bucket."""
        t0 = time.perf_counter()
        weights = (t for _, t in self.iter_full_weights(clone=False))
        if self.rank != 0:
            for _ in weights:
                pass
            return None
        try:
            self.sender.send(version, self.weight_specs(), weights, checksum=False)
        except BaseException:
            self.close_broadcast()  # a receiver died or timed out: the next publication re-forms the group
            raise
        return time.perf_counter() - t0

    def close_broadcast(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    def ping(self) -> None:
        """Nothing: the driver's liveness probe while the ranks are idle (`Learner.probe`)."""

    def node_id(self) -> str:
        from cir_actors.learning.shared_weights import local_node_id

        return local_node_id()

    def publish_shared_memory(self, version: int, lock_timeout_s: float | None = None) -> tuple[Any, str, dict] | None:
        """Rank 0: write the current weights into the shared-memory region (created, for the whole
        run, at the first call); (SharedWeights, fingerprint, timings). `SlotBusy` when a reader holds
        the slot longer than `lock_timeout_s` (default `recovery.push_timeout_s`). Other ranks
        (ZeRO-3 only) help gather."""
        from cir_actors.learning.shared_weights import SharedWeightsWriter, SlotBusy

        t0 = time.perf_counter()
        weights = (t for _, t in self.iter_full_weights(clone=False))  # copied into the slot one at a time
        if self.rank != 0:
            for _ in weights:
                pass
            return None
        if self.shm_writer is None:
            self.shm_writer = SharedWeightsWriter(self.weight_specs(), lock_timeout_s=self.cfg.recovery.push_timeout_s)
        t1 = time.perf_counter()
        try:
            where, checksum = self.shm_writer.write(version, weights, checksum=True, lock_timeout_s=lock_timeout_s)
        except SlotBusy:
            for _ in weights:  # the other ranks gather with this one (ZeRO-3): take part, then say so
                pass
            raise
        return where, checksum, {"create_s": t1 - t0, "write_s": time.perf_counter() - t1}

    def close_shared_memory(self) -> None:
        if self.shm_writer is not None:
            self.shm_writer.close()
            self.shm_writer = None

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str, step: int, version: int) -> None:
        from safetensors.torch import save_file

        root = Path(path)
        state = dict(self.iter_full_weights(clone=self.rank == 0))
        if self.rank == 0:
            hf = root / "hf"
            hf.mkdir(parents=True, exist_ok=True)
            for f in Path(self.model_path).iterdir():
                if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(f, hf / f.name)
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(hf / "model.safetensors"), {"format": "pt"}
            )
        del state
        self.engine.save_checkpoint(
            str(root / "deepspeed"), tag="state", client_state={"step": step, "version": version}
        )
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, root / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            meta = {
                "step": step,
                "version": version,
                "num_ranks": self.world_size,
                "zero_stage": self.lcfg.zero_stage,
            }
            (root / "learner_state.json").write_text(json.dumps(meta))

    def load_checkpoint(self, path: str) -> dict:
        root = Path(path)
        _, client = self.engine.load_checkpoint(
            str(root / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        rng = torch.load(root / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        return {"step": client["step"], "version": client["version"]}
