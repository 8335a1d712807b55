"""The one typed configuration tree, validated once at load.

Defaults are the tiny CPU setting (`configs/tiny_cpu.yaml` is empty of anything but what differs);
`configs/qwen2.5-math-7b.yaml` carries the CIR paper's recipe. Load with `load_config(path,
overrides)`; a bad file, key or value raises `ConfigError` with one sentence naming the key, the
value and what was expected. This module does not start anything: it only describes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the user in one sentence."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class TinyModelConfig(Section):
    """The locally built Qwen2-architecture model (no hub needed)."""

    hidden_size: int = Field(128, ge=8)
    """Width of the residual stream."""
    num_layers: int = Field(2, ge=1)
    """Transformer blocks."""
    num_heads: int = Field(4, ge=1)
    """Attention heads (query)."""
    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = Field(256, ge=8)
    """Width of the MLP."""
    vocab_size: int = Field(512, ge=300)
    """Target BPE vocabulary size (bytes + merges + special tokens)."""
    max_position_embeddings: int = Field(1024, ge=64)
    """Longest sequence the model supports."""
    seed: int = 0
    """Seed for the tokenizer corpus and the random init."""


class ModelConfig(Section):
    path: str | None = None
    """Hugging Face model directory. None builds (or reuses) the tiny model in `cache_dir`."""
    cache_dir: str = ".cache/models"
    """Where the tiny model is built and reused (relative paths are relative to the project root)."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Shape of the tiny model, used when `path` is None."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype for inference and training weights."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where generators and learners run."""
    use_chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template (False: the raw CIR string, as CIR evaluated Qwen2.5-Math)."""
    hub_cache_dir: str = "/tmp/cir-actors/hub"
    """Where a hub id in `path` is downloaded: one directory per node, shared by every role on it."""
    max_position_embeddings: int | None = Field(None, ge=64)
    """Override of config.json's max_position_embeddings (the window), applied identically in the
    vLLM engine (hf_overrides) and the learner's model load; None keeps the model's."""
    rope_parameters: dict[str, Any] | None = None
    """RoPE settings merged over the model's (transformers>=5 `rope_parameters`: rope_type,
    rope_theta, factor, original_max_position_embeddings), applied identically in engine and
    learner; e.g. {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 4096}."""


class DataConfig(Section):
    source: Literal["synthetic", "file"] = "synthetic"
    """Synthetic arithmetic tasks, or a jsonl/parquet file."""
    train_path: str | None = None
    """Training file (source=file)."""
    eval_path: str | None = None
    """Held-out file (source=file); None: no held-out tasks from a file."""
    problem_field: str | None = None
    """Field holding the problem (None: infer from known benchmark layouts)."""
    answer_field: str | None = None
    """Field holding the gold answer (None: infer; boxed answers inside a solution are extracted)."""
    num_train: int = Field(4000, ge=1)
    """Synthetic training problems."""
    num_eval: int = Field(200, ge=1)
    """Synthetic held-out problems."""
    kinds: list[
        Literal["mul", "powmod", "product", "modpow", "range_sum", "square_sum", "count_divisible",
                "digit_sum_power", "arith_series"]
    ] | None = ["mul", "powmod"]
    """Synthetic task kinds (None: all). The default two are what the tiny demo model learns in
    minutes; the others (longer numbers, several wordings) are harder (cir_actors/data/tasks.py)."""
    seed: int = 0
    """Seed for the synthetic task generator and for shuffling."""
    shuffle: bool = True
    """Shuffle training tasks each epoch (deterministically from seed and epoch)."""


class GeneratorConfig(Section):
    num_generators: int = Field(1, ge=1)
    """vLLM engines, one Ray actor each."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per generator actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per generator actor (0 on CPU)."""
    samples_per_prompt: int = Field(8, ge=1)
    """n: samples per prompt, the GRPO group size."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling."""
    max_prompt_tokens: int = Field(256, ge=8)
    """Prompts longer than this are rejected at load."""
    max_response_tokens: int = Field(256, ge=8)
    """Response limit; interpreter tokens count toward it (as in CIR)."""
    stop_at_answer: bool = False
    """End a response at the close of its first \\boxed{...} outside a code block (the engine request
    is aborted there, as at a block's close): nothing after the answer is sampled, scored or trained.
    Off: the model ends its response itself (EOS), as in CIR. docs/algorithms.md, "Stop at the answer"."""
    max_inflight_trajectories: int = Field(64, ge=1)
    """Trajectories one engine runs at once."""
    update_policy: Literal["finish", "interrupt"] = "finish"
    """On a weight update: finish in-flight trajectories on the old weights, or interrupt them at a
    token boundary and continue on the new weights."""
    continue_partials: bool = True
    """Stream each unfinished trajectory to the buffer at its segment boundaries (after an interpreter
    call, at an interruption, every `partial_every_tokens`), so that when its generator dies or the run
    resumes from a checkpoint another generator continues it instead of starting over."""
    partial_every_tokens: int = Field(0, ge=0)
    """Also stream the partial every this many tokens inside a model segment (the engine request goes
    on; each costs one actor call and a copy of the trajectory so far); 0: only at interpreter calls
    and interruptions."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """vLLM GPU memory share (GPU only)."""
    cpu_kv_cache_gb: float = Field(1.0, gt=0)
    """vLLM CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: bool = True
    """Skip CUDA graphs / compilation (faster start on CPU and for small models)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Tensor parallelism per engine."""
    seed: int = 0
    """Engine sampling seed."""


class ExecCacheConfig(Section):
    """The interpreter pool's execution cache (docs/sandbox.md, "Execution cache")."""

    enabled: bool = False
    """Reuse the result of a program this pool already ran to completion (opt-in: a program whose
    output depends on time or randomness gets the cached output)."""
    max_entries: int = Field(4096, ge=1)
    """Results kept (least recently used go first)."""
    max_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Bytes kept: output, error text and the 32-byte key of each entry."""


class InterpreterConfig(Section):
    num_pools: int = Field(1, ge=1)
    """Interpreter pool actors."""
    num_cpus: float = Field(0.5, gt=0)
    """CPUs reserved per pool actor."""
    max_workers: int = Field(8, ge=1)
    """Concurrent sandboxed executions per pool."""
    timeout_s: float = Field(5.0, gt=0)
    """Wall-clock limit per call."""
    memory_mb: int = Field(1024, ge=64)
    """Address-space limit per call."""
    cpu_time_s: int = Field(10, ge=1)
    """CPU-time limit per call."""
    max_output_bytes: int = Field(65536, ge=256)
    """Output kept from a call; a child that writes more is killed."""
    max_processes: int = Field(16, ge=1)
    """Processes a call may create."""
    output_max_chars: int = Field(400, ge=16)
    """Characters of output put back into the model's context (CIR: 400, head and tail kept)."""
    sessions: bool = False
    """Keep variables across a trajectory's blocks (opt-in; CIR runs each block alone)."""
    repl_last_expression: bool = False
    """When a block prints nothing and ends with a bare expression, show that expression's value
    (CIR's executor, ToRA's rule; the paper recipe turns it on)."""
    session_idle_s: float = Field(60.0, gt=0)
    """A session child idle this long is reaped."""
    max_sessions: int = Field(64, ge=1)
    """Live sessions per pool."""
    allow_weaker_isolation: bool = False
    """Start even when an isolation layer cannot be applied (the missing layers are logged)."""
    cache: ExecCacheConfig = ExecCacheConfig()
    """Execution cache shared by every caller of the pool (the samples of a group, across steps)."""


class ScorerConfig(Section):
    num_scorers: int = Field(1, ge=1)
    """Scorer actors."""
    num_cpus: float = Field(0.25, gt=0)
    """CPUs reserved per scorer actor."""
    timeout_s: float = Field(5.0, gt=0)
    """Deadline for one equivalence check."""
    num_workers: int = Field(2, ge=1)
    """Warm math-verify worker processes per scorer (a timed-out worker is killed and replaced)."""
    reward_correct: float = 1.0
    """Training reward for a correct answer (CIR: +1)."""
    reward_wrong: float = -1.0
    """Training reward for anything else (CIR: -1)."""
    reward_truncated: float | None = None
    """Training reward for a response cut by the response limit (finish reason `length`), whatever its
    answer; None (CIR) scores it like any other. DAPO (arXiv:2503.14476, section 3.4) penalises
    truncation so that a correct answer followed by rambling is not reinforced. On the demo it did
    not stop that drift (one run, -9.5 points; docs/algorithms.md)."""


class BufferConfig(Section):
    num_cpus: float = Field(0.1, gt=0)
    """CPUs reserved for the buffer actor."""
    max_buffered_groups: int = Field(1024, ge=1)
    """Hard cap on complete groups held."""
    drop_zero_advantage_groups: bool = False
    """Drop groups whose rewards are all equal before they reach the learner (counted)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling, asynchronous: drop zero-variance groups (as drop_zero_advantage_groups)
    and let the scheduler admit ahead by the measured zero-variance rate so batches stay full without
    the learner waiting (cir_actors/control/sampling.py). Dropped prompts count as consumed."""
    void_turn_filter: bool = False
    """SimpleTIR's filter: trajectories whose last turn produced neither a closed code block nor a
    final answer are left out of the policy update (advantages still use the whole group). Void
    trajectories are counted by reason (train/void_truncated, train/void_no_answer in metrics.jsonl)
    whether or not they are filtered."""
    zero_variance_ema: float = Field(0.3, gt=0, le=1)
    """dynamic_sampling: weight of the newest serve in the zero-variance rate's moving average."""
    max_oversample: float = Field(3.0, ge=1)
    """dynamic_sampling: cap of the admission factor 1 / (1 - zero-variance rate)."""

    @property
    def drops_zero_variance(self) -> bool:
        """Whether the buffer drops zero-variance groups (either option asks for it)."""
        return self.drop_zero_advantage_groups or self.dynamic_sampling


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    """DeepSpeed data-parallel ranks, one Ray actor each."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per rank."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per rank."""
    backend: Literal["gloo", "nccl"] = "gloo"
    """torch.distributed backend."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    zero3_persistence_threshold: int = Field(100_000, ge=0)
    """ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed's
    stage3_param_persistence_threshold); 0 partitions every parameter."""
    bf16: bool = False
    """Train in bf16 (fp32 master weights)."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate (the peak, under a `lr_schedule` other than constant)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """How the RL learning rate moves over `scheduler.total_steps`: after `lr_warmup_steps` steps of
    linear warm-up, constant at `lr`, or a cosine decay from `lr` to `lr * lr_min_ratio` at the last
    step (the final weights then come from small steps). A function of the step: a resume continues it."""
    lr_warmup_steps: int = Field(0, ge=0)
    """RL steps of linear warm-up: step s < this trains at `lr * s / lr_warmup_steps` (s from 1)."""
    lr_min_ratio: float = Field(0.0, ge=0, le=1)
    """Under `lr_schedule: cosine`, the last step's learning rate as a fraction of `lr`."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient-norm clip."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompt groups per training step (the batch)."""
    mini_batch_prompts: int = Field(8, ge=1)
    """Prompt groups per optimizer update; prompts_per_step / mini_batch_prompts updates per step."""
    micro_batch_tokens: int = Field(8192, ge=64)
    """Token budget of one forward/backward micro-batch."""
    packing: bool | None = None
    """Pack a micro-batch's trajectories into one row with no padding (first fit, longest first, up
    to micro_batch_tokens real tokens); attention stays inside each trajectory (position ids restart
    per trajectory, from which transformers builds a block-causal mask, or flash-attention's varlen
    kernel under `attn_implementation: flash_attention_2`). False: right-padded rows, rows x longest
    <= micro_batch_tokens. Same loss and gradients either way (tests/learning/test_packing.py).
    None (default): on with flash_attention_2 only. Any other kernel computes the whole
    [tokens, tokens] attention of the packed row: on CPU (sdpa) the demo's batch (128 trajectories
    of 100-200 tokens, micro-batches of 8192) took 9.6-10.8 s packed against 1.4-3.7 s padded."""
    attn_implementation: str | None = None
    """The learner's attention kernel (transformers' `attn_implementation`): None is transformers'
    default (sdpa); `flash_attention_2` on GPUs with the flash-attn package (packed rows then need
    no [tokens x tokens] mask)."""
    clip_low: float = Field(0.2, ge=0, lt=1)
    """PPO ratio clip below 1."""
    clip_high: float = Field(0.28, ge=0)
    """PPO ratio clip above 1 (clip-higher)."""
    correction: Literal["tis", "mis", "icepop", "seq_tis", "geo_mask"] = "tis"
    """Off-policy correction between the generator's (behaviour) and the learner's proximal log-probs
    (cir_actors/learning/loss.py `correction_weights`, docs/algorithms.md): token truncated IS (tis), token
    masked IS above is_cap (mis), IcePop's two-sided band mask (icepop), sequence truncated IS
    (seq_tis), or whole-sequence rejection by the geometric-mean ratio (geo_mask)."""
    is_cap: float = Field(5.0, ge=1)
    """Cap of the importance weight exp(proximal - behaviour): truncation (tis, seq_tis) or mask (mis)."""
    is_band: tuple[float, float] = (0.5, 5.0)
    """icepop: tokens whose ratio leaves [low, high] get no gradient (Ring-1T: [0.5, 5])."""
    geo_band: tuple[float, float] = (0.999, 1.001)
    """geo_mask: sequences whose geometric-mean ratio leaves [low, high] get no gradient (verl: 0.999-1.001)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant for negative advantages (CIR: 3.0); None disables."""
    advantage: Literal["grpo", "mean", "reinforce_pp"] = "grpo"
    """GRPO (R-mean)/(std+eps), mean-only (Dr. GRPO), or REINFORCE++-baseline."""
    kl_coef: float = Field(0.0, ge=0)
    """KL penalty against the reference model (CIR: 0)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus (CIR: 0)."""
    entropy_groups: Literal["all", "informative"] = "all"
    """Which samples the entropy bonus is taken over. all: every sample, so the groups whose rewards
    were all equal (advantage 0) are run and trained for the bonus alone, and their tokens count in
    the token mean. informative: only samples with a nonzero advantage, so those groups are skipped
    as they are without a bonus (a cheaper update; the same token mean as without a bonus)."""
    publish: Literal["object_store", "broadcast", "shared_memory"] = "object_store"
    """How new weights reach the generators. shared_memory: a region under /dev/shm on learner rank
    0's node that generators there load from (the object store for a generator on another node);
    CPU only."""
    save_every: int = Field(10, ge=0)
    """Checkpoint every N steps (0: only at the end). A checkpoint is a consistent cut of learner,
    buffer and scheduler; an automatic recovery resumes from the latest one."""
    gradient_checkpointing: bool | None = None
    """Recompute each transformer block's activations in the backward instead of keeping them
    (HF gradient checkpointing; same gradients, ~1 more forward of time). None (default): on when
    model.device is cuda, off on CPU (where the tiny models' activations are small)."""
    logprob_chunk_tokens: int = Field(4096, ge=0)
    """Positions per chunk of LM head + log-softmax (checkpointed): no full [tokens, vocab] logits
    or fp32 copy is held. 0: the model's full logits (also used under ZeRO-3)."""
    entropy_sample_tokens: int = Field(256, ge=0)
    """With entropy_coef 0, the entropy diagnostic is computed on at most this many evenly spaced
    trained tokens per micro-batch (0: not computed)."""
    seed: int = 0
    """Seed for init of the training RNGs."""


class SchedulerConfig(Section):
    num_cpus: float = Field(0.1, gt=0)
    """CPUs reserved for the scheduler actor."""
    total_steps: int = Field(50, ge=1)
    """Training steps (learner versions) to run."""
    max_staleness: int = Field(1, ge=0)
    """Versions by which trained data may lag the learner (0: synchronous on-policy)."""
    roc: bool = False
    """GRPO-RoC (rStar2-Agent): generate roc_oversample x samples_per_prompt per prompt, then keep
    samples_per_prompt: failures at random, successes with the fewest tool errors and cleanest answer
    format, in the group's proportions (cir_actors/control/sampling.py)."""
    roc_oversample: float = Field(2.0, ge=1)
    """GRPO-RoC: over-sampling factor of each group (rStar2-Agent: 2)."""
    budget_schedule: list[tuple[int, int]] = [(0, 2)]
    """(from_step, tool-call budget) pairs; CIR: [[0, 2], [100, 3], [200, 4]]."""

    def budget_at(self, step: int) -> int:
        """The tool-call budget in force at `step`."""
        budget = self.budget_schedule[0][1]
        for from_step, b in self.budget_schedule:
            if step >= from_step:
                budget = b
        return budget


class LoggingConfig(Section):
    run_dir: str = "runs/latest"
    """Where the resolved config, metrics.jsonl, checkpoints and plots go (outside the job upload)."""
    wandb_project: str | None = None
    """W&B project; None logs offline under run_dir."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode (online needs WANDB_API_KEY in the environment)."""
    progress: bool = True
    """Print a live progress line per step."""


class RecoveryConfig(Section):
    """The failure policy (cir_actors/control/failures.py owns it; docs/failures.md tells what a user sees)."""

    max_recoveries: int = Field(3, ge=0)
    """Automatic resumes from the latest checkpoint after a stateful role (learner rank, buffer,
    scheduler) died; 0 ends the run at the first such death."""
    max_generator_restarts: int = Field(10, ge=0)
    """Generator restarts in place per run (in-flight groups released, weights re-sent)."""
    stateless_max_restarts: int = Field(100, ge=0)
    """Ray restarts of each interpreter pool and scorer actor."""
    call_retries: int = Field(2, ge=0)
    """Retries of an interpreter call or verdict that failed for infrastructure reasons (on another
    replica when there is one); then the trajectory is dropped with reason `infra`."""
    interpreter_call_s: float = Field(60.0, gt=0)
    """How long an interpreter call may go unanswered beyond its own time limit (queueing in the pool
    included) before it counts as an infrastructure fault and is retried like one (a session's call
    cannot be: its trajectory is dropped with reason `infra`). It bounds how long a lost call holds
    its trajectory and a weight update waiting for that trajectory; on the demo once, 26 calls went
    unanswered until the former fixed 300 s passed (docs/failures.md)."""
    push_retries: int = Field(2, ge=0)
    """Retries of a failed weight push to a live generator; then the run ends naming it."""
    push_timeout_s: float = Field(600.0, gt=0)
    """Deadline of one weight push (a generator finishing its in-flight rollouts first counts)."""
    stall_factor: float = Field(10.0, gt=1)
    """Watchdog: no batch for stall_factor x the median step time is an error..."""
    min_stall_s: float = Field(600.0, gt=0)
    """...but never before this many seconds (the first steps include engine start-up)."""
    call_timeout_s: float = Field(120.0, gt=0)
    """Deadline of the driver's control calls to the scheduler and buffer: one that answers nothing
    this long (a process stopped or wedged) is treated like a dead one — the run's actors are
    restarted and it resumes from its latest checkpoint."""
    learner_timeout_s: float = Field(3600.0, gt=0)
    """Deadline of each call to the learner ranks after their start-up (a step, a publication, a
    checkpoint): a rank that answers nothing this long (a collective stuck, a process stopped) is
    treated like a dead rank — the run's actors are restarted and it resumes from its latest
    checkpoint."""
    learner_startup_timeout_s: float = Field(1800.0, gt=0)
    """Deadline of the learner ranks' start-up (model load, DeepSpeed init). Separate from
    `learner_timeout_s` because the first start on a machine or in a new environment compiles
    DeepSpeed's CPU comm op (~30 s on 2 cores): a short step deadline must not kill that build,
    whose lock file, left behind, would then stall every later start."""
    stateless_hang_s: float = Field(120.0, gt=0)
    """An interpreter pool or scorer that is alive but answers no health check (sent every step)
    this long is killed, and Ray restarts it; meanwhile its calls fail over to the other replicas
    only at their deadlines. Its answers before its first health check are not judged."""
    generator_hang_s: float = Field(300.0, gt=0)
    """A generator that is alive but answers nothing this long (a health check the driver sends
    every step, or the hand-over of a sample the buffer takes) is killed and restarted like a dead
    one. Its answers before it has started serving (engine start-up) are not judged: that is
    `generator_start_s`'s."""
    generator_start_s: float = Field(1800.0, gt=0)
    """Deadline of a generator's start (its vLLM engine's, and its first weights'): one that has not
    asked the scheduler for work this long after it was started or restarted is killed and restarted
    like a dead one. Meanwhile a weight broadcast waiting for it to join is not judged against
    `learner_timeout_s`: that clock starts once every generator serves."""
    max_driver_restarts: int = Field(3, ge=0)
    """`entrypoints/train.py` runs the driver as a child process and starts it again, resuming from
    the latest checkpoint, when it is killed by a signal other than SIGINT/SIGTERM/SIGHUP (the
    kernel's OOM killer, a segfault, `kill -9`); an error it reports is not retried. 0: the driver
    runs in the entrypoint's own process."""


class DumpsConfig(Section):
    """Per-step trajectory dumps for the viewer (`cir_actors/learning/dumps.py`, `entrypoints/view.py`)."""

    per_step: int = Field(8, ge=0)
    """Trajectories dumped per step (stratified: correct, wrong, tool error, truncated); 0 turns dumps off."""
    max_bytes_per_step: int = Field(4_000_000, ge=4096)
    """Size bound of one step's dump file; trajectories past it are left out (and counted)."""


class ClusterConfig(Section):
    address: str | None = None
    """Ray address to join ("auto" for a running cluster); None starts a local Ray."""
    namespace: str = "cir-actors"
    """Ray namespace for the named actors."""
    use_role_resources: bool = False
    """Ask for the custom node resources (generator, learner, interpreter) of ray_cluster.yaml."""


class Config(Section):
    """The whole run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    generator: GeneratorConfig = GeneratorConfig()
    interpreter: InterpreterConfig = InterpreterConfig()
    scorer: ScorerConfig = ScorerConfig()
    buffer: BufferConfig = BufferConfig()
    learner: LearnerConfig = LearnerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    logging: LoggingConfig = LoggingConfig()
    dumps: DumpsConfig = DumpsConfig()
    cluster: ClusterConfig = ClusterConfig()
    recovery: RecoveryConfig = RecoveryConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        lrn, sch = self.learner, self.scheduler
        if lrn.gradient_checkpointing is None:
            lrn.gradient_checkpointing = self.model.device == "cuda"
        if lrn.packing is None:
            lrn.packing = lrn.attn_implementation == "flash_attention_2"
        if lrn.prompts_per_step % lrn.mini_batch_prompts:
            raise ValueError(
                f"learner.prompts_per_step ({lrn.prompts_per_step}) must be a multiple of "
                f"learner.mini_batch_prompts ({lrn.mini_batch_prompts})"
            )
        if lrn.backend == "nccl" and self.model.device != "cuda":
            raise ValueError("learner.backend 'nccl' needs model.device 'cuda'")
        if lrn.bf16 and self.model.dtype == "float16":
            raise ValueError("learner.bf16 with model.dtype 'float16' mixes two half formats")
        for name in ("is_band", "geo_band"):
            low, high = getattr(lrn, name)
            if not 0 < low <= 1 <= high:
                raise ValueError(f"learner.{name} {[low, high]} must satisfy 0 < low <= 1 <= high")
        if lrn.lr_warmup_steps >= sch.total_steps:
            raise ValueError(f"learner.lr_warmup_steps ({lrn.lr_warmup_steps}) must be below scheduler.total_steps "
                             f"({sch.total_steps})")
        steps = [s for s, _ in sch.budget_schedule]
        if not steps or steps[0] != 0 or steps != sorted(set(steps)):
            raise ValueError(
                f"scheduler.budget_schedule {sch.budget_schedule} must start at step 0 with strictly increasing steps"
            )
        if any(b < 0 for _, b in sch.budget_schedule):
            raise ValueError(f"scheduler.budget_schedule {sch.budget_schedule} has a negative budget")
        if self.data.source == "file" and not self.data.train_path:
            raise ValueError("data.train_path must be set when data.source is 'file'")
        if self.generator.tensor_parallel_size > 1 and lrn.publish == "broadcast":
            raise ValueError(
                f"generator.tensor_parallel_size = {self.generator.tensor_parallel_size} with learner.publish "
                "'broadcast' is not supported (every TP worker would join the broadcast group with the same "
                "rank); use learner.publish 'object_store' or tensor_parallel_size 1"
            )
        if lrn.publish == "shared_memory" and self.model.device != "cpu":
            raise ValueError(
                "learner.publish 'shared_memory' is implemented for model.device 'cpu' only (CUDA IPC "
                "handles are not); use learner.publish 'broadcast' or 'object_store' on GPUs"
            )
        if self.generator.samples_per_prompt < 2 and lrn.advantage != "reinforce_pp":
            raise ValueError(
                "generator.samples_per_prompt must be >= 2 for group-normalised advantages (grpo, mean)"
            )
        return self


def _parse_value(text: str) -> Any:
    """A command-line override value: YAML scalars and lists (`1e-6`, `true`, `[[0,2],[100,3]]`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(root)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' (not a field of the config; see cir_actors/config.py)"
    value = first.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and len(first["loc"]) == 0:
        return f"{source}: {msg}"
    return f"{source}: '{key}' = {shown}: {msg}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (None: the defaults) and apply dotted `key=value` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        tree = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, _, text = item.partition("=")
        _set_dotted(tree, key.strip(), _parse_value(text))
        source = f"{source} + overrides"
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written beside a run's outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
