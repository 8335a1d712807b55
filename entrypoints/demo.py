"""The demo (`make demo`): the main job end to end on a CPU machine, no GPU, no model hub.

1. build the tiny model locally;
2. warm-start it with SFT on tool-use demonstrations (the learner's SFT mode) until its estimated
   sampled accuracy reaches --warm-target and each task kind's reaches --kind-floor: RL learns only
   where the model is uncertain, not wrong;
3. evaluate the warm start on held-out problems, with and without the interpreter;
4. asynchronous RL with the interpreter on the synthetic task (the train entrypoint's code);
5. evaluate the result the same way, and print the comparison (also run_dir/demo_results.md).

The RL gain is reported with its 95 % interval (`paired_difference`: per held-out problem, after
minus before; the spread over problems): with 500 problems x 4 samples it is about +-3 points.

`python entrypoints/demo.py [--warm-target T] [--kind-floor F] [--sft-steps N] [--eval-n K] [--eval-n-text K]
[dotted config overrides]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_actors.config import ConfigError, load_config
from cir_actors.data.loaders import DataError
from cir_actors.data.preflight import InputError, check_inputs
from cir_actors.learning.warm_start import (
    DEMO_KIND_FLOOR,
    DEMO_SFT_LR,
    DEMO_SFT_STEPS,
    DEMO_WARM_TARGET,
    warm_start_refusal,
)

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--sft-steps", type=int, default=DEMO_SFT_STEPS, help="most SFT updates of the warm start")
    p.add_argument("--warm-target", type=float, default=DEMO_WARM_TARGET,
                   help="stop SFT once its estimated sampled accuracy reaches this (0 < t <= 1)")
    p.add_argument("--kind-floor", type=float, default=DEMO_KIND_FLOOR,
                   help="... and every task kind's estimate reaches this (0 <= f <= 1)")
    p.add_argument("--sft-lr", type=float, default=DEMO_SFT_LR)
    p.add_argument("--eval-n", type=int, default=4, help="samples per held-out problem, with tools")
    p.add_argument("--eval-n-text", type=int, default=1,
                   help="samples per held-out problem without tools (the model cannot multiply in its head: ~0 %%)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if not 0 < args.warm_target <= 1:
        p.error(f"--warm-target must be in (0, 1], got {args.warm_target}")
    if not 0 <= args.kind_floor <= 1:
        p.error(f"--kind-floor must be in [0, 1], got {args.kind_floor}")
    if args.eval_n < 1 or args.eval_n_text < 1:
        p.error(f"--eval-n and --eval-n-text must be >= 1, got {args.eval_n} and {args.eval_n_text}")
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)  # model, every data row, every gold answer: before Ray or any engine starts
        why = warm_start_refusal(cfg, target_accuracy=args.warm_target, kind_floor=args.kind_floor)
        if why is not None:
            raise ConfigError(why)
    except (ConfigError, DataError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray
    from transformers import AutoTokenizer

    from cir_actors.control.trainer import Trainer, init_ray
    from cir_actors.data.loaders import load_tasks
    from cir_actors.data.tiny_model import build_tiny_model
    from cir_actors.learning.warm_start import warm_start
    from cir_actors.scoring.evaluation import EvalRunner, paired_difference

    t0 = time.monotonic()
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    timings: dict[str, float] = {}

    base = build_tiny_model(cfg.model.tiny, cfg.model.cache_dir)
    timings["build_model_s"] = time.monotonic() - t0
    print(f"[demo] tiny model: {base}", flush=True)

    t = time.monotonic()
    warm, sft = warm_start(cfg, base, run_dir / "warm_start", steps=args.sft_steps, lr=args.sft_lr,
                           target_accuracy=args.warm_target, kind_floor=args.kind_floor)
    timings["sft_s"] = time.monotonic() - t
    print(f"[demo] SFT warm start: {sft['steps']} steps, loss {sft['first_loss']:.3f} -> {sft['last_loss']:.3f}, "
          f"estimated sampled accuracy {sft['checks'][-1]['accuracy']:.1%} (by kind: "
          + ", ".join(f"{k} {v:.1%}" for k, v in sft["checks"][-1]["by_kind"].items())
          + f") in {sft['time_s']:.0f} s", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(str(warm))
    held_out = {"synthetic-heldout": load_tasks(cfg, tokenizer, "eval")}

    def evaluate(runner: EvalRunner, tag: str) -> dict[str, float]:
        out = {}
        for tools in (True, False):
            res = runner.run(held_out, args.eval_n if tools else args.eval_n_text, tools,
                             run_dir / f"eval_{tag}_{'tools' if tools else 'no_tools'}")
            out["tools" if tools else "no_tools"] = res["benchmarks"]["synthetic-heldout"]["avg_at_n"]
        return out

    # One evaluation engine for both evaluations, kept in this process (no Ray resources, idle
    # during RL: ~1 % of a core measured) and given the trained weights by `load`: ~30 s of a
    # second engine start and stop saved.
    t = time.monotonic()
    with EvalRunner(cfg, warm, use_ray=False) as runner:
        before = evaluate(runner, "warm_start")
        timings["eval_warm_s"] = time.monotonic() - t
        print(f"[demo] warm start held-out accuracy: with tools {before['tools']:.1%}, "
              f"without {before['no_tools']:.1%}", flush=True)

        t = time.monotonic()
        rl_cfg = cfg.model_copy(deep=True)
        rl_cfg.model.path = str(warm)
        rl_cfg.logging.run_dir = str(run_dir / "rl")
        trainer = Trainer(rl_cfg)
        try:
            summary = trainer.run()
            final_dir = Path(rl_cfg.logging.run_dir) / "checkpoints"
            final = final_dir / (final_dir / "latest").read_text().strip() / "learner" / "hf"
        finally:
            trainer.shutdown()
        timings["rl_s"] = time.monotonic() - t

        t = time.monotonic()
        runner.load(final)
        after = evaluate(runner, "after_rl")
        timings["eval_final_s"] = time.monotonic() - t
    timings["total_s"] = time.monotonic() - t0

    n_eval = len(held_out["synthetic-heldout"])
    gain = paired_difference(run_dir / "eval_warm_start_tools" / "samples.jsonl",
                             run_dir / "eval_after_rl_tools" / "samples.jsonl")
    rows = [
        "| model | held-out with tools | held-out without tools |",
        "|---|---|---|",
        f"| warm start (SFT {sft['steps']} steps) | {before['tools']:.1%} | {before['no_tools']:.1%} |",
        f"| after RL ({summary['final_version']} steps) | {after['tools']:.1%} | {after['no_tools']:.1%} |",
    ]
    report = (
        f"# cir-actors demo\n\n{n_eval} held-out problems x {args.eval_n} samples with tools, "
        f"x {args.eval_n_text} without (temperature {cfg.generator.temperature}).\n\n" + "\n".join(rows) + "\n\n"
        f"RL gain with tools: {100 * gain['difference']:+.1f} points (95 % interval +-{100 * gain['half_width_95']:.1f} "
        f"over the {gain['problems']} problems); tools vs no tools after RL: "
        f"{100 * (after['tools'] - after['no_tools']):+.1f} points.\n\n"
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "\n\n"
        f"Training curves: {Path(rl_cfg.logging.run_dir) / 'curves.png'}; metrics: "
        f"{Path(rl_cfg.logging.run_dir) / 'metrics.jsonl'}\n"
    )
    (run_dir / "demo_results.md").write_text(report)
    (run_dir / "demo_results.json").write_text(json.dumps(
        {"before": before, "after": after, "gain": gain, "sft": sft, "timings": timings, "held_out": n_eval,
         "eval_n": args.eval_n, "eval_n_text": args.eval_n_text, "rl_steps": summary["final_version"]}, indent=1))
    print("\n" + report, flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
