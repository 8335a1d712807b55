"""`bench.py train`: the same short training run synchronous (max_staleness 0: generation and
training alternate) and asynchronous (max_staleness 1), side by side in one run.

Figures: trajectories/s of each (steady state: the first step, which includes engine warm-up, is
left out), their ratio, and the ideal ratio from the synchronous run's measured generation and
training times alone, (gen + train) / max(gen, train). Target: async reaches >= 0.9 of the ideal.
On a 2-core machine generation and training compete for the same cores, which caps the overlap;
the table says so rather than hiding it.

Below it, where each mode's step goes (cir_actors/ops/step_time.py, metrics.jsonl `time/...`): the
learner's wait for a batch, fetch, separate proximal forward, update and publication; a generator's
wall, idle, busy and weight-load time and its trajectory-seconds of generation, tool wait and
scoring; the ideal synchronous and asynchronous steps from them and the measured overlap efficiency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BREAKDOWN = [
    "time/learner_wait_batch_s", "time/learner_fetch_s", "time/learner_proximal_s", "time/learner_update_s",
    "time/learner_publish_s", "time/learner_busy_s", "time/gen_wall_s", "time/gen_idle_s", "time/gen_busy_s",
    "time/gen_weight_load_s", "time/gen_generation_traj_s", "time/gen_tool_wait_traj_s", "time/gen_tool_exec_traj_s",
    "time/gen_tool_queue_traj_s", "time/gen_scoring_traj_s",
    "time/ideal_sync_step_s", "time/ideal_async_step_s", "time/overlap_efficiency",
]


def _run(overrides: list[str], run_dir: Path) -> list[dict[str, Any]]:
    from cir_actors.config import load_config
    from cir_actors.control.trainer import Trainer

    cfg = load_config(None, [*overrides, f"logging.run_dir={run_dir}", "logging.wandb_mode=disabled",
                             "logging.progress=false"])
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="bench.py train")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", default=None, help="HF model dir (default: the demo's warm start if present, else the tiny model)")
    args = p.parse_args(argv)
    import ray

    from cir_actors.config import load_config
    from cir_actors.control.trainer import init_ray
    from cir_actors.data.preflight import check_inputs

    model = args.model
    warm = ROOT / "runs" / "demo" / "warm_start" / "hf"
    if model is None and (warm / "config.json").is_file():
        model = str(warm)
    common = [
        f"scheduler.total_steps={args.steps}", "learner.prompts_per_step=4", "learner.mini_batch_prompts=4",
        "generator.samples_per_prompt=8", "generator.max_response_tokens=96", "data.num_train=512",
        "generator.num_cpus=0.5", "learner.num_cpus=0.5", "cluster.namespace=cir-bench-train",
    ]
    if model:
        common.append(f"model.path={model}")
    cfg = load_config(None, common)
    check_inputs(cfg)  # a bad --model is one sentence before Ray starts
    init_ray(cfg)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cir-bench-train-") as tmp:
        for mode, staleness in (("sync", 0), ("async", 1)):
            rows = _run([*common, f"scheduler.max_staleness={staleness}"], Path(tmp) / mode)
            steady = rows[1:] if len(rows) > 1 else rows
            wall = sum(r["time/step_s"] for r in steady)
            trajs = sum(r["trajectories"] for r in steady)
            results[mode] = {
                "trajectories_per_s": trajs / wall,
                "step_s": statistics.mean(r["time/step_s"] for r in steady),
                "gen_s": statistics.mean(r["time/wait_batch_s"] for r in steady),
                "train_s": statistics.mean(r["time/train_s"] + r["time/publish_s"] for r in steady),
                "staleness_mean": statistics.mean(r["staleness_mean"] for r in steady),
                # where the step went (cir_actors/ops/step_time.py), mean over steady steps
                **{k.removeprefix("time/"): statistics.mean(r.get(k, 0.0) for r in steady) for k in BREAKDOWN},
            }
    sync, asyn = results["sync"], results["async"]
    gen, train = sync["gen_s"], sync["train_s"]
    ideal = (gen + train) / max(gen, train)
    ratio = asyn["trajectories_per_s"] / sync["trajectories_per_s"]
    out = {
        "model": model or "tiny (random init)",
        "steps": args.steps,
        **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()},
        "ratio_async_over_sync": ratio,
        "ideal_ratio": ideal,
        "fraction_of_ideal": ratio / ideal,
    }
    print(f"model: {out['model']}; {args.steps} steps each, first step (warm-up) excluded")
    print(f"{'mode':<7}{'traj/s':>10}{'step s':>10}{'gen s':>10}{'train s':>10}{'staleness':>11}")
    for mode, r in results.items():
        print(f"{mode:<7}{r['trajectories_per_s']:>10.2f}{r['step_s']:>10.2f}{r['gen_s']:>10.2f}"
              f"{r['train_s']:>10.2f}{r['staleness_mean']:>11.2f}")
    print("where a step goes (mean s per steady step; *_traj_s are trajectory-seconds, summed over concurrent "
          "trajectories of one generator):")
    print(f"{'part':<28}" + "".join(f"{m:>10}" for m in results))
    for k in BREAKDOWN:
        name = k.removeprefix("time/")
        print(f"{name:<28}" + "".join(f"{r[name]:>10.3f}" for r in results.values()))
    print(f"async / sync = {ratio:.2f}; ideal (gen + train) / max(gen, train) = {ideal:.2f}; "
          f"fraction of ideal = {ratio / ideal:.2f} (target >= 0.9)")
    ray.shutdown()
    return out
