"""Memory and time planner: from a config (and ray_cluster.yaml), per role and per GPU, what the run
needs, and whether it fits.

The model is read from its config.json on the meta device (no weights), so a 7B plan runs anywhere
(`tests/data/qwen2.5-math-7b/config.json` ships for that). Terms, per learner rank:
- weights P x (2 bytes bf16 | 4 fp32), gradients the same (+ DeepSpeed's reduce bucket at stages
  1-2), optimizer state per ZeRO stage (as DeepSpeed's ZeRO-1/2 optimizer holds it: an fp32 master
  copy + Adam m and v + the fp32 gradient partition flattened at the step = 16 bytes/param),
  divided by the ranks from stage 1; gradients divided from stage 2; weights from stage 3;
- activations of one micro-batch (`learner.micro_batch_tokens` tokens): per token and layer the
  tensors a Qwen2 block keeps for its backward (~10 H + 4 I + 3 kv elements, flash/SDPA attention,
  no T^2 term); with gradient checkpointing only each block's input plus one block's recompute;
- with packing (`learner.packing`) and any attention but flash-attention's varlen kernel, the
  [tokens, tokens] bool block-causal mask of the packed row (1 GiB at 32768 tokens) and a
  [tokens, tokens] fp32 tensor per layer kept for the backward (one layer's with checkpointing:
  4 GiB at 32768 tokens), as measured on CPU (sdpa);
- the logits transient: [chunk, vocab] fp32 x 3 (logits, softmax, their gradient) with the chunked
  log-probs, [micro_batch_tokens, vocab] x (dtype + 2 x fp32) without;
- a runtime constant (CUDA context and allocator slack on GPU; the Python/torch/DeepSpeed process
  on CPU, measured on this machine).
Per generator (vLLM): weights, the KV cache for the window x in-flight trajectories (against what
`gpu_memory_utilization` leaves), activations of one scheduler step.
Time per step: FLOPs (6 P per trained token, +2 P with checkpointing, +2 P for a proximal pass when
there is more than one mini-batch; decode bound by reading the weights once per engine step) over
stated peak figures (`GPUS`) at assumed efficiencies. What is measured and what is estimated is in
docs/recipe-7b.md. Not here: CPU roles other than the learner (interpreter, scorer: small).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cir_actors.config import Config, ConfigError

GB = 1024**3

# name: (memory GB, dense bf16 FLOP/s, HBM bytes/s), stated vendor figures.
GPUS: dict[str, tuple[float, float, float]] = {
    "A100-80G": (80, 312e12, 2.04e12),
    "A100-40G": (40, 312e12, 1.56e12),
    "H100-80G": (80, 989e12, 3.35e12),
    "L40S-48G": (48, 362e12, 0.864e12),
    "A10G-24G": (24, 125e12, 0.6e12),
}
INSTANCE_GPUS = {
    "p4de.24xlarge": "A100-80G",
    "p4d.24xlarge": "A100-40G",
    "p5.48xlarge": "H100-80G",
    "g6e": "L40S-48G",
    "g5": "A10G-24G",
}
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
MFU_TRAIN = 0.40  # assumed fraction of peak for the learner's forward/backward
DECODE_EFFICIENCY = 0.5  # assumed fraction of HBM bandwidth per decode step
GPU_RUNTIME_GB = 3.0  # CUDA context + allocator fragmentation (assumed)
# CPU learner process with a ~10 k-parameter model: python, torch, transformers, DeepSpeed, the gloo
# world, the allocator (measured on this machine by `python -m cir_actors.bench.plan_check`, first line).
CPU_RUNTIME_GB = 0.54


@dataclass
class ModelShape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def model_shape(model_dir: str | Path, cfg: Config | None = None) -> ModelShape:
    """Parameter count (meta device: no weights read or allocated) and the dimensions."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    params = sum(p.numel() for p in model.parameters())
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return ModelShape(params, hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, heads,
                      getattr(hf, "num_key_value_heads", heads) or heads, head_dim, hf.vocab_size)


@dataclass
class RolePlan:
    role: str
    device: str
    capacity_gb: float | None
    terms_gb: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total_gb(self) -> float:
        return sum(self.terms_gb.values())

    @property
    def fits(self) -> bool:
        return self.capacity_gb is None or self.total_gb <= self.capacity_gb


def learner_plan(cfg: Config, shape: ModelShape, capacity_gb: float | None = None,
                 device: str | None = None) -> RolePlan:
    """Peak memory of one learner rank during a training step."""
    lcfg = cfg.learner
    device = device or cfg.model.device
    n = lcfg.num_ranks
    P = shape.params
    wb = 2 if lcfg.bf16 else 4
    stage = lcfg.zero_stage
    weights = P * wb / (n if stage >= 3 else 1)
    grads = P * wb / (n if stage >= 2 else 1)
    if stage in (1, 2):  # DeepSpeed's reduce bucket (contiguous gradients), reduce_bucket_size elements
        grads += min(P, REDUCE_BUCKET) * wb
    # fp32 master copy + Adam m, v + the fp32 copy of the gradient partition made at the step
    optim = P * 16 / (n if stage >= 1 else 1)
    tokens = lcfg.micro_batch_tokens
    ab = wb  # activations are in the compute dtype
    per_token_layer = 10 * shape.hidden + 4 * shape.intermediate + 3 * shape.kv_dim
    if lcfg.gradient_checkpointing:
        acts = tokens * shape.hidden * ab * shape.layers + tokens * per_token_layer * ab
    else:
        acts = tokens * per_token_layer * ab * shape.layers
    acts += tokens * shape.hidden * 4 * 2  # final norm output and its fp32 hidden slice for the head
    chunk = lcfg.logprob_chunk_tokens if lcfg.logprob_chunk_tokens > 0 and stage < 3 else tokens
    chunk = min(chunk, tokens)
    logits = chunk * shape.vocab * 4 * 3 if lcfg.logprob_chunk_tokens > 0 and stage < 3 else \
        tokens * shape.vocab * (ab + 4 + 4)
    runtime = GPU_RUNTIME_GB * GB if device == "cuda" else CPU_RUNTIME_GB * GB
    plan = RolePlan("learner rank", device, capacity_gb)
    plan.terms_gb = {
        "weights": weights / GB,
        "gradients": grads / GB,
        f"optimizer (ZeRO-{stage}, {n} ranks)": optim / GB,
        "activations" + (" (checkpointed)" if lcfg.gradient_checkpointing else ""): acts / GB,
        "logits transient": logits / GB,
        "runtime": runtime / GB,
    }
    if lcfg.packing and lcfg.attn_implementation != "flash_attention_2":
        # one packed row of `tokens` and no varlen kernel: transformers' [tokens, tokens] bool mask,
        # and a [tokens, tokens] fp32 tensor per layer kept for the backward (one layer's with
        # checkpointing), as measured by plan_check on CPU
        kept = 1 if lcfg.gradient_checkpointing else shape.layers
        plan.terms_gb["attention (packed row, no varlen kernel)"] = tokens * tokens * (1 + 4 * kept) / GB
    if cfg.learner.kl_coef > 0:
        plan.terms_gb["reference model"] = P * 2 / GB
    return plan


def generator_plan(cfg: Config, shape: ModelShape, window: int, capacity_gb: float | None) -> RolePlan:
    g = cfg.generator
    wb = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    tp = g.tensor_parallel_size
    weights = shape.params * wb / tp
    kv_per_token = 2 * shape.layers * shape.kv_dim * wb / tp
    need_tokens = g.max_inflight_trajectories * (g.max_prompt_tokens + g.max_response_tokens)
    kv_all = need_tokens * kv_per_token
    step_tokens = max(2048, min(8192, g.max_inflight_trajectories))
    acts = step_tokens * (shape.vocab * 4 + (shape.intermediate * 2 + shape.hidden * 4) * wb)
    plan = RolePlan("generator (vLLM)", cfg.model.device, capacity_gb)
    plan.terms_gb = {"weights": weights / GB, "activations (one step)": acts / GB,
                     "runtime": (GPU_RUNTIME_GB if cfg.model.device == "cuda" else 0.5)}
    if capacity_gb is not None and cfg.model.device == "cuda":
        budget = capacity_gb * g.gpu_memory_utilization - plan.total_gb
        seq = g.max_prompt_tokens + g.max_response_tokens
        full = int(max(budget, 0) * GB // (kv_per_token * seq))
        plan.terms_gb["KV cache (vLLM takes what is left)"] = max(budget, 0.0)
        plan.capacity_gb = capacity_gb * g.gpu_memory_utilization
        plan.notes.append(
            f"KV cache {kv_per_token / 1024:.0f} KiB/token; {g.max_inflight_trajectories} trajectories x "
            f"{g.max_prompt_tokens + g.max_response_tokens} tokens would need {kv_all / GB:.1f} GB, "
            f"{max(budget, 0):.1f} GB hold {full} at full length at once (vLLM preempts beyond)")
        if budget * GB < kv_per_token * seq:  # not even one full-length trajectory: does not fit
            plan.terms_gb["KV cache (vLLM takes what is left)"] = kv_per_token * seq / GB
    else:
        plan.terms_gb["KV cache"] = min(kv_all, cfg.generator.cpu_kv_cache_gb * GB) / GB
    return plan


def step_time(cfg: Config, shape: ModelShape, gpu: str | None, mean_response_frac: float = 0.5,
              kv_budget_gb: float | None = None) -> dict[str, float]:
    """Seconds per training step (estimates): learner compute and generation of one step's groups."""
    if gpu is None:
        return {}
    _, flops, bw = GPUS[gpu]
    g, lcfg = cfg.generator, cfg.learner
    seqs = lcfg.prompts_per_step * g.samples_per_prompt
    tokens = seqs * (g.max_prompt_tokens * 0.3 + g.max_response_tokens * mean_response_frac)
    per_tok = 6 + (2 if lcfg.gradient_checkpointing else 0) + (
        2 if lcfg.prompts_per_step // lcfg.mini_batch_prompts > 1 else 0)
    train_s = per_tok * shape.params * tokens / (lcfg.num_ranks * flops * MFU_TRAIN)
    wb = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    step_s = shape.params * wb / (bw * DECODE_EFFICIENCY)  # one decode step reads the weights once
    resp_tokens = g.max_response_tokens * mean_response_frac
    # each engine runs max_inflight at once, fewer when the KV cache cannot hold them at their mean
    # length; a step's sequences are spread over the engines
    concurrent = float(g.max_inflight_trajectories)
    if kv_budget_gb is not None:
        kv_seq = 2 * shape.layers * shape.kv_dim * wb * (tokens / seqs) / g.tensor_parallel_size
        concurrent = max(1.0, min(concurrent, kv_budget_gb * GB / kv_seq))
    waves = max(1.0, seqs / (g.num_generators * concurrent))
    gen_s = waves * resp_tokens * step_s
    return {"learner_s": train_s, "generation_s": gen_s, "tokens_per_step": tokens}


def gpu_of_node(spec: dict[str, Any]) -> str | None:
    itype = str(spec.get("node_config", {}).get("InstanceType", ""))
    if itype in INSTANCE_GPUS:
        return INSTANCE_GPUS[itype]
    family = itype.split(".")[0]
    return INSTANCE_GPUS.get(family)


def node_types_by_role(cluster: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    out = {}
    for name, spec in cluster.get("available_node_types", {}).items():
        for role in ("learner", "generator"):
            if role in spec.get("resources", {}):
                out[role] = (name, spec)
    return out


def plan(cfg: Config, model_dir: str | Path, cluster: dict[str, Any] | None) -> dict[str, Any]:
    """Everything the entry point prints, as data."""
    from cir_actors.data.model_setup import (
        context_window,
        hf_overrides,
        is_local_model_dir,
        read_model_config,
    )

    if not is_local_model_dir(model_dir):
        raise ConfigError(f"model directory '{model_dir}' has no config.json (pass --model-dir DIR holding one)")
    shape = model_shape(model_dir)
    window = context_window(read_model_config(model_dir), hf_overrides(cfg, model_dir))
    nodes = node_types_by_role(cluster) if cluster else {}
    out: dict[str, Any] = {"shape": shape, "window": window, "roles": [], "gpus": {}}
    for role in ("learner", "generator"):
        node = nodes.get(role)
        gpu = gpu_of_node(node[1]) if node else None
        if node and node[1].get("resources", {}).get("GPU") and gpu is None:
            raise ConfigError(f"ray_cluster.yaml: node type '{node[0]}' has an instance type the planner does not "
                              f"know the GPU of (known: {', '.join(INSTANCE_GPUS)})")
        cap = GPUS[gpu][0] if gpu else None
        out["gpus"][role] = (node[0] if node else None, gpu)
        if role == "learner":
            out["roles"].append(learner_plan(cfg, shape, cap))
        else:
            out["roles"].append(generator_plan(cfg, shape, window, cap))
    out["time"] = step_time(cfg, shape, out["gpus"]["learner"][1])
    gen_gpu = out["gpus"]["generator"][1]
    if gen_gpu:
        kv = out["roles"][1].terms_gb.get("KV cache (vLLM takes what is left)")
        out["time"]["generation_s"] = step_time(cfg, shape, gen_gpu, kv_budget_gb=kv)["generation_s"]
    return out


def render(result: dict[str, Any]) -> str:
    s: ModelShape = result["shape"]
    lines = [(f"model: {s.params / 1e9:.2f} B parameters, {s.layers} layers, hidden {s.hidden}, "
              f"vocab {s.vocab}, window {result['window']} tokens")]
    verdicts = []
    for rp in result["roles"]:
        node, gpu = result["gpus"]["learner" if rp.role.startswith("learner") else "generator"]
        where = f"{node} ({gpu})" if gpu else (node or rp.device)
        lines.append(f"\n{rp.role} on {where}: per device")
        for k, v in rp.terms_gb.items():
            lines.append(f"  {k:<44} {v:8.2f} GB")
        cap = f" of {rp.capacity_gb:.1f} GB" if rp.capacity_gb else ""
        lines.append(f"  {'total':<44} {rp.total_gb:8.2f} GB{cap}")
        lines += [f"  note: {n}" for n in rp.notes]
        if not rp.fits:
            biggest = max(rp.terms_gb, key=rp.terms_gb.get)
            verdicts.append(f"{rp.role}: {rp.total_gb:.1f} GB > {rp.capacity_gb:.1f} GB (largest term: {biggest}, "
                            f"{rp.terms_gb[biggest]:.1f} GB)")
    t = result.get("time") or {}
    if t:
        lines.append(f"\ntime per step (estimate): learner {t['learner_s']:.0f} s, generation {t['generation_s']:.0f} s "
                     f"for {t['tokens_per_step'] / 1e6:.2f} M tokens (MFU {MFU_TRAIN:.0%}, decode at "
                     f"{DECODE_EFFICIENCY:.0%} of HBM bandwidth, mean response half the limit)")
    lines.append("\nfits" if not verdicts else "\ndoes not fit: " + "; ".join(verdicts))
    return "\n".join(lines)


def load_cluster(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"cluster file '{p}' does not exist")
    return yaml.safe_load(p.read_text())


def as_json(result: dict[str, Any]) -> str:
    return json.dumps({
        "params": result["shape"].params, "window": result["window"],
        "roles": [{"role": r.role, "total_gb": r.total_gb, "capacity_gb": r.capacity_gb, "fits": r.fits,
                   "terms_gb": r.terms_gb} for r in result["roles"]],
        "time": result.get("time", {}),
    }, indent=1)
