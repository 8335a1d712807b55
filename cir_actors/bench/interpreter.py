"""Interpreter benchmark: the sandboxed pool against a fresh interpreter per call and CIR's unisolated pool.

`python entrypoints/bench.py interpreter [--calls 1000] [--fresh-calls 16] [--clients 2,8] [--code CODE]`

Measured side by side in one run, each at 2 and 8 concurrent clients (threads issuing blocking calls):
  (a) pool      InterpreterPool with every isolation layer on;
  (b) fresh     a new `python -c "import sympy, numpy; <code>"` per call (what model code imports);
  (c) unsafe    a ProcessPoolExecutor whose warm workers `exec` the code with no isolation (CIR's way).
Per row: p50/p99 latency, calls/s, and CPU ms per call (all processes involved: the bench process,
the zygote and its children / the subprocesses / the workers). (b) is slow, so it runs fewer calls
(--fresh-calls); the ratio (a) vs (b) compares p50 latency and throughput.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from cir_actors.interpreter import InterpreterPool

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


def _row(name: str, clients: int, lat: list[float], wall: float, cpu_s: float) -> dict:
    n = len(lat)
    return {"impl": name, "clients": clients, "calls": n, "p50_ms": lat[n // 2],
            "p99_ms": lat[min(n - 1, int(n * 0.99))], "calls_per_s": n / wall, "cpu_ms_per_call": cpu_s / n * 1e3}


def _bench_pool(code: str, calls: int, clients: int, pool: InterpreterPool) -> dict:
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
    lat, wall = _drive(call, calls, clients)
    time.sleep(0.5)  # let the last children be reaped (their CPU lands in the zygote's cutime)
    return _row("pool (isolated)", clients, lat, wall, _proc_cpu_s(zygote) - c0 + time.process_time() - s0)


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


def _bench_unsafe(code: str, calls: int, clients: int, workers: int) -> dict:
    with cf.ProcessPoolExecutor(max_workers=workers, initializer=_warm) as ex:
        list(ex.map(_exec_unisolated, [code] * (workers * 4)))
        pids = list(ex._processes)  # the worker processes, for their CPU time

        def call() -> None:
            ex.submit(_exec_unisolated, code).result()

        c0, s0 = sum(_proc_cpu_s(p, False) for p in pids), time.process_time()
        lat, wall = _drive(call, calls, clients)
        cpu = sum(_proc_cpu_s(p, False) for p in pids) - c0 + time.process_time() - s0
    return _row("unisolated exec pool", clients, lat, wall, cpu)


def run(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="bench interpreter", description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per setting for (a) and (c)")
    ap.add_argument("--fresh-calls", type=int, default=16, help="calls per setting for (b), the slow one")
    ap.add_argument("--clients", default="2,8", help="comma-separated concurrent clients")
    ap.add_argument("--code", default="print(1)", help="the code each call runs")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    load = os.getloadavg()
    print(f"host: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; code {args.code!r}")
    rows = []
    with InterpreterPool(max_workers=max(clients)) as pool:
        layers = pool.isolation_report()["layers"]
        for c in clients:
            rows.append(_bench_pool(args.code, args.calls, c, pool))
    for c in clients:
        rows.append(_bench_fresh(args.code, args.fresh_calls, c))
    for c in clients:
        rows.append(_bench_unsafe(args.code, args.calls, c, max(clients)))
    print(f"{'implementation':<22}{'clients':>8}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}{'calls/s':>9}{'CPU ms/call':>13}")
    for r in rows:
        print(f"{r['impl']:<22}{r['clients']:>8}{r['calls']:>7}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['calls_per_s']:>9.1f}{r['cpu_ms_per_call']:>13.1f}")
    ratios = {}
    for c in clients:
        a = next(r for r in rows if r["impl"].startswith("pool") and r["clients"] == c)
        b = next(r for r in rows if r["impl"].startswith("fresh") and r["clients"] == c)
        ratios[c] = {"p50_speedup": b["p50_ms"] / a["p50_ms"], "throughput_ratio": a["calls_per_s"] / b["calls_per_s"]}
        print(f"pool vs fresh at {c} clients: p50 {ratios[c]['p50_speedup']:.0f}x faster, "
              f"{ratios[c]['throughput_ratio']:.0f}x the calls/s")
    print("isolation layers on:", ", ".join(name for name, on in layers.items() if on))
    return {"rows": rows, "pool_vs_fresh": ratios, "layers": layers, "loadavg": load}
