"""Scorer throughput and deadline: `python entrypoints/bench.py scorer [--n N] [--timeout S] [--actors K]`.

Inputs are MATH500's gold answers (the most varied LaTeX of the five benchmarks), each scored once
against itself (correct) and once against another problem's answer (mostly wrong), in a response
with a code block and an interpreter output to strip. Measured, warm (workers started first):
- verdicts/s with one worker and with the pool (wall clock: on a shared machine, load lowers it);
- verdicts per CPU-second (worker + this process), the per-core figure that load does not change;
- with --actors K, verdicts/s through K Ray scorer actors (fractional CPUs), called with score_async;
- the time a pathological input (a power tower sympy tries to evaluate) takes to come back as a
  timeout, and how long the killed worker's replacement takes to be warm again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from cir_actors.config import ScorerConfig
from cir_actors.scoring.scorer import Scorer, gold_answer
from cir_actors.types import VerdictReason

BENCHMARKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"
PATHOLOGICAL = "So the answer is \\boxed{9^{9^{9^{9}}}}."


def _pairs(n: int) -> list[tuple[str, str]]:
    lines = (BENCHMARKS / "MATH_OAI.jsonl").read_text().splitlines()
    golds = [json.loads(line)["answer"] for line in lines if line.strip()]
    pairs = []
    for i, gold in enumerate(golds):
        other = golds[(i * 7 + 3) % len(golds)]
        for answer in (gold, other):
            response = (
                "Let me compute.\n```python\nprint(42)\n```\n```output\n\\boxed{42}\n```\n"
                f"Therefore the final answer is $\\boxed{{{gold_answer(answer)}}}$."
            )
            pairs.append((response, gold))
    return (pairs * (n // len(pairs) + 1))[:n]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _throughput(scorer: Scorer, pairs: list[tuple[str, str]]) -> tuple[float, float, dict[str, int]]:
    """(verdicts per wall second, verdicts per CPU second of workers + this process, reasons)."""
    scorer.warmup()
    pids = scorer.worker_pids()
    cpu0 = sum(_cpu_s(p) for p in pids) + time.process_time()
    t0 = time.perf_counter()
    verdicts = scorer.score_many(pairs)
    elapsed = time.perf_counter() - t0
    cpu = sum(_cpu_s(p) for p in pids) + time.process_time() - cpu0
    reasons: dict[str, int] = {}
    for v in verdicts:
        reasons[v.reason.value] = reasons.get(v.reason.value, 0) + 1
    return len(pairs) / elapsed, len(pairs) / cpu, reasons


def _actors_throughput(cfg: ScorerConfig, pairs: list[tuple[str, str]], k: int) -> float:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=max(2, k), include_dashboard=False, log_to_driver=False)
    try:
        cls = ray.remote(Scorer).options(num_cpus=cfg.num_cpus, max_concurrency=4 * cfg.num_workers)
        actors = [cls.remote(cfg) for _ in range(k)]
        ray.get([a.warmup.remote() for a in actors])

        async def run_all() -> list:
            refs = [actors[i % k].score_async.remote(r, g) for i, (r, g) in enumerate(pairs)]
            return await asyncio.gather(*refs)

        t0 = time.perf_counter()
        asyncio.run(run_all())
        elapsed = time.perf_counter() - t0
        for a in actors:
            ray.kill(a)
        return len(pairs) / elapsed
    finally:
        if started:
            ray.shutdown()


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py scorer", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="verdicts per throughput measurement")
    parser.add_argument("--timeout", type=float, default=5.0, help="scorer deadline, seconds")
    parser.add_argument("--workers", type=int, default=2, help="workers in the pool measurement")
    parser.add_argument("--actors", type=int, default=0, help="also measure K Ray scorer actors")
    args = parser.parse_args(argv)
    pairs = _pairs(args.n)
    results: dict = {"n": args.n, "cpu_count": os.cpu_count()}

    one = Scorer(ScorerConfig(num_workers=1, timeout_s=args.timeout))
    results["verdicts_per_s_1_worker"], results["verdicts_per_cpu_s"], results["reasons"] = _throughput(
        one, pairs
    )
    one.close()

    pool_cfg = ScorerConfig(num_workers=args.workers, timeout_s=args.timeout)
    pool = Scorer(pool_cfg)
    results[f"verdicts_per_s_{args.workers}_workers"], _, _ = _throughput(pool, pairs)

    t0 = time.perf_counter()
    verdict = pool.score(PATHOLOGICAL, "5")
    results["pathological_s"] = time.perf_counter() - t0
    results["pathological_reason"] = verdict.reason.value
    t0 = time.perf_counter()
    pool.warmup()  # the replacement worker is warm again
    results["replacement_warm_s"] = time.perf_counter() - t0
    if verdict.reason is not VerdictReason.TIMEOUT:  # a bench that measured no timeout is void
        raise RuntimeError(f"the pathological input did not time out: {verdict}")
    pool.close()

    if args.actors:
        results[f"verdicts_per_s_{args.actors}_actors"] = _actors_throughput(pool_cfg, pairs, args.actors)

    print(f"{'measure':<34}{'value':>12}")
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<34}{shown:>12}")
    return results
