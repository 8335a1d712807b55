"""The generator: one vLLM async engine running many code-integrated trajectories at once.

`Generator` is plain Python; as a Ray actor it is
`ray.remote(Generator).options(num_cpus=..., max_concurrency=...).remote(cfg, model_path, interpreter)`
(an async actor: every public coroutine runs on the actor's event loop, many at once). The
multi-turn logic is `rollout.run_rollout`; this module supplies the engine side of it: streamed,
token-in/token-out model segments with behaviour log-probs, and live weight updates.

Weights and versions. The engine's weights only change while *no* engine request is running, so
every request's tokens were sampled by exactly one policy version (the one recorded at submission).
On `update_weights`, by `generator.update_policy`:
- "finish": new trajectories wait, in-flight ones finish on the old weights, then the load happens;
- "interrupt": new requests wait, running ones are aborted at a token boundary (their tokens so far
  are kept), the load happens, and the trajectories continue from where they were on the new
  weights (their per-token versions then show both versions).
A version older than the one served is not loaded (updates can race: see `update_weights`).
Weights travel into the engine process (vLLM's async engine runs its core in a child process)
through a worker extension, `engine_weights.WeightLoader`: from the object store as packed bytes over vLLM's RPC,
by the learner's collective broadcast received directly inside the engine process, or from the
learner's shared-memory region mapped by the engine process (a generator on learner rank 0's
node; elsewhere the same update carries an object-store reference, decided by Ray node id). The
extension fingerprints what it received (`weight_sync.fingerprint`) and refuses to load weights
whose fingerprint differs from the publication's checksum; the generator then reports the version,
budget and that checksum (`served_policy`).

Behaviour log-probs are those of the distribution sampled from (vLLM `processed_logprobs`:
temperature applied, top-p renormalised); `compute_logprobs` returns raw (temperature 1) prompt
log-probs. What this module does not do: decide what to generate (the rollout worker and the
scheduler do) or score anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cir_actors.config import Config, ConfigError
from cir_actors.generation.engine_weights import EXTENSION, WeightMismatchError, pack_tensor
from cir_actors.generation.rollout import Delta, RolloutLimits, SegmentEnd, run_rollout
from cir_actors.learning.shared_weights import local_node_id
from cir_actors.learning.weight_sync import fingerprint
from cir_actors.types import (
    GroupRequest,
    Interpreter,
    PartialTrajectory,
    PolicyUpdate,
    ServedPolicy,
    Task,
    Trajectory,
)

log = logging.getLogger(__name__)

class _HFCodec:
    """The model's tokenizer as rollout.TokenCodec (no special tokens added or shown)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


class _EngineStream:
    """One engine request streamed as rollout Deltas (see rollout.SegmentStream)."""

    def __init__(self, gen: Generator, request_id: str, version: int, token_ids: Sequence[int], params: Any) -> None:
        self._gen = gen
        self.request_id = request_id
        self.version = version
        self._token_ids = list(token_ids)
        self._params = params
        self._outputs: Any = None
        self._closed = False

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Delta]:
        from vllm.inputs import TokensPrompt

        if self.request_id in self._gen._interrupted:  # an update began between open and first read
            yield Delta([], [], "", SegmentEnd.INTERRUPTED)
            return
        self._outputs = self._gen._engine.generate(
            TokensPrompt(prompt_token_ids=self._token_ids), self._params, self.request_id
        )
        with self._gen._engine_owes():
            async for out in self._outputs:
                self._gen._engine_progress_t = time.monotonic()
                c = out.outputs[0]
                ids = list(c.token_ids)
                logprobs = [lp[t].logprob for t, lp in zip(ids, c.logprobs or [], strict=True)] if ids else []
                end = None
                if out.finished:
                    end = self._gen._segment_end(self.request_id, c.finish_reason)
                yield Delta(ids, logprobs, c.text, end)
                if end is not None:
                    return

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._outputs is not None:
                await self._outputs.aclose()  # aborts the request when it has not finished
        finally:
            self._gen._release(self.request_id)


class _SamplerWith:
    """The generator's sampler with some SamplingParams fields changed (one trajectory's)."""

    def __init__(self, gen: Generator, changes: dict[str, Any]) -> None:
        self._gen, self._changes = gen, changes

    async def open(self, token_ids: Sequence[int], max_tokens: int) -> _EngineStream:
        return await self._gen.open(token_ids, max_tokens, **self._changes)


class Generator:
    """A vLLM engine with many multi-turn trajectories in flight (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        model_path: str | Path,
        interpreter: Interpreter,
        *,
        name: str = "generator-0",
        broadcast_rank: int | None = None,
        sampling_overrides: dict[str, Any] | None = None,
    ) -> None:
        """`broadcast_rank`: this engine's rank in the learner's weight broadcast group (default:
        1 + the number ending `name`). `sampling_overrides`: extra vLLM SamplingParams fields for
        every request (e.g. a logit_bias in a benchmark)."""
        self.cfg = cfg
        self.name = name
        self._interpreter = interpreter
        from cir_actors.data.model_setup import check_window, ensure_local, hf_overrides

        self._model_path = _check_model_dir(ensure_local(model_path, cfg))
        check_window(cfg, self._model_path)
        self._hf_overrides = hf_overrides(cfg, self._model_path)
        match = re.search(r"(\d+)$", name)
        self._broadcast_rank = broadcast_rank if broadcast_rank is not None else 1 + int(match.group(1) if match else 0)
        self._sampling_overrides = dict(sampling_overrides or {})
        gcfg = cfg.generator
        if cfg.model.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(gcfg.cpu_kv_cache_gb))))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        self._codec = _HFCodec(self.tokenizer)
        self._limits = RolloutLimits(
            max_response_tokens=gcfg.max_response_tokens,
            output_max_chars=cfg.interpreter.output_max_chars,
            use_sessions=cfg.interpreter.sessions,
            partial_every_tokens=gcfg.partial_every_tokens,
            stop_at_answer=gcfg.stop_at_answer,
        )
        from cir_actors.sandbox.pool import format_output

        self._format_output = format_output
        t0 = time.perf_counter()
        self._engine = self._start_engine()
        log.info("%s: vLLM engine for %s up in %.1f s", name, self._model_path, time.perf_counter() - t0)

        self._version = 0
        self._incarnation = 0  # of the updates this engine accepts (types.PolicyUpdate.incarnation)
        self._budget = cfg.scheduler.budget_at(0)
        self._checksum = ""  # '' until the first update: the weights the engine started with
        self._ids = itertools.count()
        self._active: set[str] = set()  # engine requests running now
        self._rollout_requests: set[str] = set()  # of those, the rollouts' (an interrupt aborts these)
        self._interrupted: set[str] = set()  # of those, aborted by the current weight update
        self._trajectories = 0
        self._open = asyncio.Event()  # new engine requests may start (cleared by an interrupting update)
        self._admit = asyncio.Event()  # new trajectories may start (cleared by a finishing update)
        self._no_requests = asyncio.Event()
        self._no_trajectories = asyncio.Event()
        for ev in (self._open, self._admit, self._no_requests, self._no_trajectories):
            ev.set()
        self._update_lock = asyncio.Lock()
        self.stats = {"requests": 0, "interrupted_requests": 0, "updates": 0, "update_s": 0.0}
        self._engine_owed = 0  # requests and weight loads waiting on the engine process now
        self._engine_progress_t = time.monotonic()  # when it last answered one of them

    @contextlib.contextmanager
    def _engine_owes(self) -> Iterator[None]:
        """Around a wait on the engine process (a request's outputs, a weight load): see `engine_silent_s`."""
        if self._engine_owed == 0:
            self._engine_progress_t = time.monotonic()
        self._engine_owed += 1
        try:
            yield
        finally:
            self._engine_owed -= 1
            self._engine_progress_t = time.monotonic()

    def engine_silent_s(self) -> float:
        """Seconds the engine process has produced nothing while something waits on it (0 when
        nothing does): a request's next output, or a weight load other than a broadcast. The actor
        can answer its health check while its engine core is stopped or wedged; this is how the
        driver tells (`recovery.generator_hang_s`)."""
        return time.monotonic() - self._engine_progress_t if self._engine_owed else 0.0

    def _start_engine(self) -> Any:
        check_vllm_api()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        gcfg, mcfg = self.cfg.generator, self.cfg.model
        max_len = gcfg.max_prompt_tokens + gcfg.max_response_tokens
        args = AsyncEngineArgs(
            model=self._model_path,
            dtype=mcfg.dtype,
            max_model_len=max_len,
            enforce_eager=gcfg.enforce_eager,
            seed=gcfg.seed,
            max_num_seqs=gcfg.max_inflight_trajectories,
            tensor_parallel_size=gcfg.tensor_parallel_size,
            gpu_memory_utilization=gcfg.gpu_memory_utilization,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            disable_log_stats=True,
            hf_overrides=self._hf_overrides,  # the window settings, as the learner loads them
        )
        # Returned without a local: vLLM keeps a reference to this frame, and a local would keep the
        # engine alive past shutdown (its __del__ then runs at interpreter exit, on torn-down modules).
        return AsyncLLM.from_engine_args(args)

    # ----------------------------------------------------------------------------- rollouts
    async def rollout(
        self, task: Task, sample_index: int, budget: int, *, sampling: dict[str, Any] | None = None,
        resume: PartialTrajectory | None = None,
        on_partial: Callable[[PartialTrajectory], Awaitable[None]] | None = None,
    ) -> Trajectory:
        """One multi-turn trajectory of `task` with `budget` interpreter calls. `sampling`: vLLM
        SamplingParams fields for this trajectory only (e.g. an evaluation's temperature).
        `resume` / `on_partial`: continue a partial trajectory / receive this one's at each segment
        boundary (`rollout.run_rollout`)."""
        if len(task.prompt_token_ids) > self.cfg.generator.max_prompt_tokens:
            raise ValueError(
                f"task '{task.task_id}': the prompt is {len(task.prompt_token_ids)} tokens, over "
                f"generator.max_prompt_tokens={self.cfg.generator.max_prompt_tokens}"
            )
        if sampling and {"n", "max_tokens", "output_kind"} & set(sampling):
            raise ValueError("rollout sampling may not set n, max_tokens or output_kind "
                             "(generator.max_response_tokens limits a response)")
        while not self._admit.is_set():
            await self._admit.wait()
        self._trajectories += 1
        self._no_trajectories.clear()
        sampler = self if not sampling else _SamplerWith(self, sampling)
        try:
            return await run_rollout(
                task, sample_index, budget, sampler=sampler, interpreter=self._interpreter, codec=self._codec,
                format_output=self._format_output, limits=self._limits, resume=resume, on_partial=on_partial,
            )
        finally:
            self._trajectories -= 1
            if self._trajectories == 0:
                self._no_trajectories.set()

    async def generate_group(self, request: GroupRequest) -> list[Trajectory]:
        """The n rollouts of one admitted prompt group, run concurrently."""
        return list(await asyncio.gather(*(self.rollout(request.task, i, request.budget) for i in range(request.n))))

    async def open(self, token_ids: Sequence[int], max_tokens: int, **changes: Any) -> _EngineStream:
        """rollout.SegmentSampler: start one model segment (waits while an update is loading)."""
        rid = await self._enter(rollout=True)
        return _EngineStream(self, rid, self._version, token_ids, self._params(max_tokens, **changes))

    def _params(self, max_tokens: int, **changes: Any) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        fields: dict[str, Any] = {
            "n": 1, "temperature": self.cfg.generator.temperature, "top_p": self.cfg.generator.top_p,
            "max_tokens": max_tokens, "logprobs": 0, "output_kind": RequestOutputKind.DELTA,
        }
        fields.update(self._sampling_overrides)
        fields.update(changes)
        return SamplingParams(**fields)

    async def _enter(self, *, rollout: bool) -> str:
        """A new engine request id, once no weight load is in progress; the load waits for it."""
        while not self._open.is_set():
            await self._open.wait()
        rid = f"{self.name}-{next(self._ids)}"
        self._active.add(rid)
        if rollout:
            self._rollout_requests.add(rid)
        self._no_requests.clear()
        self.stats["requests"] += 1
        return rid

    def _release(self, rid: str) -> None:
        self._active.discard(rid)
        self._rollout_requests.discard(rid)
        if not self._active:
            self._no_requests.set()

    def _segment_end(self, rid: str, finish_reason: str | None) -> SegmentEnd:
        if finish_reason == "stop":
            return SegmentEnd.STOP
        if finish_reason == "length":
            return SegmentEnd.LENGTH
        if rid in self._interrupted:
            self.stats["interrupted_requests"] += 1
            return SegmentEnd.INTERRUPTED
        return SegmentEnd.ABORTED

    # ------------------------------------------------------------------------ weight updates
    async def update_weights(self, update: PolicyUpdate) -> ServedPolicy:
        """Load `update`'s weights into the running engine, reset the prefix cache, and record its
        version, budget and checksum (in-flight trajectories per `generator.update_policy`)."""
        async with self._update_lock:
            t0 = time.perf_counter()
            if update.incarnation < self._incarnation:
                # From the run's stateful roles before a resume that kept this engine (`retire`):
                # its version numbers belong to weights the resumed run no longer has.
                log.info("%s: version %d of incarnation %d not loaded: incarnation %d is served", self.name,
                         update.version, update.incarnation, self._incarnation)
                return self.served_policy()
            if update.incarnation > self._incarnation:  # versions are ordered within an incarnation only
                self._incarnation, self._version = update.incarnation, -1
            if update.version < self._version:
                # Superseded: a newer version was loaded while this one waited for the lock. Loading
                # it would take the engine back to older weights than the scheduler was told it
                # serves. (A generator restarted with a resume gets its initial update from its own
                # run loop and newer versions from the scheduler; once, in CI, the pushes came first
                # and the initial update then took both generators back: never admitted again.)
                log.info("%s: version %d not loaded: version %d is served already", self.name, update.version,
                         self._version)
                return self.served_policy()
            if update.weights is None and update.broadcast_group is None and update.shared_memory is None:
                # Nothing to load: a budget (or version) change only.
                self._version, self._budget = update.version, update.budget
                return self.served_policy()
            interrupt = self.cfg.generator.update_policy == "interrupt"
            if interrupt:
                self._open.clear()
                while self._active:
                    ids = list(self._rollout_requests)
                    self._interrupted.update(ids)
                    if ids:
                        await self._engine.abort(ids)
                    try:  # a request added after the abort was sent is aborted on the next pass
                        await asyncio.wait_for(self._no_requests.wait(), timeout=0.2)
                    except TimeoutError:
                        pass
            else:
                self._admit.clear()
                await self._no_trajectories.wait()
                self._open.clear()
                await self._no_requests.wait()  # one-off requests (sample, compute_logprobs) finish
            try:
                # A broadcast load waits on the learner and every other generator, not only on this
                # engine: its silence says nothing about this engine (a stalled broadcast is healed
                # by finding its stuck member, or by the group's deadline).
                owes = self._engine_owes() if update.broadcast_group is None else contextlib.nullcontext()
                with owes:
                    checksum = await self._load(update)
                    await self._engine.reset_prefix_cache()
                self._checksum = checksum
                if update.incarnation == self._incarnation:  # else retired while it loaded: still version -1
                    self._version, self._budget = update.version, update.budget
            except WeightMismatchError:
                raise  # refused before anything was loaded: the old weights are still served
            except BaseException:
                # The engine may hold a partial or unverified load: say so rather than echo the old checksum.
                self._checksum = "unverified"
                log.error("%s: weight update to version %d failed; serving unverified weights", self.name,
                          update.version)
                raise
            finally:
                self._interrupted.clear()
                self._open.set()
                self._admit.set()
            self.stats["updates"] += 1
            self.stats["update_s"] += time.perf_counter() - t0
            log.info("%s: serving version %d (checksum %s) after %.2f s", self.name, self._version, checksum,
                     time.perf_counter() - t0)
            return self.served_policy()

    async def _load(self, update: PolicyUpdate) -> str:
        shm = update.shared_memory
        if shm is not None and (update.weights is None or shm.node_id == local_node_id()):
            if shm.node_id != local_node_id():
                raise WeightMismatchError(
                    f"{self.name}: version {update.version} was published only to shared memory on node "
                    f"{shm.node_id}, and this generator is on node {local_node_id()}; not loaded")
            args = (shm.path, shm.slot, shm.version, [list(t) for t in shm.layout], update.checksum)
            results = await self._engine.collective_rpc("cir_load_shared", args=args)
            for kind, detail in results:
                if kind == "refused":  # nothing loaded: the old weights are still served
                    raise WeightMismatchError(f"{self.name}: version {update.version} not loaded: {detail}")
                if kind != "ok":
                    raise RuntimeError(f"{self.name}: loading version {update.version}: {detail}")
            results = [fp for _, fp in results]
        elif update.broadcast_group is not None:
            kwargs = {"group": update.broadcast_group, "version": update.version, "rank": self._broadcast_rank,
                          "expected": update.checksum}
            results = await self._engine.collective_rpc("cir_receive_broadcast", kwargs=kwargs)
        else:
            weights = update.weights
            if not isinstance(weights, dict):
                weights = await weights  # an ObjectRef: resolved without blocking the event loop
            got = fingerprint(weights.items())
            if update.checksum and got != update.checksum:
                raise WeightMismatchError(
                    f"{self.name}: weights of version {update.version} have fingerprint {got}, "
                    f"the publication says {update.checksum}; not loaded"
                )
            packed = [pack_tensor(name, t) for name, t in weights.items()]
            results = await self._engine.collective_rpc("cir_load_packed", args=(packed, update.checksum))
        if len(set(results)) != 1:
            raise WeightMismatchError(f"engine workers loaded different weights: fingerprints {results}")
        return results[0]

    @property
    def engine(self) -> Any:
        """The underlying vLLM AsyncLLM (benchmarks drive it directly for their baselines)."""
        return self._engine

    def served_policy(self) -> ServedPolicy:
        return ServedPolicy(generator=self.name, version=self._version, budget=self._budget, checksum=self._checksum)

    def served_version(self) -> int:
        return self._version

    def retire(self) -> None:
        """The run's stateful roles are restarting and keep this engine (a resume): serve version
        -1 until the next incarnation's first update, and load no update of this one from now on
        (one its scheduler sent before it died may still arrive)."""
        self._incarnation += 1
        self._version = -1

    # ----------------------------------------------------------------------- helpers for tests
    def forget_version(self) -> None:
        """Serve the loaded weights as version -1 of incarnation 0, so that any update loads next
        (tests that share one engine between learners whose versions each start at 0; see
        `update_weights`)."""
        self._version, self._incarnation = -1, 0

    async def sample(self, token_ids: Sequence[int], max_tokens: int, **params: Any) -> tuple[list[int], list[float]]:
        """One plain request (no tools): the sampled ids and their log-probs (greedy unless
        `temperature` is given). For tests and benchmarks."""
        params.setdefault("temperature", 0.0)
        rid = await self._enter(rollout=False)
        stream = _EngineStream(self, rid, self._version, token_ids, self._params(max_tokens, **params))
        ids: list[int] = []
        logprobs: list[float] = []
        try:
            async for delta in stream:
                ids += delta.token_ids
                logprobs += delta.logprobs
        finally:
            await stream.aclose()
        return ids, logprobs

    async def compute_logprobs(self, token_ids_B: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Raw (temperature 1) log-prob of every token given its prefix, per sequence; entry 0 is 0."""
        from vllm.inputs import TokensPrompt

        async def one(ids: Sequence[int]) -> np.ndarray:
            rid = await self._enter(rollout=False)
            from vllm.sampling_params import RequestOutputKind

            params = self._params(1, temperature=0.0, logprobs=None, prompt_logprobs=0,
                                  output_kind=RequestOutputKind.FINAL_ONLY)
            out = None
            try:
                async for out in self._engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params, rid):
                    pass
            finally:
                self._release(rid)
            lp = np.zeros(len(ids), dtype=np.float32)
            for t, entry in enumerate(out.prompt_logprobs):
                if entry is not None:
                    lp[t] = entry[ids[t]].logprob
            return lp

        return list(await asyncio.gather(*(one(ids) for ids in token_ids_B)))

    def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            # Collect the engine now: left to interpreter exit, its __del__ runs on torn-down modules.
            del engine
            import gc

            gc.collect()


class LocalGenerator:
    """A Generator on an event loop of its own (a daemon thread), for scripts, benchmarks and tests
    that run without Ray: `local.run(local.gen.rollout(task, 0, 2))` blocks until it is done. vLLM's
    async engine binds to the loop it is first used on, so one loop must serve it for its lifetime."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="generator-loop", daemon=True)
        self._thread.start()
        self.gen = Generator(*args, **kwargs)

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def _shutdown() -> None:
            self.gen.shutdown()

        if self.loop.is_running():
            self.run(_shutdown(), timeout=60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


# What this module and generation/engine_weights.py use of vLLM (tested on 0.32; pyproject pins the range).
VLLM_ENGINE_ARGS = ("logprobs_mode", "worker_extension_cls", "hf_overrides", "enable_prefix_caching")
VLLM_ENGINE_METHODS = ("generate", "abort", "collective_rpc", "reset_prefix_cache", "shutdown")


def check_vllm_api() -> None:
    """One sentence naming the first vLLM API the generator needs that the installed vLLM lacks."""
    import dataclasses
    import importlib

    import vllm

    version = getattr(vllm, "__version__", "?")
    need = [("vllm.engine.arg_utils", "AsyncEngineArgs"), ("vllm.v1.engine.async_llm", "AsyncLLM"),
            ("vllm.inputs", "TokensPrompt"), ("vllm.sampling_params", "RequestOutputKind"),
            ("vllm", "SamplingParams")]
    found: dict[str, Any] = {}
    for module, name in need:
        try:
            found[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise RuntimeError(f"vLLM {version} has no {module}.{name}, which the generator uses "
                               "(install the range pinned in pyproject.toml)") from None
    fields = {f.name for f in dataclasses.fields(found["AsyncEngineArgs"])}
    for name in VLLM_ENGINE_ARGS:
        if name not in fields:
            raise RuntimeError(f"vLLM {version}: AsyncEngineArgs has no field '{name}', which the generator "
                               "uses (install the range pinned in pyproject.toml)")
    for name in VLLM_ENGINE_METHODS:
        if not callable(getattr(found["AsyncLLM"], name, None)):
            raise RuntimeError(  # noqa: TRY004 - a missing API, not a type error of ours
                f"vLLM {version}: AsyncLLM has no method '{name}', which the generator "
                "uses (install the range pinned in pyproject.toml)")
    if not hasattr(found["RequestOutputKind"], "DELTA"):
        raise RuntimeError(f"vLLM {version}: RequestOutputKind has no DELTA, which the generator streams with")


def _check_model_dir(path: str | Path) -> str:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"model path '{p}' is not a Hugging Face model directory (no config.json)")
    return str(p)
