"""`bench.py partials`: what continuing partial trajectories saves when a generator dies, and what
streaming them costs.

- Cost: the same short run (1 generator) with `generator.continue_partials` off, on (partials at
  interpreter calls and interruptions only, the default), and on with a partial also every
  `--every` sampled tokens, side by side: sampled tokens per trajectory-second of generation and per
  second of generator busy time. Target: on >= 0.95 of off. (The untrained tiny model seldom calls
  the interpreter, so "on" streams few partials here; "every" is the worst case.)
- Saving: the same run with and without continuation (2 generators; with it a partial every
  `--every` tokens), in which a generator is crashed mid-trajectory: its engine frozen until the
  buffer holds partials (with) or finished samples (without) of its in-flight groups, then the
  actor and its engine processes killed. "At risk": the response tokens the buffer held for those
  groups at that instant. Without continuation they are all generated again (their groups dropped
  as generator_lost), and what the dead generator had sampled of its unfinished samples is lost
  uncounted; with it the finished samples are kept and the partials continued
  (`partial/continued_tokens` of the trained trajectories). Either way the tokens a trajectory
  sampled after its last partial are lost (< --every each).
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


def _signal(pids: list[int], sig: int) -> None:
    """Send `sig` to each of `pids` that still exists (an engine may end a helper process at any time)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def crash_mid_trajectory(name: str, namespace: str, before_kill: Any = None, ready: Any = None) -> bool:
    """Freeze generator `name`'s engine (SIGSTOP); if the buffer then holds, for the groups it has in
    flight, what `ready` asks of `buffer.inflight_tokens` (default: some partial), call
    `before_kill(groups, held)`, crash it (the actor killed, its engine processes SIGKILLed) and
    return True; else thaw it and return False (try again). On the tiny model a trajectory lives a
    fraction of a second, too short to hit by polling alone. Whatever happens, no engine process is
    left stopped: a process that exits between being listed and being signalled is skipped."""
    import ray

    from cir_actors.ops.processes import descendants, kill_processes

    ready = ready or (lambda held: held["partial_tokens"] > 0)
    actor = ray.get_actor(name, namespace=namespace)
    sched, buf = (ray.get_actor(n, namespace=namespace) for n in ("scheduler", "buffer"))
    processes = descendants(ray.get(actor.health.remote(), timeout=30)["pid"])
    engine = [pid for pid, _ in processes]
    try:
        _signal(engine, signal.SIGSTOP)
        groups = ray.get(sched.inflight_of.remote(name), timeout=30)
        held = ray.get(buf.inflight_tokens.remote(groups), timeout=30) if groups else None
        if held is None or not ready(held):
            return False
        if before_kill is not None:
            before_kill(groups, held)
        ray.kill(actor, no_restart=True)
        kill_processes(processes)
        return True
    finally:
        _signal(engine, signal.SIGCONT)


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


def _cost(steps: int, every: int, reps: int, tmp: Path) -> dict[str, Any]:
    """Each mode run `reps` times, interleaved (forward, then backward order, ...): medians."""
    import statistics

    modes = [("off", False, 0), ("on", True, 0), (f"on_every_{every}", True, every)]
    runs: dict[str, list[dict[str, float]]] = {m: [] for m, _, _ in modes}
    for rep in range(reps):
        for mode, on, n in modes if rep % 2 == 0 else modes[::-1]:
            run_dir = tmp / f"cost-{mode}-{rep}"
            _train(_config(run_dir, steps, 1, on, n))
            rows = _rows(run_dir)[1:]  # the first step includes the engine's warm-up
            tokens = sum(r["sampled_tokens"] for r in rows)
            runs[mode].append({
                "tokens_per_traj_s": tokens / max(1e-9, sum(r["time/gen_generation_traj_s"] for r in rows)),
                "tokens_per_busy_s": tokens / max(1e-9, sum(r["time/gen_busy_s"] for r in rows)),
                "partials_streamed": sum(r["partial/streamed"] for r in rows),
            })
    out: dict[str, Any] = {}
    for mode, rs in runs.items():
        out[mode] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        out[mode]["tokens_per_busy_s_runs"] = [round(r["tokens_per_busy_s"], 1) for r in rs]
    for mode in ("on", f"on_every_{every}"):
        for k in ("tokens_per_traj_s", "tokens_per_busy_s"):
            out[mode][f"{k}_ratio"] = out[mode][k] / out["off"][k]
    return out


def _crash(steps: int, every: int, continue_partials: bool, tmp: Path) -> dict[str, Any]:
    run_dir = tmp / f"crash-{continue_partials}"
    at_risk: dict[str, Any] = {}
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not at_risk:
            rows = _rows(run_dir)
            if rows and rows[-1]["step"] >= 1:
                for name in ("generator-0", "generator-1"):
                    try:
                        def note(groups: list[int], held: dict[str, int], name: str = name,
                                 step: int = rows[-1]["step"]) -> None:
                            at_risk.update(held, generator=name, groups=len(groups), step=step)

                        # without continuation no partials are streamed: crash once finished samples are at risk
                        ready = None if continue_partials else (lambda held: held["finished_tokens"] > 0)
                        if crash_mid_trajectory(name, NAMESPACE, note, ready):
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
    p.add_argument("--reps", type=int, default=2, help="runs per cost mode (interleaved; medians)")
    args = p.parse_args(argv)
    from cir_actors.control.trainer import init_ray

    init_ray(_config(Path("/tmp"), args.steps, 1, True, args.every))
    with tempfile.TemporaryDirectory(prefix="cir-bench-partials-") as tmp:
        cost = _cost(args.steps, args.every, args.reps, Path(tmp))
        crash = {on: _crash(args.steps, args.every, on, Path(tmp)) for on in (False, True)}
    print(f"streaming partials (1 generator, {args.steps} steps, the first left out; median of {args.reps} "
          "interleaved runs, tokens/busy-s of each run in brackets):")
    print(f"{'':<14} {'tokens/traj-s':>14} {'tokens/busy-s':>14} {'partials':>9}")
    for mode, c in cost.items():
        print(f"{mode:<14} {c['tokens_per_traj_s']:>14.1f} {c['tokens_per_busy_s']:>14.1f} {c['partials_streamed']:>9}"
              + (f"   x{c['tokens_per_traj_s_ratio']:.3f} / x{c['tokens_per_busy_s_ratio']:.3f} of off"
                 if "tokens_per_traj_s_ratio" in c else "") + f"  {c['tokens_per_busy_s_runs']}")
    print("(target: on >= 0.95 of off)")
    print("\na generator crashed mid-trajectory (tokens: response tokens the buffer held for its groups):")
    print(f"{'continuation':<13} {'finished at risk':>16} {'partial at risk':>15} {'kept':>6} {'samples dropped':>16}")
    for on, c in crash.items():
        r = c["at_risk"]
        print(f"{'on' if on else 'off':<13} {r.get('finished_tokens', 0):>16} {r.get('partial_tokens', '-'):>15} "
              f"{c['tokens_kept']:>6.0f} {c['trajectories_dropped_generator_lost']:>16}")
    print("(without continuation no partials exist: what the dead generator had sampled of its unfinished "
          "samples is lost too, uncounted)")
    return {"every": args.every, "cost": cost, "crash": {("on" if k else "off"): v for k, v in crash.items()}}
