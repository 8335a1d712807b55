"""Plan: `python entrypoints/plan.py --config configs/qwen2.5-math-7b.yaml [--cluster ray_cluster.yaml]
[--model-dir DIR] [--json]`: per role and per GPU, weights, gradients, optimizer, activations, logits,
KV cache, a time per step, and "fits / does not fit: <what breaks>" (cir_actors/ops/plan.py).

The model's config.json is read on the meta device (no weights). `--model-dir` points at a directory
holding it when model.path is a hub id that is not cached here (tests/data/qwen2.5-math-7b ships one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_actors.config import ConfigError, load_config


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--cluster", default=None, help="ray_cluster.yaml (node types and their GPUs)")
    p.add_argument("--model-dir", default=None, help="directory with the model's config.json")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from cir_actors.data.model_setup import resolve_model
        from cir_actors.ops import plan

        model_dir = args.model_dir or resolve_model(cfg)
        result = plan.plan(cfg, model_dir, plan.load_cluster(args.cluster) if args.cluster else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.as_json(result) if args.json else plan.render(result))
    return 0 if all(r.fits for r in result["roles"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
