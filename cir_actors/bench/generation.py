"""Generation benchmarks: `python entrypoints/bench.py generation [options]`.

Three measurements, each side by side in one run on the same engine and machine:
1. Multi-turn code-integrated rollouts: the generator (many trajectories in flight, stop at the
   close of a block, interpreter calls overlapped with generation) against a CIR-style synchronous
   loop on the *same* engine (generate the whole batch to EOS or the limit, cut after the first
   block, execute all blocks, re-generate the batch). The models here are random, so the prompts
   open a ```python block with the problem's real code line and a logit bias makes fences and EOS
   likely: the model closes blocks (the first one runs the real computation), opens new ones and
   stops at varied lengths. Both loops use the same prompts, sampling, budget and sandbox.
2. Raw sampled tokens/s of vLLM against transformers `generate` (same model, prompts, sampling,
   ignore EOS), for the tiny model and a ~25M-parameter one.
3. The behaviour/learner log-prob mismatch: vLLM's log-probs of the tokens it sampled against a
   transformers forward pass at equal weights, per token (mean and max |diff|), fp32 and bf16.
The machine is shared and has 2 cores: figures are indicative, ratios within one run are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from cir_actors.config import TinyModelConfig, load_config

MODEL_25M = TinyModelConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536)


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.py generation", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompt groups in the rollout comparison")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--budget", type=int, default=3, help="tool-call budget per trajectory")
    ap.add_argument("--max-response", type=int, default=160, help="response limit (interpreter tokens count)")
    ap.add_argument("--raw-batch", type=int, default=16, help="sequences in the raw tokens/s comparison")
    ap.add_argument("--raw-tokens", type=int, default=96, help="tokens sampled per sequence (raw)")
    ap.add_argument("--mismatch-seqs", type=int, default=16, help="sequences in the log-prob mismatch")
    ap.add_argument("--parts", default="rollout,raw,mismatch", help="subset of rollout,raw,mismatch")
    ap.add_argument("--no-25m", action="store_true", help="skip the ~25M-parameter model")
    return ap.parse_args(argv)


def _tasks(tokenizer: Any, n: int) -> list[Any]:
    from cir_actors.data.loaders import make_task
    from cir_actors.data.tasks import generate_problems
    from cir_actors.types import Task

    tasks = []
    for p in generate_problems(n, seed=123, split="eval"):
        t = make_task(p.task_id, p.problem, p.gold, tokenizer, use_chat_template=True)
        suffix = tokenizer.encode(f"```python\n{p.code}\n", add_special_tokens=False)
        tasks.append(Task(t.task_id, t.problem, t.gold, t.prompt_text, (*t.prompt_token_ids, *suffix)))
    return tasks


def _bias(tokenizer: Any) -> dict[int, float]:
    """Make the random model write fences (about one in ten tokens each) and stop at varied lengths."""
    ids = tokenizer.convert_tokens_to_ids(["```", "```python"])
    return {ids[0]: 4.0, ids[1]: 4.0, tokenizer.eos_token_id: 1.5}


# ----------------------------------------------------------------------------------- 1. rollouts


async def _generator_rollouts(gen: Any, tasks: list, n: int, budget: int, bias: dict) -> dict[str, float]:
    t0 = time.perf_counter()
    trajs = await asyncio.gather(
        *(gen.rollout(task, i, budget, sampling={"logit_bias": bias}) for task in tasks for i in range(n))
    )
    wall = time.perf_counter() - t0
    sampled = sum(t.num_sampled for t in trajs)
    return {"wall_s": wall, "trajectories": len(trajs), "sampled_tokens": sampled, "generated_tokens": sampled,
            "executed": sum(t.num_executed for t in trajs), "interp_wait_s": sum(t.interp_wait_s for t in trajs),
            "mean_response": statistics.mean(t.response_len for t in trajs)}


async def _cir_sync_loop(gen: Any, tasks: list, n: int, budget: int, bias: dict, max_resp: int) -> dict[str, float]:
    """CIR's loop on the same engine: whole batch to EOS/limit, cut after the first block, run all, repeat."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from cir_actors.generation.rollout import BlockScanner, _tokens_through, open_block_tail

    codec, engine, interp = gen._codec, gen.engine, gen._interpreter
    cfg = gen.cfg
    states = [
        {"ids": list(task.prompt_token_ids), "plen": len(task.prompt_token_ids), "executed": 0,
         "carry": open_block_tail(codec.decode(task.prompt_token_ids)), "sampled": 0}
        for task in tasks for _ in range(n)
    ]
    generated = executed = 0
    rid = 0
    active = states
    t0 = time.perf_counter()
    while active:
        async def one(s: dict, request_id: str) -> list[int]:
            params = SamplingParams(n=1, temperature=cfg.generator.temperature, top_p=cfg.generator.top_p,
                                    max_tokens=max_resp - (len(s["ids"]) - s["plen"]), logprobs=0,
                                    logit_bias=bias, output_kind=RequestOutputKind.FINAL_ONLY)
            out = None
            async for out in engine.generate(TokensPrompt(prompt_token_ids=s["ids"]), params, request_id):
                pass
            return list(out.outputs[0].token_ids)

        outs = await asyncio.gather(*(one(s, f"cir-sync-{rid + i}") for i, s in enumerate(active)))
        rid += len(active)
        to_run = []
        for s, ids in zip(active, outs, strict=True):
            generated += len(ids)
            block = None
            if s["executed"] < budget:
                scanner = BlockScanner(s["carry"])
                scanner.feed(codec.decode(ids))
                block = scanner.next_block()
            if block is not None:  # cut right after the first block; the rest was generated for nothing
                ids = ids[: _tokens_through(codec, [], ids, block.end - len(s["carry"]))]
                to_run.append((s, block))
            s["ids"] += ids
            s["sampled"] += len(ids)
        results = await asyncio.gather(*(interp.run_async(b.code) for _, b in to_run))
        active = []
        for (s, _), res in zip(to_run, results, strict=True):
            executed += 1
            s["executed"] += 1
            out_ids = codec.encode(gen._format_output(res, cfg.interpreter.output_max_chars))
            room = max_resp - (len(s["ids"]) - s["plen"])
            s["ids"] += out_ids[:room]
            s["carry"] = ""
            if len(out_ids) < room:
                active.append(s)
    wall = time.perf_counter() - t0
    sampled = sum(s["sampled"] for s in states)
    return {"wall_s": wall, "trajectories": len(states), "sampled_tokens": sampled, "generated_tokens": generated,
            "executed": executed, "mean_response": statistics.mean(len(s["ids"]) - s["plen"] for s in states)}


def _rollout_part(local: Any, args: argparse.Namespace) -> dict[str, Any]:
    gen = local.gen
    tasks = _tasks(gen.tokenizer, args.prompts)
    bias = _bias(gen.tokenizer)
    # Warm the engine and the sandbox once so neither side pays a first-call cost.
    local.run(gen.rollout(tasks[0], 0, args.budget, sampling={"logit_bias": bias}))
    ours = local.run(_generator_rollouts(gen, tasks, args.samples, args.budget, bias))
    sync = local.run(_cir_sync_loop(gen, tasks, args.samples, args.budget, bias, args.max_response))
    rows = {"generator (async, stop at close)": ours, "CIR-style synchronous loop": sync}
    print(f"\n1. multi-turn rollouts: {args.prompts} prompts x {args.samples} samples, budget {args.budget}, "
          f"response <= {args.max_response} tokens (tiny model, fp32)")
    print(f"{'':34} {'traj/s':>8} {'sampled tok/s':>14} {'generated tok/s':>16} {'calls/traj':>11} {'mean resp':>10}")
    for name, r in rows.items():
        r["traj_per_s"] = r["trajectories"] / r["wall_s"]
        r["sampled_tok_per_s"] = r["sampled_tokens"] / r["wall_s"]
        r["generated_tok_per_s"] = r["generated_tokens"] / r["wall_s"]
        print(f"{name:34} {r['traj_per_s']:8.2f} {r['sampled_tok_per_s']:14.1f} {r['generated_tok_per_s']:16.1f} "
              f"{r['executed'] / r['trajectories']:11.2f} {r['mean_response']:10.1f}")
    speedup = ours["traj_per_s"] / sync["traj_per_s"]
    wasted = 1 - sync["sampled_tokens"] / max(1, sync["generated_tokens"])
    print(f"speed-up (traj/s): {speedup:.2f}x; the synchronous loop threw away {wasted:.0%} of what it generated")
    return {"generator": ours, "cir_sync": sync, "speedup_traj_per_s": speedup, "sync_wasted_fraction": wasted}


# ------------------------------------------------------------------------------ 2. raw tokens/s
# The engine side runs first; transformers runs after the engine is shut down (the vLLM CPU worker's
# OpenMP threads would otherwise compete with it for the same cores).


def _raw_prompts(tokenizer: Any, args: argparse.Namespace) -> list[list[int]]:
    return [list(t.prompt_token_ids) for t in _tasks(tokenizer, args.raw_batch)]


def _raw_vllm(local: Any, args: argparse.Namespace) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    gen = local.gen
    prompts = _raw_prompts(gen.tokenizer, args)
    params = SamplingParams(n=1, temperature=1.0, max_tokens=args.raw_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)

    async def batch(tag: str) -> int:
        async def one(i: int, ids: list[int]) -> int:
            out = None
            async for out in gen.engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"raw-{tag}-{i}"):
                pass
            return len(out.outputs[0].token_ids)

        return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    local.run(batch("warm"))
    local.run(gen.engine.reset_prefix_cache())
    t0 = time.perf_counter()
    n = local.run(batch("run"))
    return n / (time.perf_counter() - t0)


def _raw_hf(model_dir: str, dtype: str, args: argparse.Namespace) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = _raw_prompts(tok, args)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "pad_token_id": pad}
    with torch.no_grad():
        model.generate(input_ids[:2], attention_mask=mask[:2], max_new_tokens=4, min_new_tokens=4, **kw)
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=args.raw_tokens,
                             min_new_tokens=args.raw_tokens, **kw)
        return (out.shape[1] - width) * len(prompts) / (time.perf_counter() - t0)


# -------------------------------------------------------------------------- 3. log-prob mismatch


def _mismatch_samples(local: Any, args: argparse.Namespace) -> list[tuple[list[int], list[int], list[float]]]:
    """Sequences the engine samples at temperature 1, with its behaviour log-probs."""
    gen = local.gen
    prompts = [list(t.prompt_token_ids) for t in _tasks(gen.tokenizer, args.mismatch_seqs)]

    async def sample_all() -> list[tuple[list[int], list[float]]]:
        return await asyncio.gather(*(gen.sample(p, 64, temperature=1.0, ignore_eos=True) for p in prompts))

    return [(p, ids, lps) for p, (ids, lps) in zip(prompts, local.run(sample_all()), strict=True)]


def _mismatch_hf(model_dir: str, dtype: str, samples: list) -> dict[str, float]:
    """|behaviour - learner| per token, the learner forward in the engine's dtype and in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    result: dict[str, float] = {}
    for learner_dtype in sorted({dtype, "float32"}):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, learner_dtype)).eval()
        diffs = []
        with torch.no_grad():
            for p, ids, lps in samples:
                logp = model(torch.tensor([p + ids])).logits[0].float().log_softmax(-1)
                ref = logp[len(p) - 1 : -1].gather(1, torch.tensor(ids)[:, None])[:, 0]
                diffs.append(np.abs(np.array(lps) - ref.numpy()))
        d = np.concatenate(diffs)
        result[f"learner_{learner_dtype}_mean_abs"] = float(d.mean())
        result[f"learner_{learner_dtype}_max_abs"] = float(d.max())
    return result


# ------------------------------------------------------------------------------------------ run


def _engine(model_dir: str, dtype: str, args: argparse.Namespace) -> Any:
    from cir_actors.generation.generator import LocalGenerator
    from cir_actors.sandbox.pool import InterpreterPool

    cfg = load_config(None, [f"model.dtype={dtype}", f"generator.max_response_tokens={args.max_response}",
                             "generator.max_prompt_tokens=256", "generator.max_inflight_trajectories=64",
                             "generator.temperature=1.0"])
    pool = InterpreterPool(cfg.interpreter)
    local = LocalGenerator(cfg, model_dir, pool)
    local.pool = pool
    return local


def run(argv: list[str]) -> dict[str, Any]:
    import json
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cir_actors.data.tiny_model import build_tiny_model

    args = _args(argv)
    parts = set(args.parts.split(","))
    plan = [("tiny", "float32")]
    if parts & {"raw", "mismatch"}:
        plan.append(("tiny", "bfloat16"))
        if not args.no_25m:
            plan += [("25m", "bfloat16"), ("25m", "float32")]
    dirs = {"tiny": str(build_tiny_model())}
    if any(name == "25m" for name, _ in plan):
        dirs["25m"] = str(build_tiny_model(MODEL_25M))
    results: dict[str, Any] = {}
    for name, dtype in plan:
        model_dir = dirs[name]
        t0 = time.perf_counter()
        local = _engine(model_dir, dtype, args)
        key = f"{name}_{dtype}"
        info = json.loads((Path(model_dir) / "build_info.json").read_text())
        results[key] = {"engine_start_s": time.perf_counter() - t0, "parameters": info["num_parameters"]}
        samples = None
        try:
            if key == "tiny_float32" and "rollout" in parts:
                results["rollout"] = _rollout_part(local, args)
            if "raw" in parts:
                results[key]["raw"] = {"vllm_tok_per_s": _raw_vllm(local, args)}
            if "mismatch" in parts:
                samples = _mismatch_samples(local, args)
        finally:
            local.close()
            local.pool.close()
        if "raw" in parts:
            raw = results[key]["raw"]
            raw["transformers_tok_per_s"] = _raw_hf(model_dir, dtype, args)
            raw["vllm_over_transformers"] = raw["vllm_tok_per_s"] / raw["transformers_tok_per_s"]
        if samples is not None:
            results[key]["mismatch"] = _mismatch_hf(model_dir, dtype, samples)
    _print_tables(results, args)
    return results


def _print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    engines = {k: v for k, v in results.items() if k != "rollout"}
    if any("raw" in v for v in engines.values()):
        print(f"\n2. raw sampled tokens/s, {args.raw_batch} sequences x {args.raw_tokens} tokens, temperature 1, "
              "ignore EOS")
        print(f"{'model':14} {'params':>10} {'vLLM tok/s':>11} {'HF tok/s':>10} {'vLLM/HF':>8} {'engine start':>13}")
        for key, v in engines.items():
            if "raw" in v:
                r = v["raw"]
                print(f"{key:14} {v['parameters']:10,d} {r['vllm_tok_per_s']:11.1f} {r['transformers_tok_per_s']:10.1f} "
                      f"{r['vllm_over_transformers']:8.2f} {v['engine_start_s']:12.1f}s")
    if any("mismatch" in v for v in engines.values()):
        print(f"\n3. |vLLM behaviour log-prob - transformers log-prob| per sampled token ({args.mismatch_seqs} x 64)")
        print(f"{'engine':14} {'learner dtype':>14} {'mean':>10} {'max':>10}")
        for key, v in engines.items():
            for learner in ("float32", "bfloat16"):
                m = v.get("mismatch", {})
                if f"learner_{learner}_mean_abs" in m:
                    print(f"{key:14} {learner:>14} {m[f'learner_{learner}_mean_abs']:10.2e} "
                          f"{m[f'learner_{learner}_max_abs']:10.2e}")
