"""`bench.py partials`: what continuing partial trajectories saves when a generator dies, and what
streaming them costs.

- Cost: the same short run with `generator.continue_partials` off and on (a partial streamed every
  `--every` sampled tokens and after each interpreter call), side by side: sampled tokens per
  trajectory-second of generation and per second of generator busy time. Target: <= 5% slower.
- Saving: the same run, with and without continuation, in which a generator is crashed
  mid-trajectory (its engine frozen until the buffer holds partials of its groups, then the actor
  and its engine processes killed). At the crash, the buffer holds the response tokens of the dead
  generator's finished samples and latest partials of its in-flight groups ("at risk"). Without
  continuation all of them are generated again (their groups dropped as generator_lost); with it the
  finished samples are kept and the partials continued (`partial/continued_tokens`, trained).
  Either way the tokens a trajectory sampled after its last boundary are lost (<= --every each).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

NAMESPACE = "cir-bench-partials"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def crash_mid_trajectory(name: str, namespace: str, before_kill: Any = None) -> bool:
    """Freeze generator `name`'s engine (SIGSTOP); if the buffer then holds partials of the groups
    it has in flight, call `before_kill(groups)`, crash it (the actor killed, its engine processes
    SIGKILLed) and return True; else thaw it and return False (try again). On the tiny model a
    trajectory lives a fraction of a second, too short to hit by polling alone."""
    import ray

    actor = ray.get_actor(name, namespace=namespace)
    sched, buf = (ray.get_actor(n, namespace=namespace) for n in ("scheduler", "buffer"))
    engine = descendants(ray.get(actor.health.remote(), timeout=30)["pid"])
    for pid in engine:
        os.kill(pid, signal.SIGSTOP)
    try:
        groups = ray.get(sched.inflight_of.remote(name), timeout=30)
        if not groups or ray.get(buf.partials_held.remote(groups), timeout=30) == 0:
            return False
        if before_kill is not None:
            before_kill(groups)
        ray.kill(actor, no_restart=True)
        for pid in engine:
            os.kill(pid, signal.SIGKILL)
        return True
    finally:
        for pid in engine:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def _train(cfg: Any) -> None:
    from cir_actors.control.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.shutdown()


def _config(run_dir: Path, steps: int, generators: int, continue_partials: bool, every: int) -> Any:
    from cir_actors.config import load_config

    return load_config(None, [
        f"logging.run_dir={run_dir}", "logging.wandb_mode=disabled", "logging.progress=false",
        f"scheduler.total_steps={steps}", "scheduler.max_staleness=1", "learner.prompts_per_step=2",
        "learner.mini_batch_prompts=2", "generator.samples_per_prompt=4", "generator.max_response_tokens=64",
        f"generator.num_generators={generators}", "generator.num_cpus=0.25", "learner.num_cpus=0.5",
        f"generator.continue_partials={str(continue_partials).lower()}", f"generator.partial_every_tokens={every}",
        f"cluster.namespace={NAMESPACE}", "data.num_train=128",
    ])


def _cost(steps: int, every: int, tmp: Path) -> dict[str, Any]:
    out = {}
    for on in (False, True):
        run_dir = tmp / f"cost-{on}"
        _train(_config(run_dir, steps, 1, on, every))
        rows = _rows(run_dir)[1:]  # the first step includes the engine's warm-up
        tokens = sum(r["sampled_tokens"] for r in rows)
        out["on" if on else "off"] = {
            "tokens_per_traj_s": tokens / max(1e-9, sum(r["time/gen_generation_traj_s"] for r in rows)),
            "tokens_per_busy_s": tokens / max(1e-9, sum(r["time/gen_busy_s"] for r in rows)),
        }
    for k in ("tokens_per_traj_s", "tokens_per_busy_s"):
        out[f"{k}_ratio"] = out["on"][k] / out["off"][k]
    return out


def _crash(steps: int, every: int, continue_partials: bool, tmp: Path) -> dict[str, Any]:
    import ray

    run_dir = tmp / f"crash-{continue_partials}"
    at_risk: dict[str, Any] = {}
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not at_risk:
            rows = _rows(run_dir)
            if rows and rows[-1]["step"] >= 1:
                for name in ("generator-0", "generator-1"):
                    try:
                        def note(groups: list[int], name: str = name, step: int = rows[-1]["step"]) -> None:
                            buf = ray.get_actor("buffer", namespace=NAMESPACE)
                            at_risk.update(ray.get(buf.inflight_tokens.remote(groups), timeout=30),
                                           generator=name, groups=len(groups), step=step)

                        if crash_mid_trajectory(name, NAMESPACE, note):
                            break
                    except ValueError:  # not there (yet)
                        pass
            time.sleep(0.02)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        _train(_config(run_dir, steps, 2, continue_partials, every))
    finally:
        stop.set()
        th.join(timeout=30)
    rows = _rows(run_dir)
    last = rows[-1]
    lost = last["conservation/trajectories_dropped_by_reason"].get("generator_lost", 0)
    continued = sum(r["partial/continued_tokens"] for r in rows)
    risk = at_risk.get("finished_tokens", 0) + at_risk.get("partial_tokens", 0)
    kept_finished = at_risk.get("finished_tokens", 0) if continue_partials else 0
    return {"at_risk": at_risk, "trajectories_dropped_generator_lost": lost, "continued_tokens_trained": continued,
            "tokens_at_risk": risk, "tokens_kept": kept_finished + continued,
            "conservation_ok_every_step": all(r["conservation/groups_ok"] and r["conservation/trajectories_ok"]
                                              for r in rows)}


def run(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="bench.py partials")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--every", type=int, default=16, help="generator.partial_every_tokens")
    args = p.parse_args(argv)
    from cir_actors.control.trainer import init_ray

    init_ray(_config(Path("/tmp"), args.steps, 1, True, args.every))
    with tempfile.TemporaryDirectory(prefix="cir-bench-partials-") as tmp:
        cost = _cost(args.steps, args.every, Path(tmp))
        crash = {on: _crash(args.steps, args.every, on, Path(tmp)) for on in (False, True)}
    print(f"streaming partials every {args.every} tokens (1 generator, {args.steps} steps, first left out):")
    print(f"{'':<10} {'tokens/traj-s':>14} {'tokens/busy-s':>14}")
    for k in ("off", "on"):
        print(f"{k:<10} {cost[k]['tokens_per_traj_s']:>14.1f} {cost[k]['tokens_per_busy_s']:>14.1f}")
    print(f"{'on/off':<10} {cost['tokens_per_traj_s_ratio']:>14.3f} {cost['tokens_per_busy_s_ratio']:>14.3f}"
          "   (target >= 0.95)")
    print("\na generator crashed mid-trajectory:")
    print(f"{'continuation':<13} {'tokens at risk':>14} {'kept':>6} {'regenerated':>12} {'samples dropped':>16}")
    for on, c in crash.items():
        print(f"{'on' if on else 'off':<13} {c['tokens_at_risk']:>14} {c['tokens_kept']:>6} "
              f"{max(0, c['tokens_at_risk'] - c['tokens_kept']):>12} {c['trajectories_dropped_generator_lost']:>16}")
    return {"every": args.every, "cost": cost, "crash": {("on" if k else "off"): v for k, v in crash.items()}}
