"""Interpreter benchmark: the sandboxed pool against a fresh interpreter per call and CIR's unisolated pool.

`python entrypoints/bench.py interpreter [--calls 1000] [--fresh-calls 16] [--clients 2,8] [--rate 100] [--code CODE]`

Measured side by side in one run, each at 2 and 8 concurrent clients (threads issuing blocking calls):
  (a) pool      InterpreterPool with every isolation layer on;
  (b) fresh     a new `python -c "import sympy, numpy; <code>"` per call (what model code imports);
  (c) unsafe    a ProcessPoolExecutor whose warm workers `exec` the code with no isolation (CIR's way).
Per row: p50/p99 latency, calls/s, and CPU ms per call (all processes involved: the bench process,
the zygote and its children / the subprocesses / the workers). (b) is slow, so it runs fewer calls
(--fresh-calls); the ratio (a) vs (b) compares p50 latency and throughput.
Those rows are closed loop (each client calls again the moment its call returns): they measure the
ceiling, and at 8 clients Little's law sets p50 = 8 / calls/s. A generator's tool calls instead
arrive as trajectories reach a code block, so (a) and (c) are also driven open loop: calls arriving
at --rate per second (Poisson), handed round-robin to the clients, latency counted from arrival
(a call that waited for a busy client counts the wait). The `offered` column says which.

Then the execution cache (`interpreter.cache`) on a rollout-like workload, side by side in one run:
--groups prompt groups of --n samples each (asyncio, one task per sample, a group's samples at once,
--group-concurrency groups in flight); in a group most samples write the same program and a few a
variant of it (as on the demo task), and a second pass replays the same groups (the next epoch).
Two pools, one with the cache off and one with it on, alternate pass by pass; per pool: calls made,
sandbox runs, hit rate, calls saved and wall time, and whether every output matched the uncached one.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextlib
import io
import os
import random
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from cir_actors.sandbox.pool import InterpreterPool

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int, with_children: bool = True) -> float:
    """utime+stime (+ reaped children's) of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11 : 15 if with_children else 13])
    return ticks / _TICK


def _drive(call: Callable[[], None], calls: int, clients: int) -> tuple[list[float], float]:
    """Run `calls` calls from `clients` threads; per-call latencies (ms) and the wall time (s)."""
    lat: list[float] = []
    lock = threading.Lock()
    left = [calls]

    def client() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            t0 = time.perf_counter()
            call()
            with lock:
                lat.append((time.perf_counter() - t0) * 1e3)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(lat), time.perf_counter() - t0


def _drive_paced(call: Callable[[], None], calls: int, clients: int, rate: float) -> tuple[list[float], float]:
    """Open loop: `calls` calls arriving at `rate` per second (Poisson, fixed seed), the i-th handed
    to client i mod `clients`; per-call latencies (ms) counted from the arrival, and the wall time."""
    rng, t, arrivals = random.Random(0), 0.0, []
    for _ in range(calls):
        t += rng.expovariate(rate)
        arrivals.append(t)
    lat: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.05

    def client(times: list[float]) -> None:
        for a in times:
            at = start + a
            if (wait := at - time.perf_counter()) > 0:
                time.sleep(wait)
            call()
            with lock:
                lat.append((time.perf_counter() - at) * 1e3)

    threads = [threading.Thread(target=client, args=(arrivals[i::clients],)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sorted(lat), time.perf_counter() - start


def _row(name: str, clients: int, lat: list[float], wall: float, cpu_s: float, rate: float | None = None) -> dict:
    n = len(lat)
    return {"impl": name, "clients": clients, "offered_per_s": rate, "calls": n, "p50_ms": lat[n // 2],
            "p99_ms": lat[min(n - 1, int(n * 0.99))], "calls_per_s": n / wall, "cpu_ms_per_call": cpu_s / n * 1e3}


def _bench_pool(code: str, calls: int, clients: int, pool: InterpreterPool, rate: float | None = None) -> dict:
    zygote = pool.isolation_report()["zygote_pid"]
    expected = pool.run(code).stdout
    for _ in range(20):
        pool.run(code)

    def call() -> None:
        r = pool.run(code)
        if r.stdout != expected:
            raise RuntimeError(f"pool returned {r}")

    time.sleep(0.5)
    c0, s0 = _proc_cpu_s(zygote), time.process_time()
    lat, wall = _drive(call, calls, clients) if rate is None else _drive_paced(call, calls, clients, rate)
    time.sleep(0.5)  # let the last children be reaped (their CPU lands in the zygote's cutime)
    return _row("pool (isolated)", clients, lat, wall, _proc_cpu_s(zygote) - c0 + time.process_time() - s0, rate)


def _bench_fresh(code: str, calls: int, clients: int) -> dict:
    cmd = [sys.executable, "-c", f"import sympy, numpy\n{code}"]

    def call() -> None:
        subprocess.run(cmd, check=True, capture_output=True, env={"PATH": "/usr/bin:/bin"})

    r0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
    lat, wall = _drive(call, calls, clients)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime + time.process_time() - s0
    return _row("fresh python -c", clients, lat, wall, cpu)


def _warm() -> None:
    import numpy  # noqa: F401
    import sympy  # noqa: F401


def _exec_unisolated(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"__name__": "__main__"})  # noqa: S102 - the unisolated baseline, as CIR ran it
    return out.getvalue()


def _bench_unsafe(code: str, calls: int, clients: int, workers: int, rate: float | None = None) -> dict:
    with cf.ProcessPoolExecutor(max_workers=workers, initializer=_warm) as ex:
        list(ex.map(_exec_unisolated, [code] * (workers * 4)))
        pids = list(ex._processes)  # the worker processes, for their CPU time

        def call() -> None:
            ex.submit(_exec_unisolated, code).result()

        c0, s0 = sum(_proc_cpu_s(p, False) for p in pids), time.process_time()
        lat, wall = _drive(call, calls, clients) if rate is None else _drive_paced(call, calls, clients, rate)
        cpu = sum(_proc_cpu_s(p, False) for p in pids) - c0 + time.process_time() - s0
    return _row("unisolated exec pool", clients, lat, wall, cpu, rate)


def _group_programs(groups: int, n: int) -> list[list[str]]:
    """Per group, the n samples' programs: 5/8 the group's common program, the rest two variants."""
    out = []
    for g in range(groups):
        base = f"from sympy import factorint, isprime\nN = {10**9 + 7 * g}\nprint(factorint(N), isprime(N + 2))"
        variants = [base, base.replace("print(", "print('N =', N, "), base + "\nprint(N % 97)"]
        out.append([variants[0 if j < (5 * n + 7) // 8 else 1 + j % 2] for j in range(n)])
    return out


async def _rollout_pass(pool: InterpreterPool, programs: list[list[str]], group_concurrency: int) -> list[list[str]]:
    sem = asyncio.Semaphore(group_concurrency)

    async def group(codes: list[str]) -> list[str]:
        async with sem:
            results = await asyncio.gather(*[pool.run_async(c) for c in codes])
        if not all(r.ok for r in results):
            raise RuntimeError(f"cache bench: a call failed: {next(r for r in results if not r.ok)}")
        return [r.stdout for r in results]

    return await asyncio.gather(*[group(codes) for codes in programs])


def bench_cache(groups: int, n: int, group_concurrency: int, passes: int = 2) -> dict:
    """The rollout-like workload through a pool without and with the execution cache, alternating."""
    programs = _group_programs(groups, n)
    calls = groups * n
    rows = {}
    with InterpreterPool(max_workers=8) as off, InterpreterPool(max_workers=8, cache={"enabled": True}) as on:
        for p in (off, on):
            p.run("print(1)")
        base = on.cache_stats()
        wall = {"off": [], "on": []}
        outputs = {"off": [], "on": []}
        for _ in range(passes):
            for name, pool in (("off", off), ("on", on)):
                t0 = time.perf_counter()
                outputs[name].append(asyncio.run(_rollout_pass(pool, programs, group_concurrency)))
                wall[name].append(time.perf_counter() - t0)
        st = {k: v - base[k] for k, v in on.cache_stats().items() if k not in ("enabled", "hit_rate")}
    st["hit_rate"] = st["hits"] / max(1, st["lookups"])
    for name in ("off", "on"):
        rows[name] = {"calls": calls * passes, "wall_s": sum(wall[name]), "per_pass_s": wall[name]}
    rows["on"].update({"sandbox_runs": st["misses"], "hit_rate": st["hit_rate"], "calls_saved": st["calls_saved"],
                       "entries": st["entries"], "bytes": st["bytes"]})
    rows["off"].update({"sandbox_runs": calls * passes, "hit_rate": 0.0, "calls_saved": 0})
    same = outputs["on"] == outputs["off"]
    print(f"execution cache: {groups} groups x n={n} samples, {group_concurrency} groups in flight, {passes} passes "
          f"(pass 2+ = the same groups again)")
    print(f"{'cache':<7}{'calls':>7}{'runs':>7}{'hit rate':>10}{'saved':>7}" + "".join(
        f"{f'pass {i + 1} s':>10}" for i in range(passes)) + f"{'total s':>9}")
    for name in ("off", "on"):
        r = rows[name]
        print(f"{name:<7}{r['calls']:>7}{r['sandbox_runs']:>7}{r['hit_rate']:>10.1%}{r['calls_saved']:>7}"
              + "".join(f"{w:>10.2f}" for w in r["per_pass_s"]) + f"{r['wall_s']:>9.2f}")
    speedup = rows["off"]["wall_s"] / rows["on"]["wall_s"]
    first = rows["off"]["per_pass_s"][0] / rows["on"]["per_pass_s"][0]
    print(f"cache on vs off: {speedup:.2f}x faster overall, {first:.2f}x on the first pass; "
          f"outputs identical to the uncached pool: {same}")
    return {"rows": rows, "speedup": speedup, "first_pass_speedup": first, "outputs_identical": same}


def run(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="bench interpreter", description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per setting for (a) and (c)")
    ap.add_argument("--fresh-calls", type=int, default=16, help="calls per setting for (b), the slow one")
    ap.add_argument("--clients", default="2,8", help="comma-separated concurrent clients")
    ap.add_argument("--code", default="print(1)", help="the code each call runs")
    ap.add_argument("--rate", type=float, default=100.0,
                    help="calls/s offered in the open-loop rows (0: closed loop only)")
    ap.add_argument("--groups", type=int, default=16, help="prompt groups in the cache workload")
    ap.add_argument("--n", type=int, default=8, help="samples per group in the cache workload")
    ap.add_argument("--group-concurrency", type=int, default=2, help="groups in flight in the cache workload")
    ap.add_argument("--only", choices=["pools", "cache"], help="run only the pool comparison or only the cache one")
    args = ap.parse_args(argv)
    if args.only == "cache":
        return {"cache": bench_cache(args.groups, args.n, args.group_concurrency)}
    clients = [int(c) for c in args.clients.split(",")]
    load = os.getloadavg()
    print(f"host: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; code {args.code!r}")
    rows = []
    with InterpreterPool(max_workers=max(clients)) as pool:
        layers = pool.isolation_report()["layers"]
        for c in clients:
            rows.append(_bench_pool(args.code, args.calls, c, pool))
        for c in clients if args.rate else []:
            rows.append(_bench_pool(args.code, args.calls, c, pool, args.rate))
    for c in clients:
        rows.append(_bench_fresh(args.code, args.fresh_calls, c))
    for c in clients:
        rows.append(_bench_unsafe(args.code, args.calls, c, max(clients)))
    for c in clients if args.rate else []:
        rows.append(_bench_unsafe(args.code, args.calls, c, max(clients), args.rate))
    print(f"{'implementation':<22}{'clients':>8}{'offered':>9}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}{'calls/s':>9}"
          f"{'CPU ms/call':>13}")
    for r in rows:
        offered = "max" if r["offered_per_s"] is None else f"{r['offered_per_s']:.0f}/s"
        print(f"{r['impl']:<22}{r['clients']:>8}{offered:>9}{r['calls']:>7}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['calls_per_s']:>9.1f}{r['cpu_ms_per_call']:>13.1f}")
    if args.rate:
        print(f"fresh python -c is not driven at {args.rate:.0f}/s: it cannot reach it (see its calls/s above)")
    ratios = {}
    for c in clients:
        a = next(r for r in rows if r["impl"].startswith("pool") and r["clients"] == c and r["offered_per_s"] is None)
        b = next(r for r in rows if r["impl"].startswith("fresh") and r["clients"] == c)
        ratios[c] = {"p50_speedup": b["p50_ms"] / a["p50_ms"], "throughput_ratio": a["calls_per_s"] / b["calls_per_s"]}
        print(f"pool vs fresh at {c} clients: p50 {ratios[c]['p50_speedup']:.0f}x faster, "
              f"{ratios[c]['throughput_ratio']:.0f}x the calls/s")
    print("isolation layers on:", ", ".join(name for name, on in layers.items() if on))
    out = {"rows": rows, "pool_vs_fresh": ratios, "layers": layers, "loadavg": load}
    if args.only != "pools":
        out["cache"] = bench_cache(args.groups, args.n, args.group_concurrency)
    return out
