"""Evaluate: `python entrypoints/evaluate.py --model PATH --data FILE_OR_DIR [--n 16] [--temperature 1.0]
[--top-p 0.95] [--max-tool-calls 5] [--no-tools] [--out DIR] [--limit K] [--config FILE] [key=value ...]`.

--data is one jsonl/parquet file or a directory of them (the five CIR benchmarks are in
../shared/data/benchmarks); data.problem_field=... / data.answer_field=... name the fields when they
cannot be inferred. Writes results.md, results.json, samples.jsonl and config.yaml to --out. Runs
locally with no Ray; under `ray job submit` (RAY_ADDRESS set) or with cluster.address, the engines
and interpreter pools are Ray actors on the cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_actors.config import ConfigError, load_config
from cir_actors.data.loaders import DataError
from cir_actors.scoring.evaluation import EvalError, benchmark_tasks_for, evaluate, load_tokenizer
from cir_actors.types import InfraFault


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face model dir (default: model.path, else the tiny model)")
    p.add_argument(
        "--data", "--benchmarks", required=True, help="a jsonl/parquet file or a directory of them"
    )
    p.add_argument("--n", type=int, default=16, help="samples per problem (avg@n, pass@k)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tool-calls", type=int, default=5, help="interpreter calls per response")
    p.add_argument("--no-tools", action="store_true", help="text only: no code is executed (budget 0)")
    p.add_argument("--out", help="output directory (default: runs/eval/<model>-<tools|text>)")
    p.add_argument("--limit", type=int, help="only the first K problems of each benchmark")
    p.add_argument("--config", help="YAML config (default: the tiny CPU defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generator.max_response_tokens=3000")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        sampling = [f"generator.temperature={args.temperature}", f"generator.top_p={args.top_p}"]
        cfg = load_config(args.config, sampling + args.overrides)
        model = args.model or cfg.model.path
        if model is None:
            from cir_actors.data.tiny_model import build_tiny_model

            model = str(build_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
        benchmarks = benchmark_tasks_for(cfg, load_tokenizer(model), args.data, args.limit)
        out = args.out or f"runs/eval/{Path(model).name}-{'text' if args.no_tools else 'tools'}"
        if os.environ.get("RAY_ADDRESS") or cfg.cluster.address:
            import ray

            ray.init(address=cfg.cluster.address or "auto", namespace=cfg.cluster.namespace)
        results = evaluate(
            cfg, model, benchmarks, args.n, not args.no_tools, out, max_tool_calls=args.max_tool_calls
        )
    except (ConfigError, DataError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InfraFault as e:  # the interpreter pools stopped answering (retried first): nothing written
        print(f"error: the evaluation stopped: {e}", file=sys.stderr)
        return 1
    print((Path(out) / "results.md").read_text(), end="")
    return 0 if results["benchmarks"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
