"""`bench.py recovery`: a short real run (two generators, two interpreter pools, two scorers, the
learner) during which one actor of each role is killed in turn, with the time each took to recover.

Figures per role: kill -> serving again (generator: it echoed the current weights' fingerprint and
is admitted; interpreter pool and scorer: a new process answers), kill -> training again (learner
rank, buffer: the run resumed from its latest checkpoint by itself); steps lost (trained after
the checkpoint the run resumed from, trained again), groups and trajectories regenerated (dropped
as `generator_lost` or `resumed`, their prompts admitted again), and throughput (trajectories/s)
of the steps during each recovery against the steady steps. Then (unless --no-driver) a second
short run under `entrypoints/train.py` whose driver is SIGKILLed: seconds until its supervisor
starts it again, until it resumed, and until it trains again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

NAMESPACE = "cir-bench-recovery"


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


class _Killer(threading.Thread):
    def __init__(self, run_dir: Path, plan: list[tuple[int, str]]):
        super().__init__(daemon=True)
        self.run_dir, self.plan, self.done = run_dir, list(plan), threading.Event()
        self.events: list[dict[str, Any]] = []

    def run(self) -> None:
        import ray

        while self.plan and not self.done.is_set():
            step, name = self.plan[0]
            rows = _rows(self.run_dir)
            if rows and rows[-1]["step"] >= step:
                try:
                    actor = ray.get_actor(name, namespace=NAMESPACE)
                except ValueError:
                    time.sleep(0.3)
                    continue
                stateless = name.startswith(("interpreter", "scorer"))
                pid = ray.get(actor.health.remote(), timeout=30)["pid"] if stateless else None
                t0 = time.monotonic()
                ray.kill(actor, no_restart=not stateless)
                ev = {"name": name, "role": name.split("-")[0], "at_step": rows[-1]["step"], "t_kill": time.time()}
                if stateless:  # Ray restarts it: time until a new process answers
                    while time.monotonic() - t0 < 300:
                        try:
                            if ray.get(actor.health.remote(), timeout=2)["pid"] != pid:
                                ev["serving_again_s"] = round(time.monotonic() - t0, 2)
                                break
                        except Exception:  # noqa: BLE001, S110 - restarting
                            pass
                        time.sleep(0.1)
                self.events.append(ev)
                self.plan.pop(0)
            time.sleep(0.2)


def driver_kill(overrides: list[str], kill_after_step: int = 3, timeout_s: float = 900.0) -> dict[str, Any]:
    """`entrypoints/train.py` in a subprocess (its supervisor) on the running Ray; its driver (the
    child) SIGKILLed after `kill_after_step`: seconds from the kill to the supervisor's restart line,
    to `resumed from`, and to the next step trained; and whether the run then finished."""
    import os
    import signal
    import subprocess
    import sys

    import ray

    from cir_actors.ops.processes import descendants

    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("logging.run_dir=")))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log_path = run_dir.parent / "driver-stderr.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(root / "entrypoints" / "train.py"), *overrides], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and len(_rows(run_dir)) < kill_after_step:
        time.sleep(0.1)
    if proc.poll() is not None or not descendants(proc.pid):
        raise RuntimeError(f"the run ended before step {kill_after_step}: {log_path.read_text()[-2000:]}")
    (driver, _), *_ = descendants(proc.pid)
    at_step = _rows(run_dir)[-1]["step"]
    os.kill(driver, signal.SIGKILL)
    t0, out = time.monotonic(), {"killed_after_step": at_step}
    seen = None
    while time.monotonic() < deadline and proc.poll() is None:
        text = log_path.read_text()
        if "restarted_s" not in out and "starting it again" in text:
            out["restarted_s"] = round(time.monotonic() - t0, 2)
        if "resumed_s" not in out and "resumed from" in text.split("starting it again", 1)[-1]:
            out["resumed_s"] = round(time.monotonic() - t0, 2)
            rows = _rows(run_dir)
            seen = (len(rows), rows[-1] if rows else None)
        if seen is not None:
            rows = _rows(run_dir)
            if (len(rows), rows[-1] if rows else None) != seen:
                out["training_again_s"] = round(time.monotonic() - t0, 2)
                break
        time.sleep(0.1)
    out["exit_code"] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    rows = _rows(run_dir)
    out["finished_all_steps"] = bool(rows) and rows[-1]["step"] == int(
        next(o.split("=", 1)[1] for o in overrides if o.startswith("scheduler.total_steps=")))
    return out


def run(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="bench.py recovery")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-driver", action="store_true", help="skip the driver-kill run")
    args = p.parse_args(argv)
    from cir_actors.config import load_config
    from cir_actors.control.trainer import init_ray, train

    plan = [(2, "generator-1"), (3, "interpreter-0"), (4, "scorer-1"), (5, "learner-rank-0"), (7, "buffer")]
    with tempfile.TemporaryDirectory(prefix="cir-bench-recovery-") as tmp:
        run_dir = Path(tmp) / "run"
        cfg = load_config(None, [
            f"logging.run_dir={run_dir}", "logging.wandb_mode=disabled", "logging.progress=false",
            f"scheduler.total_steps={args.steps}", "scheduler.max_staleness=1", "learner.prompts_per_step=2",
            "learner.mini_batch_prompts=2", "generator.samples_per_prompt=4", "generator.max_response_tokens=64",
            "generator.num_generators=2", "generator.num_cpus=0.25", "interpreter.num_pools=2",
            "scorer.num_scorers=2", "learner.num_cpus=0.5", "learner.save_every=2",
            f"cluster.namespace={NAMESPACE}", "data.num_train=128",
        ])
        init_ray(cfg)
        killer = _Killer(run_dir, plan)
        killer.start()
        t0 = time.monotonic()
        try:
            train(cfg)
        finally:
            killer.done.set()
            killer.join(timeout=5)
        wall = time.monotonic() - t0
        rows = _rows(run_dir)
        recs = [json.loads(line) for line in (run_dir / "recoveries.jsonl").read_text().splitlines()]
        driver = None
        if not args.no_driver:  # the driver itself: entrypoints/train.py's supervisor starts it again
            driver = driver_kill([
                f"logging.run_dir={Path(tmp) / 'driver' / 'run'}", "logging.wandb_mode=disabled",
                "logging.progress=false", "scheduler.total_steps=6", "scheduler.max_staleness=1",
                "learner.prompts_per_step=2", "learner.mini_batch_prompts=2", "generator.samples_per_prompt=4",
                "generator.max_response_tokens=64", "generator.num_generators=1", "generator.num_cpus=0.25",
                "interpreter.num_pools=1", "scorer.num_scorers=1", "learner.num_cpus=0.5", "learner.save_every=1",
                f"cluster.namespace={NAMESPACE}-driver", "data.num_train=128",
            ])
    n = cfg.generator.samples_per_prompt
    out_rows = []
    gen_recs = [r for r in recs if r["role"] == "generator"]
    resume_recs = [r for r in recs if "resumed_after_s" in r]
    for ev in killer.events:
        role = ev["role"]
        row: dict[str, Any] = {"role": role, "killed_after_step": ev["at_step"]}
        if role in ("interpreter", "scorer"):
            row["recovery_s"] = ev.get("serving_again_s")
            row["what"] = "restarted by Ray, calls retried"
            row["steps_lost"] = 0
        elif role == "generator":
            rec = gen_recs.pop(0) if gen_recs else {}
            row["recovery_s"] = rec.get("serving_again_s")
            row["what"] = "restarted by the driver, weights re-sent and verified"
            row["steps_lost"] = 0
            row["trajectories_regenerated"] = rec.get("groups_released", 0) * n
        else:
            rec = resume_recs.pop(0) if resume_recs else {}
            row["recovery_s"] = rec.get("resumed_after_s")
            row["what"] = "run resumed from " + rec.get("resumed_from", "?")
            frm = rec.get("resumed_from", "step-0")
            row["steps_lost"] = max(0, ev["at_step"] - int(frm.split("-")[-1])) if frm.startswith("step-") else ev["at_step"]
        out_rows.append(row)
    last = rows[-1]
    dropped = last["conservation/groups_dropped_by_reason"]
    tput = [r["throughput/trajectories_per_s"] for r in rows[1:]]
    killed_steps = {ev["at_step"] + 1 for ev in killer.events}
    during = [r["throughput/trajectories_per_s"] for r in rows if r["step"] in killed_steps]
    steady = [r["throughput/trajectories_per_s"] for r in rows[1:] if r["step"] not in killed_steps]
    result = {
        "steps": args.steps, "wall_s": round(wall, 1), "kills": out_rows,
        "groups_regenerated": dropped.get("generator_lost", 0) + dropped.get("resumed", 0),
        "trajectories_dropped_by_reason": last["conservation/trajectories_dropped_by_reason"],
        "conservation_ok_every_step": all(r["conservation/groups_ok"] and r["conservation/trajectories_ok"]
                                          for r in rows),
        "throughput_steady_traj_per_s": statistics.median(steady) if steady else None,
        "throughput_during_recovery_traj_per_s": statistics.median(during) if during else None,
        "throughput_all_traj_per_s": statistics.median(tput) if tput else None,
    }
    print(f"{'role':<12} {'killed after step':>17} {'recovery s':>11} {'steps lost':>10}  what")
    for r in out_rows:
        rs = f"{r['recovery_s']:.1f}" if r.get("recovery_s") is not None else "-"
        print(f"{r['role']:<12} {r['killed_after_step']:>17} {rs:>11} {r['steps_lost']:>10}  {r['what']}")
    print(f"groups regenerated {result['groups_regenerated']}; trajectories dropped "
          f"{result['trajectories_dropped_by_reason']}; conservation held at every step: "
          f"{result['conservation_ok_every_step']}")
    print(f"throughput (trajectories/s, median): steady {result['throughput_steady_traj_per_s']}, "
          f"during recovery {result['throughput_during_recovery_traj_per_s']}")
    if driver is not None:
        result["driver"] = driver
        print(f"driver SIGKILLed after step {driver['killed_after_step']}: started again after "
              f"{driver.get('restarted_s', '-')} s, resumed after {driver.get('resumed_s', '-')} s, training again "
              f"after {driver.get('training_again_s', '-')} s; exit code {driver['exit_code']}, all steps "
              f"finished: {driver['finished_all_steps']}")
    return result
