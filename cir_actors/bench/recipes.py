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
demo's temperature 1.0, `--eval-n` samples of each of `data.num_eval` held-out problems). Each gain
comes with its 95 % interval (`paired_difference`: per problem, after minus before; the spread over
problems). Results are written after every run to `<out>/recipes.json` (a run that stops midway
keeps what it measured).

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
EVALUATION_ONLY = ("data.num_eval",)
"""Settings that change how a model is measured, not what is trained: warm starts measured under
other values (or another --eval-n) are reused and evaluated again."""
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
    exist for those warm starts); one since removed is. How they are evaluated (--eval-n,
    EVALUATION_ONLY) is not a reason: they are evaluated again. Pure; tested."""
    if earlier.get("settings") is not None:
        old, new = _flat(earlier["settings"]), _flat(now["settings"])
        changed = sorted(k.rstrip(".") for k in old if old[k] != new.get(k) and k.rstrip(".") not in EVALUATION_ONLY)
        if changed:
            return (f"the base config differs from the one its warm starts were measured with in "
                    f"{', '.join(changed[:5])}{' and more' if len(changed) > 5 else ''}")
    elif Path(earlier["config"]).resolve() != Path(now["config"]).resolve():
        return f"its warm starts were measured with config {earlier['config']}, not {now['config']}"
    if earlier.get("overrides") != now["overrides"]:
        return f"its warm starts were measured with overrides {earlier.get('overrides')}, not {now['overrides']}"
    return None


def evaluation_of(recipes_json: dict[str, Any], row: dict[str, Any] | None = None) -> dict[str, Any]:
    """How a seed's warm start in a recipes.json was evaluated: {"n", "num_eval"} (a row written
    before rows recorded it: the file's --eval-n and data.num_eval). Pure; tested."""
    if row is not None and "evaluation" in row:
        return row["evaluation"]
    return {"n": recipes_json.get("eval_n"), "num_eval": (recipes_json.get("settings") or {}).get("data", {}).get("num_eval")}


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
    from cir_actors.learning.warm_start import (
        DEMO_KIND_FLOOR,
        DEMO_SFT_LR,
        DEMO_SFT_STEPS,
        DEMO_WARM_TARGET,
        warm_start_refusal,
    )

    p = argparse.ArgumentParser(prog="bench.py recipes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipe", action="append", default=None,
                   help="name or name=key=value[,key=value...] (repeatable; default: "
                        + "; ".join(DEFAULT_RECIPES) + ")")
    p.add_argument("--out", default="runs/bench-recipes")
    p.add_argument("--eval-n", type=int, default=4, help="samples per held-out problem (data.num_eval problems)")
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
    why = warm_start_refusal(load_config(args.config, args.overrides), target_accuracy=args.warm_target,
                             kind_floor=args.kind_floor)
    if why is not None:
        p.error(why)

    import ray

    from cir_actors.control.trainer import Trainer, init_ray
    from cir_actors.data.tiny_model import build_tiny_model
    from cir_actors.learning.warm_start import warm_start
    from cir_actors.scoring.evaluation import paired_difference

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(args.config, args.overrides)
    results: dict[str, Any] = {"config": args.config, "settings": base_cfg.model_dump(mode="json"),
                               "overrides": args.overrides, "eval_n": args.eval_n,
                               "recipes": dict(recipes), "seeds": {}}
    evaluation = evaluation_of(results)
    earlier = json.loads((out / "recipes.json").read_text()) if (out / "recipes.json").is_file() else None
    if args.reuse_warm_start and earlier is not None:
        why = reuse_refusal(earlier, results)
        if why is not None:
            raise SystemExit(f"--reuse-warm-start: cannot reuse {out / 'recipes.json'}: {why} "
                             "(give another --out, or the same config)")
        results["recipes"] = {**earlier["recipes"], **results["recipes"]}
        results["seeds"] = earlier["seeds"]
        for row in results["seeds"].values():  # files from before runs recorded how they were evaluated
            for r in row["runs"].values():
                r.setdefault("evaluation", evaluation_of(earlier, row))

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
                if evaluation_of(earlier or results, row) != evaluation:  # measured another way: again
                    row["before"] = held_out_accuracy(cfg, warm, _held_out(cfg, warm), args.eval_n,
                                                      seed_dir / "eval_warm_start")
                    row["before_by_generation"] = {}
                    print(f"[recipes] seed {seed}: warm start evaluated again ({evaluation}): "
                          f"held-out {row['before']:.1%}", flush=True)
                row["evaluation"] = evaluation
                save()
            else:
                t = time.monotonic()
                warm, sft = warm_start(cfg, base, seed_dir / "warm_start", steps=args.sft_steps, lr=args.sft_lr,
                                       target_accuracy=args.warm_target, kind_floor=args.kind_floor)
                row = {"sft_steps": sft["steps"], "sft_s": time.monotonic() - t, "sft_estimate": sft["checks"][-1],
                       "runs": {}, "evaluation": evaluation}
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
                before, before_dir = row["before"], seed_dir / "eval_warm_start"
                if eval_cfg.generator != cfg.generator:  # the warm start, evaluated the way this recipe generates
                    befores = row.setdefault("before_by_generation", {})
                    dirs = row.setdefault("before_dirs", {})
                    key = ",".join(generation)
                    if key not in befores or key not in dirs:
                        dirs[key] = str(seed_dir / f"eval_warm_start_{name}")
                        befores[key] = held_out_accuracy(eval_cfg, warm, held_out, args.eval_n, Path(dirs[key]))
                    before, before_dir = befores[key], Path(dirs[key])
                after = held_out_accuracy(eval_cfg, final, held_out, args.eval_n, seed_dir / f"eval_{name}")
                gain = paired_difference(before_dir / "samples.jsonl", seed_dir / f"eval_{name}" / "samples.jsonl")
                row["runs"][name] = {"before": before, "after": after, "gain": after - before,
                                     "half_width_95": gain["half_width_95"], "evaluation": evaluation, "rl_s": rl_s,
                                     "steps": steps, "buffer": buffer, "generation": generation}
                print(f"[recipes] seed {seed} {name}: {before:.1%} -> {after:.1%} "
                      f"({100 * (after - before):+.1f} points, 95 % interval +-{100 * gain['half_width_95']:.1f}), "
                      f"RL {rl_s:.0f} s", flush=True)
                save()
    finally:
        ray.shutdown()

    print("\n" + gain_table(results, [n for n, _ in recipes]), flush=True)
    return results


def gain_table(results: dict[str, Any], names: list[str]) -> str:
    """The seeds x recipes table of gains, each with its 95 % interval and RL time; a gain measured
    under another evaluation than the file's current one is marked. Pure; tested."""
    now = evaluation_of(results)
    lines = ["| seed | warm start | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    marked = False
    for seed, row in results["seeds"].items():
        cells = []
        for n in names:
            r = row["runs"].get(n)
            if r is None:
                cells.append("-")
                continue
            other = r.get("evaluation") != now
            marked |= other
            interval = f" +-{100 * r['half_width_95']:.1f}" if "half_width_95" in r else ""
            cells.append(f"{100 * r['gain']:+.1f}{interval}{' *' if other else ''} ({r['rl_s']:.0f} s)")
        lines.append(f"| {seed} | {row.get('before', 0):.1%} ({row['sft_steps']} SFT) | " + " | ".join(cells) + " |")
    note = ("\n* measured under another evaluation than " + f"{now['num_eval']} problems x {now['n']} samples "
            "(--reevaluate measures it again)") if marked else ""
    return (f"held-out gain with tools, points (95 % interval; RL wall time); {now['num_eval']} problems x "
            f"{now['n']} samples\n" + "\n".join(lines) + note)
