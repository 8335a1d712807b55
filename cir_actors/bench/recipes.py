"""`bench.py recipes`: the demo's RL with the default recipe and with each algorithm option, side by
side on several seeds, from one warm start per seed.

For each seed (`data.seed`, which sets the task stream, the SFT order and the check set): the demo's
warm start (SFT to the demo's stop rule), its held-out accuracy with tools, then for each recipe
the demo's RL run from that same warm start and the held-out accuracy of its result. The gain is
after − before on the same held-out problems, so recipes differ only in their RL. Both are
evaluated the way the recipe generates: a recipe that changes what one response is (the
`generator.*` settings in RESPONSE_RULE, e.g. `generator.stop_at_answer`) has the warm start
evaluated again under them, since a model trained under one generation rule says nothing about
itself under another. Every other generator setting (the temperature and the group size of the
exploration during training, the engines' sizes) is the base config's in both evaluations (the
demo's temperature 1.0, `--eval-n` samples). Results are written after every
run to `<out>/recipes.json` (a run that stops midway keeps what it measured).

    python entrypoints/bench.py recipes --seeds 0 1 2 \\
        --recipe default --recipe ds=buffer.dynamic_sampling=true --recipe icepop=learner.correction=icepop
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPES = ["default", "dynamic_sampling=buffer.dynamic_sampling=true", "icepop=learner.correction=icepop"]


def parse_recipe(spec: str) -> tuple[str, list[str]]:
    """`name` or `name=key=value,key=value` -> (name, overrides). Pure; tested."""
    name, _, rest = spec.partition("=")
    if not name:
        raise ValueError(f"recipe {spec!r}: expected name or name=key=value[,key=value...]")
    overrides = [o for o in rest.split(",") if o] if rest else []
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"recipe {spec!r}: override {o!r} is not key=value")
    return name, overrides


RESPONSE_RULE = ("top_p", "max_prompt_tokens", "max_response_tokens", "stop_at_answer")
"""The generator settings that decide what one evaluated response is."""


def evaluation_config(base: Any, trained: Any, extra: list[str]) -> tuple[Any, list[str]]:
    """The config a recipe's warm start and result are evaluated under: the recipe's (`trained`)
    with the base config's generator settings but for RESPONSE_RULE, and the recipe's overrides
    among RESPONSE_RULE (the key of its warm start's evaluation). Pure; tested."""
    cfg = trained.model_copy(deep=True)
    cfg.generator = base.generator.model_copy(update={k: getattr(trained.generator, k) for k in RESPONSE_RULE})
    rule = sorted(o for o in extra if o.partition("=")[0] in {f"generator.{k}" for k in RESPONSE_RULE})
    return cfg, rule


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}{key}.").items()} if d else {prefix: d}


def reuse_refusal(earlier: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why the warm starts recorded in `earlier` (a recipes.json) cannot be reused by a run set up
    as `now` (same keys: config, settings, overrides, eval_n), or None. The config is compared by
    what it loads to (`settings`, the base config with the overrides), not by how its path was
    written; a recipes.json from before `settings` was recorded is compared by its resolved path.
    A setting the code did not have when recipes.json was written is not compared (it did not
    exist for those warm starts); one since removed is. Pure; tested."""
    if earlier.get("settings") is not None:
        old, new = _flat(earlier["settings"]), _flat(now["settings"])
        changed = sorted(k.rstrip(".") for k in old if old[k] != new.get(k))
        if changed:
            return (f"the base config differs from the one its warm starts were measured with in "
                    f"{', '.join(changed[:5])}{' and more' if len(changed) > 5 else ''}")
    elif Path(earlier["config"]).resolve() != Path(now["config"]).resolve():
        return f"its warm starts were measured with config {earlier['config']}, not {now['config']}"
    if earlier.get("overrides") != now["overrides"]:
        return f"its warm starts were measured with overrides {earlier.get('overrides')}, not {now['overrides']}"
    if earlier.get("eval_n") != now["eval_n"]:
        return f"its warm starts were evaluated with --eval-n {earlier.get('eval_n')}, not {now['eval_n']}"
    return None


def held_out_accuracy(cfg: Any, model: Path, held_out: dict[str, Any], n: int, out_dir: Path) -> float:
    """Mean accuracy with tools of `model` on the held-out problems, n samples each."""
    from cir_actors.scoring.evaluation import EvalRunner

    with EvalRunner(cfg, model) as runner:
        res = runner.run(held_out, n, True, out_dir)
    return float(res["benchmarks"]["synthetic-heldout"]["avg_at_n"])


def _held_out(cfg: Any, model: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from cir_actors.data.loaders import load_tasks

    return {"synthetic-heldout": load_tasks(cfg, AutoTokenizer.from_pretrained(str(model)), "eval")}


def run(argv: list[str]) -> dict[str, Any]:
    from cir_actors.learning.warm_start import DEMO_KIND_FLOOR, DEMO_SFT_LR, DEMO_SFT_STEPS, DEMO_WARM_TARGET

    p = argparse.ArgumentParser(prog="bench.py recipes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipe", action="append", default=None,
                   help="name or name=key=value[,key=value...] (repeatable; default: "
                        + "; ".join(DEFAULT_RECIPES) + ")")
    p.add_argument("--out", default="runs/bench-recipes")
    p.add_argument("--eval-n", type=int, default=2)
    p.add_argument("--warm-target", type=float, default=DEMO_WARM_TARGET)
    p.add_argument("--kind-floor", type=float, default=DEMO_KIND_FLOOR)
    p.add_argument("--sft-steps", type=int, default=DEMO_SFT_STEPS)
    p.add_argument("--sft-lr", type=float, default=DEMO_SFT_LR)
    p.add_argument("--reuse-warm-start", action="store_true",
                   help="a seed whose warm start and its held-out figure are already in --out is not warm-started "
                        "again (its row in recipes.json is kept; new recipes are added to it)")
    p.add_argument("--reevaluate", action="store_true",
                   help="with --reuse-warm-start: a recipe whose RL run in --out finished is evaluated again, "
                        "not trained again")
    p.add_argument("overrides", nargs="*", help="key=value applied to every recipe")
    args = p.parse_args(argv)
    recipes = [parse_recipe(s) for s in (args.recipe or DEFAULT_RECIPES)]
    if args.reevaluate and not args.reuse_warm_start:
        p.error("--reevaluate evaluates runs of the warm starts in --out: give --reuse-warm-start too")

    from cir_actors.config import load_config
    from cir_actors.data.preflight import check_inputs

    for _, extra in recipes:  # every recipe's config refused before anything starts
        check_inputs(load_config(args.config, args.overrides + extra))

    import ray

    from cir_actors.control.trainer import Trainer, init_ray
    from cir_actors.data.tiny_model import build_tiny_model
    from cir_actors.learning.warm_start import warm_start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(args.config, args.overrides)
    results: dict[str, Any] = {"config": args.config, "settings": base_cfg.model_dump(mode="json"),
                               "overrides": args.overrides, "eval_n": args.eval_n,
                               "recipes": dict(recipes), "seeds": {}}
    earlier = json.loads((out / "recipes.json").read_text()) if (out / "recipes.json").is_file() else None
    if args.reuse_warm_start and earlier is not None:
        why = reuse_refusal(earlier, results)
        if why is not None:
            raise SystemExit(f"--reuse-warm-start: cannot reuse {out / 'recipes.json'}: {why} "
                             "(give another --out, or the same config)")
        results["recipes"] = {**earlier["recipes"], **results["recipes"]}
        results["seeds"] = earlier["seeds"]

    def save() -> None:
        (out / "recipes.json").write_text(json.dumps(results, indent=1))

    init_ray(base_cfg)
    try:
        base = build_tiny_model(base_cfg.model.tiny, base_cfg.model.cache_dir)
        for seed in args.seeds:
            cfg = load_config(args.config, args.overrides + [f"data.seed={seed}"])
            seed_dir = out / f"seed{seed}"
            warm = seed_dir / "warm_start" / "hf"
            row = results["seeds"].get(str(seed)) if args.reuse_warm_start else None
            if row is not None and "before" in row and (warm / "config.json").is_file():
                print(f"[recipes] seed {seed}: warm start reused ({row['sft_steps']} SFT steps, "
                      f"held-out {row['before']:.1%})", flush=True)
            else:
                t = time.monotonic()
                warm, sft = warm_start(cfg, base, seed_dir / "warm_start", steps=args.sft_steps, lr=args.sft_lr,
                                       target_accuracy=args.warm_target, kind_floor=args.kind_floor)
                row = {"sft_steps": sft["steps"], "sft_s": time.monotonic() - t, "sft_estimate": sft["checks"][-1],
                       "runs": {}}
                results["seeds"][str(seed)] = row
                row["before"] = held_out_accuracy(cfg, warm, _held_out(cfg, warm), args.eval_n,
                                                  seed_dir / "eval_warm_start")
                print(f"[recipes] seed {seed}: warm start {sft['steps']} SFT steps, held-out {row['before']:.1%}",
                      flush=True)
                save()
            held_out = _held_out(cfg, warm)
            for name, extra in recipes:
                rl_cfg = load_config(args.config, args.overrides + [f"data.seed={seed}"] + extra)
                rl_cfg.model.path = str(warm)
                rl_cfg.logging.run_dir = str(seed_dir / name)
                ckpts = Path(rl_cfg.logging.run_dir) / "checkpoints"
                done = row["runs"].get(name)
                if args.reevaluate and done is not None and (ckpts / "latest").is_file():
                    rl_s, steps, buffer = done["rl_s"], done["steps"], done["buffer"]
                else:
                    t = time.monotonic()
                    trainer = Trainer(rl_cfg)
                    try:
                        summary = trainer.run()
                    finally:
                        trainer.shutdown()
                    rl_s, steps, buffer = time.monotonic() - t, summary.get("final_version"), summary.get("buffer")
                final = ckpts / (ckpts / "latest").read_text().strip() / "learner" / "hf"
                eval_cfg, generation = evaluation_config(cfg, rl_cfg, extra)
                before = row["before"]
                if eval_cfg.generator != cfg.generator:  # the warm start, evaluated the way this recipe generates
                    befores = row.setdefault("before_by_generation", {})
                    key = ",".join(generation)
                    if key not in befores:
                        befores[key] = held_out_accuracy(eval_cfg, warm, held_out, args.eval_n,
                                                         seed_dir / f"eval_warm_start_{name}")
                    before = befores[key]
                after = held_out_accuracy(eval_cfg, final, held_out, args.eval_n, seed_dir / f"eval_{name}")
                row["runs"][name] = {"before": before, "after": after, "gain": after - before, "rl_s": rl_s,
                                     "steps": steps, "buffer": buffer, "generation": generation}
                print(f"[recipes] seed {seed} {name}: {before:.1%} -> {after:.1%} "
                      f"({100 * (after - before):+.1f} points), RL {rl_s:.0f} s", flush=True)
                save()
    finally:
        ray.shutdown()

    names = [n for n, _ in recipes]
    lines = ["| seed | warm start | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for seed, row in results["seeds"].items():
        cells = [f"{100 * r['gain']:+.1f} ({r['rl_s']:.0f} s)" if (r := row["runs"].get(n)) else "-" for n in names]
        lines.append(f"| {seed} | {row.get('before', 0):.1%} ({row['sft_steps']} SFT) | " + " | ".join(cells) + " |")
    print("\nheld-out gain with tools, points (RL wall time)\n" + "\n".join(lines), flush=True)
    return results
