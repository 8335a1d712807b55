"""Evaluate: `python entrypoints/evaluate.py --model PATH [--model PATH ...] --data FILE_OR_DIR [--n 16]
[--temperature 1.0] [--top-p 0.95] [--max-tool-calls 5] [--no-tools] [--out DIR] [--limit K]
[--config FILE] [key=value ...]`.

--data is one jsonl/parquet file or a directory of them (the five CIR benchmarks are in
../shared/data/benchmarks); data.problem_field=... / data.answer_field=... name the fields when they
cannot be inferred. Writes results.md, results.json, samples.jsonl and config.yaml to --out. Runs
locally with no Ray; under `ray job submit` (RAY_ADDRESS set) or with cluster.address, the engines
and interpreter pools are Ray actors on the cluster. Several --model options (checkpoints of one
model, e.g. a run's checkpoints/step-*/learner/hf) are evaluated in turn on one engine start, each
into its own subdirectory of --out, with comparison.md: avg@n per benchmark and model.
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
from cir_actors.scoring.evaluation import (
    EvalError,
    EvalRunner,
    benchmark_tasks_for,
    check_model_dir,
    comparison_markdown,
    load_tokenizer,
    model_differences,
)
from cir_actors.types import InfraFault


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="Hugging Face model dir (default: model.path, else the "
                   "tiny model); repeated (--model A --model B), checkpoints of one model evaluated in turn on "
                   "one engine start")
    p.add_argument(
        "--data", "--benchmarks", required=True, help="a jsonl/parquet file or a directory of them"
    )
    p.add_argument("--n", type=int, default=16, help="samples per problem (avg@n, pass@k)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tool-calls", type=int, default=5, help="interpreter calls per response")
    p.add_argument("--no-tools", action="store_true", help="text only: no code is executed (budget 0)")
    p.add_argument("--out", help="output directory (default: runs/eval/<model>-<tools|text>); with several "
                   "models, one subdirectory per model and comparison.md")
    p.add_argument("--limit", type=int, help="only the first K problems of each benchmark")
    p.add_argument("--config", help="YAML config (default: the tiny CPU defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generator.max_response_tokens=3000")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        sampling = [f"generator.temperature={args.temperature}", f"generator.top_p={args.top_p}"]
        cfg = load_config(args.config, sampling + args.overrides)
        models = args.model or [cfg.model.path]
        if models == [None]:
            from cir_actors.data.tiny_model import build_tiny_model

            models = [str(build_tiny_model(cfg.model.tiny, cfg.model.cache_dir))]
        for other in models[1:]:  # refused before any engine starts
            check_model_dir(other)
            differs = model_differences(check_model_dir(models[0]), other)
            if differs:
                raise EvalError(f"--model '{other}' is not a checkpoint of '{models[0]}': {differs}")
        benchmarks = benchmark_tasks_for(cfg, load_tokenizer(models[0]), args.data, args.limit)
        mode = "text" if args.no_tools else "tools"
        if len(models) == 1:
            outs = {models[0]: Path(args.out or f"runs/eval/{Path(models[0]).name}-{mode}")}
        else:
            root = Path(args.out or f"runs/eval/{Path(models[0]).name}-{mode}-checkpoints")
            outs = {m: root / label for m, label in zip(models, checkpoint_labels(models), strict=True)}
        if os.environ.get("RAY_ADDRESS") or cfg.cluster.address:
            import ray

            ray.init(address=cfg.cluster.address or "auto", namespace=cfg.cluster.namespace)
        results = {}
        with EvalRunner(cfg, models[0]) as runner:
            for i, (model, out) in enumerate(outs.items()):
                if i:
                    runner.load(model)
                results[out.name] = runner.run(benchmarks, args.n, not args.no_tools, out,
                                               max_tool_calls=args.max_tool_calls)
                print((out / "results.md").read_text(), end="", flush=True)
    except (ConfigError, DataError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InfraFault as e:  # the interpreter pools stopped answering (retried first)
        print(f"error: the evaluation stopped: {e}", file=sys.stderr)
        return 1
    if len(models) > 1:
        table = comparison_markdown(results)
        (root / "comparison.md").write_text(table)
        print("\n" + table, end="")
    return 0 if all(r["benchmarks"] for r in results.values()) else 1


def checkpoint_labels(models: list[str]) -> list[str]:
    """A short, distinct name per model directory: a training run's checkpoint
    (.../checkpoints/step-000060/learner/hf) by its step, any other by its directory name."""
    labels: list[str] = []
    for m in models:
        parts = Path(m).resolve().parts
        label = parts[-3] if parts[-2:] == ("learner", "hf") and len(parts) > 3 else parts[-1]
        base, k = label, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
