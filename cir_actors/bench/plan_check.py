"""Validate the memory planner against the learner's measured peak on CPU.

`python -m cir_actors.bench.plan_check [--sizes tiny,25m,100m] [--lengths 128,512] [--rows 4] [--packing]`:
for each random Qwen2-shaped model (built from the tiny model's tokenizer, saved to a temp dir) and
each sequence length, one fresh process runs a real `LearnerRank` (DeepSpeed ZeRO-2 on gloo, world
size 1, fp32, the configured chunked log-probs) for two SFT steps on `rows` sequences (one micro-batch
of rows x length tokens: forward, backward, AdamW step) and reports its peak RSS (ru_maxrss); the
planner's `learner_plan` predicts the same from the config and the meta-device shape. The same run
on a ~10 k-parameter "micro" model measures the runtime (Python, torch, transformers, DeepSpeed, the
gloo world, allocator), the planner's CPU_RUNTIME_GB. Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "micro": (16, 1, 2, 1, 32),  # ~10 k parameters: the runtime baseline (everything but the model)
    "tiny": None,  # the project's tiny model as built
    "25m": (512, 8, 8, 2, 1408),
    "100m": (768, 16, 12, 4, 2048),
}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def build_model(size: str, root: Path) -> Path:
    """A random-init model of `size` with the tiny model's tokenizer (cached under root)."""
    from cir_actors.data.tiny_model import build_tiny_model

    tiny = build_tiny_model()
    if SIZES[size] is None:
        return tiny
    out = root / f"qwen2-{size}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, layers, heads, kv, inter = SIZES[size]
    cfg = AutoConfig.from_pretrained(tiny)
    cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads = hidden, layers, heads
    cfg.num_key_value_heads, cfg.intermediate_size = kv, inter
    cfg.head_dim = hidden // heads
    cfg.layer_types = ["full_attention"] * layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in tiny.iterdir():  # the tokenizer files
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "build_info.json"):
            shutil.copy2(f, out / f.name)
    return out


def _overrides(tokens: int, packing: bool = False) -> list[str]:
    return [f"learner.micro_batch_tokens={tokens}", "learner.zero_stage=2", "learner.num_ranks=1",
            "learner.num_cpus=2", f"learner.packing={str(packing).lower()}"]


def child(model_dir: str, length: int, rows: int, packing: bool = False) -> dict:
    """In a fresh process: a LearnerRank, two SFT steps, the peak RSS."""
    import numpy as np

    from cir_actors.config import load_config
    from cir_actors.learning.learner_rank import LearnerRank, _as_trajectory

    cfg = load_config(None, _overrides(length * rows, packing))
    rank = LearnerRank(cfg, model_dir, 0, 1)
    addr, port = rank.address()
    rank.setup(addr, port)
    rng = np.random.default_rng(0)
    after_setup = _peak_gb()
    for _ in range(2):
        trajs = [_as_trajectory(rng.integers(3, 500, length)) for _ in range(rows)]
        out = rank.sft_step(trajs)
    return {"peak_gb": _peak_gb(), "after_setup_gb": after_setup, "loss": out["loss"]}


def _run_child(args: list[str]) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "cir_actors.bench.plan_check", *args], check=False,
                       capture_output=True,
                       text=True, env=env, timeout=1200)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"plan_check child {args} failed: {r.stderr[-2000:]}")
    return json.loads(lines[-1])


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="tiny,25m,100m")
    p.add_argument("--lengths", default="128,512")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--packing", action="store_true", help="learner.packing=true (one row per micro-batch)")
    p.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "LENGTH", "ROWS"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]), args.packing)))
        return {}

    from cir_actors.config import load_config
    from cir_actors.ops import plan

    root = Path(tempfile.gettempdir()) / "cir-plan-check"
    base = _run_child(["--child", str(build_model("micro", root)), "64", "1"])["peak_gb"]
    print(f"runtime baseline (a LearnerRank and two steps of a ~10 k-parameter model): {base:.2f} GB "
          f"(planner constant CPU_RUNTIME_GB = {plan.CPU_RUNTIME_GB:.2f})")
    rows = []
    for size in args.sizes.split(","):
        model_dir = build_model(size, root)
        shape = plan.model_shape(model_dir)
        for length in (int(x) for x in args.lengths.split(",")):
            cfg = load_config(None, _overrides(length * args.rows, args.packing))
            predicted = plan.learner_plan(cfg, shape, device="cpu").total_gb
            measured = _run_child(["--child", str(model_dir), str(length), str(args.rows)]
                                  + (["--packing"] if args.packing else []))["peak_gb"]
            row = {"size": size, "params_m": shape.params / 1e6, "tokens": length * args.rows,
                   "predicted_gb": predicted, "measured_gb": measured, "ratio": predicted / measured}
            rows.append(row)
            print(f"{size:>5} {row['params_m']:7.1f} M params, {args.rows} x {length} tokens: predicted "
                  f"{predicted:6.2f} GB, measured peak RSS {measured:6.2f} GB, ratio {row['ratio']:.2f}",
                  flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst |predicted/measured - 1| = {worst:.1%} (target <= 25%)")
    return {"baseline_gb": base, "rows": rows, "worst_rel_err": worst}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    run(sys.argv[1:])
