"""The interpreter pool: runs the model's Python in an isolated, warm sandbox and formats the result.

`InterpreterPool` is the supervisor. It starts one zygote process (`sandbox/zygote.py`) that has
entered its namespaces and filesystem jail and imported sympy and numpy, and forks one sandboxed
child per call; the two speak length-prefixed msgpack frames over a unix socket (no pickle crosses
the boundary). The pool is plain Python, blocking (`run`) or asyncio (`run_async`); as a Ray actor
it is `ray.remote(InterpreterPool).options(num_cpus=0.5, max_concurrency=64).remote(cfg)` and a
generator talks to it through `RayInterpreter`. Starting fails with `SandboxUnavailable` when a layer
cannot be applied, unless `allow_weaker_isolation` is set (then the missing layers are logged and
listed by `isolation_report()`).

What the sandbox stops: network (empty network namespace, seccomp, landlock TCP), reading host files
(jail with only the interpreter's files, landlock, unprivileged uid), writing outside a private tmpfs
working dir, seeing the host's environment or processes, signalling the pool, outliving the call
(pid namespace torn down by SIGKILL at the deadline), fork bombs (RLIMIT_NPROC on a uid of its own),
memory, CPU and output exhaustion, and mutations leaking into later calls (fresh fork each call).
What it does not stop: kernel exploits through the syscalls still allowed (the seccomp list denies
the risky families, it is not an allow-list), CPU side channels, reading the interpreter's own
files and the world-readable files of /usr, and a session's blocks seeing what earlier blocks of the
same session left behind (by design).

With `interpreter.cache.enabled` the pool keeps an `ExecCache`: a bounded map from the exact program
it would run (the code, its timeout and, with sessions on, the blocks the session ran before it) to
the result of a run that completed normally within its limits. The samples of a GRPO group that run
the same program, in this step or a later one, get that result without a fork (docs/sandbox.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pydantic import ValidationError

from cir_actors.config import ConfigError, ExecCacheConfig, InterpreterConfig
from cir_actors.ops.metrics import InterpreterMetrics
from cir_actors.sandbox.layers import FrameReader, pack_frame
from cir_actors.types import ExecResult, ProbeFailed, last_error_line

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0
_ZYGOTE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class SandboxUnavailable(RuntimeError):
    """The configured isolation cannot be applied on this machine."""


def format_output(result: ExecResult, max_chars: int) -> str:
    """CIR's splice of a result into the model's context: "\\n```output\\n" + text + "\\n```\\n".

    text is stdout stripped when the call succeeded. On failure it is stdout stripped followed, on a
    new line, by the error line (CIR's executor showed only the error line; keeping the output the
    code printed before failing gives the model strictly more to go on). Longer than `max_chars`, it
    keeps the first max_chars//2 and the last max_chars - max_chars//2 characters around "...".
    """
    text = result.stdout.strip()
    if not result.ok:
        error = result.error or "Error"
        text = f"{text}\n{error}" if text else error
    if len(text) > max_chars:
        head = max_chars // 2
        text = text[:head] + "..." + text[len(text) - (max_chars - head) :]
    return "\n```output\n" + text + "\n```\n"


def _config(cfg: InterpreterConfig | None, overrides: dict[str, Any]) -> InterpreterConfig:
    base = cfg if cfg is not None else InterpreterConfig()
    if not overrides:
        return base
    try:
        return InterpreterConfig.model_validate({**base.model_dump(), **overrides})
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"InterpreterPool: unknown option interpreter.{key}") from None
        raise ConfigError(f"InterpreterPool: interpreter.{key} = {first.get('input')!r}: {first['msg']}") from None


class _Zygote:
    """One running zygote process and the calls in flight on it."""

    def __init__(self, cfg: InterpreterConfig) -> None:
        self.scratch = tempfile.mkdtemp(prefix="cir-sbx-")
        os.chmod(self.scratch, 0o711)
        self.pending: dict[int, Future] = {}
        self.alive = True
        ours, theirs = socket.socketpair()
        pkg_parent = str(Path(__file__).resolve().parents[2])
        # sys.path resolved through symlinks before anything is imported: the jail binds the real
        # paths only (sandbox_layers.interpreter_paths), so a package imported through a symlinked
        # path (.venv -> a venv elsewhere) would lose its lazily imported submodules in the jail.
        boot = ("import os, sys; sys.path[:] = list(dict.fromkeys(os.path.realpath(p) for p in sys.path)); "
                f"sys.path.insert(0, {pkg_parent!r}); "
                f"from cir_actors.sandbox.zygote import main; main({theirs.fileno()})")
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-c", boot], pass_fds=[theirs.fileno()],
                                         env=_ZYGOTE_ENV, stdin=subprocess.DEVNULL, cwd="/")
        finally:
            theirs.close()
        self.sock = ours
        zcfg = {**cfg.model_dump(), "scratch": self.scratch}
        ours.sendall(pack_frame(zcfg))
        ours.settimeout(STARTUP_TIMEOUT_S)
        reader, frames = FrameReader(), []
        try:
            while not frames:
                data = ours.recv(1 << 20)
                if not data:
                    raise SandboxUnavailable("interpreter sandbox: the zygote exited during start-up (see its stderr)")
                frames = reader.feed(data)
        except (TimeoutError, SandboxUnavailable) as e:
            self.close()
            if isinstance(e, SandboxUnavailable):
                raise
            raise SandboxUnavailable(f"interpreter sandbox: no answer from the zygote in {STARTUP_TIMEOUT_S:.0f} s") from None
        first = frames[0]
        if first.get("op") != "ready":
            self.close()
            raise SandboxUnavailable(
                f"interpreter sandbox cannot start with full isolation on this machine: {first.get('message')}. "
                "It needs root or unprivileged user namespaces, landlock and seccomp; set "
                "interpreter.allow_weaker_isolation=true to run with the missing layers off."
            )
        ours.settimeout(None)
        self.report: dict[str, Any] = first["report"]
        self.report["off"] = [name for name, on in self.report["layers"].items() if not on]
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, args=(reader,), name="interpreter-reader", daemon=True)
        self._reader.start()

    def send(self, msg: dict, call_id: int) -> Future:
        fut: Future = Future()
        with self._lock:
            if not self.alive:
                fut.set_result(_crashed(call_id))
                return fut
            self.pending[call_id] = fut
            try:
                self.sock.sendall(pack_frame({**msg, "id": call_id}))
            except OSError:
                self.pending.pop(call_id, None)
                fut.set_result(_crashed(call_id))
        return fut

    def _read(self, reader: FrameReader) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                break
            for frame in reader.feed(data):
                fut = self.pending.pop(frame.get("id"), None)
                if fut is not None:
                    fut.set_result(frame)
        with self._lock:
            self.alive = False
            lost, self.pending = self.pending, {}
        for call_id, fut in lost.items():
            fut.set_result(_crashed(call_id))

    def close(self) -> None:
        self.alive = False
        try:
            self.sock.sendall(pack_frame({"op": "shutdown"}))
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _crashed(call_id: int) -> dict:
    return {"op": "result", "id": call_id, "ok": False, "stdout": "", "error": "InterpreterCrashed"}


def _cacheable(result: ExecResult) -> bool:
    """Only a run that completed normally within its limits: never an error, timeout, truncation or kill."""
    return result.ok and result.error is None and not result.timed_out and not result.truncated \
        and result.killed_by is None


def _program_key(code: str, timeout_s: float, history: tuple[str, ...]) -> bytes:
    """sha256 of the exact program: every earlier block of the session, then the code, then the timeout
    (each length-prefixed, so no two different programs share an encoding)."""
    h = hashlib.sha256()
    for part in (*history, code, repr(float(timeout_s))):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    h.update(len(history).to_bytes(8, "little"))
    return h.digest()


class ExecCache:
    """Least-recently-used results of completed runs, bounded in entries and bytes (thread-safe).

    `get` returns the very ExecResult a fresh run returned (same stdout, same duration_s); `put`
    ignores anything `_cacheable` rejects and any single result larger than the byte bound.
    """

    def __init__(self, cfg: ExecCacheConfig) -> None:
        self.cfg = cfg
        self._entries: collections.OrderedDict[bytes, tuple[ExecResult, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.stores = self.evictions = 0

    @staticmethod
    def size(key: bytes, result: ExecResult) -> int:
        return len(key) + len(result.stdout.encode("utf-8", "surrogatepass")) + len((result.error or "").encode())

    def get(self, key: bytes) -> ExecResult | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def count(self, hit: bool) -> None:
        """One lookup that decided how a call was served (a caller that waited is counted once)."""
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def put(self, key: bytes, result: ExecResult) -> bool:
        if not _cacheable(result):
            return False
        size = self.size(key, result)
        if size > self.cfg.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (result, size)
            self.bytes += size
            self.stores += 1
            while len(self._entries) > self.cfg.max_entries or self.bytes > self.cfg.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
                self.evictions += 1
        return True

    def __len__(self) -> int:
        return len(self._entries)


class _SessionTrace:
    """What the pool knows of one session when the cache is on: the blocks it ran (the cache key's
    history), the cached blocks its child has not run yet (replayed before its next real run), and
    whether the trace can still be trusted (a timeout, kill, crash or a replay that came out
    differently makes the rest of the session uncacheable)."""

    __slots__ = ("history", "lag", "trusted")

    def __init__(self) -> None:
        self.history: list[str] = []
        self.lag: list[tuple[str, ExecResult]] = []
        self.trusted = True


@dataclass
class _Plan:
    """How one call is served when the cache is on (see InterpreterPool._cache_plan)."""

    key: bytes | None = None
    hit: ExecResult | None = None
    trace: _SessionTrace | None = None
    lag: list = field(default_factory=list)
    wait: Future | None = None
    lead: bool = False


def _wait_deadline(msg: dict) -> float:
    """How long a caller waits for the same program running for another caller before running it
    itself (the other run ends by its own deadline well before; replays may stretch it)."""
    return 4 * float(msg["timeout_s"]) + 30.0


def _session_continues(result: ExecResult) -> bool:
    """The zygote keeps a block in the session's history unless it killed the child (timeout, output
    limit) or the child vanished; anything else (including a Python error) is part of the state."""
    return not (result.timed_out or result.truncated or result.killed_by is not None
                or result.error in ("InterpreterCrashed", "OutputLimitExceeded"))


def _actor_name() -> str | None:
    """This actor's name when running as a Ray actor (the metrics' `actor` tag)."""
    try:
        import ray

        return ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside an actor there is no name
        return None


class InterpreterPool:
    """Isolated, warm Python workers. `InterpreterPool()` gives the defaults of `InterpreterConfig`;
    keyword arguments override single fields (`InterpreterPool(timeout_s=2, sessions=True)`).

    Never raises for anything the code does: every failure is a field of the returned ExecResult.
    If the zygote itself dies, calls in flight come back with error "InterpreterCrashed" and the next
    call starts a new one.
    """

    def __init__(self, cfg: InterpreterConfig | None = None, **overrides: Any) -> None:
        self.cfg = _config(cfg, overrides)
        if self.cfg.max_workers + self.cfg.max_sessions > 4000:
            raise ConfigError("InterpreterPool: interpreter.max_workers + max_sessions must be at most 4000")
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._metrics = InterpreterMetrics(_actor_name() or "interpreter")
        self.zygote_restarts = 0
        self._busy = 0  # calls in flight: each runs in its own sandboxed child (or its session's)
        self._sessions: set[str] = set()
        self._cache = ExecCache(self.cfg.cache) if self.cfg.cache.enabled else None
        self._traces: collections.OrderedDict[str, _SessionTrace] = collections.OrderedDict()
        self._inflight: dict[bytes, Future] = {}
        self.replayed_blocks = 0
        self._zygote = self._start()

    def _start(self) -> _Zygote:
        z = _Zygote(self.cfg)
        if z.report["off"]:
            log.warning("interpreter sandbox running with isolation layers OFF: %s (%s)",
                        ", ".join(z.report["off"]), z.report.get("problems"))
        return z

    def _submit(self, msg: dict) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("InterpreterPool is closed")
            if not self._zygote.alive:
                log.warning("interpreter zygote died; starting a new one")
                self.zygote_restarts += 1
                for trace in self._traces.values():  # the new zygote has none of their history
                    trace.trusted = False
                self._zygote.close()
                self._zygote = self._start()
            zygote, call_id = self._zygote, next(self._ids)
            if msg["op"] == "run":
                self._busy += 1
                if msg["session"] is not None:
                    self._sessions.add(msg["session"])
            elif msg["op"] == "close_session":
                self._sessions.discard(msg["session"])
            busy, sessions = self._busy, len(self._sessions)
        self._metrics.busy_workers(busy)
        self._metrics.sessions(sessions)
        try:
            fut = zygote.send(msg, call_id)
        except BaseException:
            if msg["op"] == "run":
                self._call_done(None)
            raise
        if msg["op"] == "run":
            fut.add_done_callback(self._call_done)
        return fut

    def _call_done(self, _fut: Future | None) -> None:
        with self._lock:
            self._busy -= 1
            busy = self._busy
        self._metrics.busy_workers(busy)

    def _run_msg(self, code: str, timeout_s: float | None, session: str | None) -> dict:
        if not isinstance(code, str):
            raise TypeError(f"InterpreterPool.run: code must be a str, got {type(code).__name__}")
        timeout = self.cfg.timeout_s if timeout_s is None else float(timeout_s)
        if not timeout > 0:
            raise ValueError(f"InterpreterPool.run: timeout_s must be > 0, got {timeout_s}")
        # Sessions are opt-in: with them off a session id is ignored and every block runs alone (CIR).
        return {"op": "run", "code": code, "timeout_s": timeout,
                "session": str(session) if session is not None and self.cfg.sessions else None}

    @staticmethod
    def _result(frame: dict) -> ExecResult:
        return ExecResult(ok=bool(frame["ok"]), stdout=frame.get("stdout", ""), error=frame.get("error"),
                          timed_out=bool(frame.get("timed_out", False)), truncated=bool(frame.get("truncated", False)),
                          killed_by=frame.get("killed_by"), duration_s=float(frame.get("duration_s", 0.0)))

    def run(self, code: str, *, timeout_s: float | None = None, session: str | None = None) -> ExecResult:
        """Run `code` and wait for its result (blocking)."""
        t0 = time.perf_counter()
        msg = self._run_msg(code, timeout_s, session)
        plan = self._cache_plan(msg, may_wait=True)
        if plan.wait is not None:  # the same program is running for another caller: take its result
            with contextlib.suppress(TimeoutError):
                plan.wait.result(timeout=_wait_deadline(msg))
            plan = self._cache_plan(msg, may_wait=False)
        if plan.hit is not None:
            self._metrics.call(time.perf_counter() - t0, True, False)
            return plan.hit
        try:
            lag_futs = [self._submit({**msg, "code": c, "timeout_s": t}) for c, t, _ in plan.lag]
            fut = self._submit(msg)
            lag_results = [self._result(f.result()) for f in lag_futs]
            result = self._result(fut.result())
            self._cache_after(msg, plan, lag_results, result)
        finally:
            self._release(plan)
        self._metrics.call(time.perf_counter() - t0, result.ok, result.timed_out)
        return result

    async def run_async(self, code: str, *, timeout_s: float | None = None, session: str | None = None) -> ExecResult:
        """Run `code` without blocking the event loop; many may be in flight at once."""
        t0 = time.perf_counter()
        msg = self._run_msg(code, timeout_s, session)
        plan = self._cache_plan(msg, may_wait=True)
        if plan.wait is not None:  # the same program is running for another caller: take its result
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(plan.wait)), _wait_deadline(msg))
            plan = self._cache_plan(msg, may_wait=False)
        if plan.hit is not None:
            self._metrics.call(time.perf_counter() - t0, True, False)
            return plan.hit
        try:
            lag_futs = [self._submit({**msg, "code": c, "timeout_s": t}) for c, t, _ in plan.lag]
            fut = self._submit(msg)
            lag_results = [self._result(await asyncio.wrap_future(f)) for f in lag_futs]
            result = self._result(await asyncio.wrap_future(fut))
            self._cache_after(msg, plan, lag_results, result)
        finally:
            self._release(plan)
        self._metrics.call(time.perf_counter() - t0, result.ok, result.timed_out)
        return result

    # -- execution cache (off unless interpreter.cache.enabled)
    def _cache_plan(self, msg: dict, may_wait: bool) -> _Plan:
        """How to serve this call: from the cache, by waiting for the same program already running for
        another caller (in-flight coalescing, `may_wait`), or by running it (after replaying the
        session's cached blocks in its child). Blocks of one session are expected in order, one at a
        time (as a trajectory issues them)."""
        if self._cache is None:
            return _Plan()
        name, trace, history, evicted = msg["session"], None, (), []
        if name is not None:
            with self._lock:
                trace = self._traces.get(name)
                if trace is None:
                    trace = self._traces[name] = _SessionTrace()
                    # Fewer traces than the zygote keeps histories (8 x max_sessions), so the zygote
                    # never forgets a session the pool still keys by its history; both forget together.
                    while len(self._traces) > 4 * self.cfg.max_sessions:
                        evicted.append(self._traces.popitem(last=False)[0])
                self._traces.move_to_end(name)
            for old in evicted:
                self._submit({"op": "close_session", "session": old})
            if not trace.trusted:
                return _Plan(trace=trace)
            history = tuple(trace.history)
        key = _program_key(msg["code"], msg["timeout_s"], history)
        hit, lead = self._cache.get(key), False
        if hit is None and may_wait:
            with self._lock:
                running = self._inflight.get(key)
                if running is None:
                    hit = self._cache.get(key)  # a leader stores before it lets go: look again
                    if hit is None:
                        self._inflight[key], lead = Future(), True
            if running is not None:
                return _Plan(key=key, trace=trace, wait=running)
        self._cache.count(hit is not None)
        self._metrics.cache_lookup(hit is not None)
        if hit is not None:
            if trace is not None:
                trace.history.append(msg["code"])
                trace.lag.append((msg["code"], msg["timeout_s"], hit))
            return _Plan(key=key, hit=hit, trace=trace)
        lag: list = []
        if trace is not None:
            lag, trace.lag = trace.lag, []
        return _Plan(key=key, trace=trace, lag=lag, lead=lead)

    def _release(self, plan: _Plan) -> None:
        """The leader of a program's run lets the callers waiting for it go (they look it up again)."""
        if plan.lead:
            with self._lock:
                fut = self._inflight.pop(plan.key, None)
            if fut is not None:
                fut.set_result(None)

    def _cache_after(self, msg: dict, plan: _Plan, lag_results: list[ExecResult], result: ExecResult) -> None:
        if self._cache is None:
            return
        key, trace, lag = plan.key, plan.trace, plan.lag
        if trace is not None:
            self.replayed_blocks += len(lag)
            self._metrics.cache_replays(len(lag))
            for (_, _, cached), got in zip(lag, lag_results, strict=True):
                if got.stdout != cached.stdout or not _cacheable(got):
                    trace.trusted = False  # the child's state is not what the key says: stop here
            if not _session_continues(result):
                trace.trusted = False
            elif trace.trusted:
                trace.history.append(msg["code"])
            if not trace.trusted:
                return
        if key is not None:
            self._cache.put(key, result)
            self._metrics.cache_size(len(self._cache), self._cache.bytes)

    def cache_stats(self) -> dict[str, Any]:
        """The execution cache's counters (all zero with the cache off). `calls_saved` is hits minus
        the cached session blocks that later had to be replayed in their session's child."""
        c = self._cache
        if c is None:
            return {"enabled": False, "lookups": 0, "hits": 0, "misses": 0, "hit_rate": 0.0, "calls_saved": 0,
                    "replayed": 0, "stores": 0, "evictions": 0, "entries": 0, "bytes": 0}
        lookups = c.hits + c.misses
        return {"enabled": True, "lookups": lookups, "hits": c.hits, "misses": c.misses,
                "hit_rate": c.hits / lookups if lookups else 0.0, "calls_saved": c.hits - self.replayed_blocks,
                "replayed": self.replayed_blocks, "stores": c.stores, "evictions": c.evictions,
                "entries": len(c), "bytes": c.bytes}

    def close_session(self, session: str) -> None:
        """Kill a session's child and forget its history (no-op for unknown sessions or sessions off)."""
        if self.cfg.sessions:
            with self._lock:
                self._traces.pop(str(session), None)
            self._submit({"op": "close_session", "session": str(session)}).result()

    async def close_session_async(self, session: str) -> None:
        if self.cfg.sessions:
            with self._lock:
                self._traces.pop(str(session), None)
            await asyncio.wrap_future(self._submit({"op": "close_session", "session": str(session)}))

    def health(self) -> dict[str, int]:
        """The process serving this pool (a new pid after Ray restarted it), its zygote restarts, the
        calls in flight and how many of them the zygote has not answered (an unanswered call's
        warning quotes these: whether the pool still holds it, and where)."""
        with self._lock:
            zygote, busy = self._zygote, self._busy
        return {"pid": os.getpid(), "zygote_restarts": self.zygote_restarts, "calls_in_flight": busy,
                "zygote_unanswered": len(zygote.pending), "zygote_alive": int(zygote.alive)}

    def isolation_report(self) -> dict[str, Any]:
        """Which layers are active ({"layers": {name: bool}, "off": [...]}) and how the host looked."""
        return dict(self._zygote.report)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._zygote.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # best effort at interpreter shutdown
            if not self._closed:
                self.close()


PROBE_CODE, PROBE_EXPECTED = "print(1+1)", "2"


def probe_interpreters(handles: list[Any], timeout_s: float = STARTUP_TIMEOUT_S + 60) -> None:
    """One real call on every InterpreterPool actor (`print(1+1)` must print 2), all at once, at a
    run's set-up: a broken sandbox is found here, in one sentence naming the pool (ProbeFailed),
    not later as rollouts whose every tool call failed."""
    import ray

    refs = [h.run_async.remote(PROBE_CODE) for h in handles]
    for i, ref in enumerate(refs):
        name = f"interpreter pool {i} (actor interpreter-{i})"
        try:
            result = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ProbeFailed(f"set-up probe: {name} did not run {PROBE_CODE} within {timeout_s:.0f} s") from None
        except Exception as e:  # noqa: BLE001 -- an actor that cannot start or call: one sentence
            raise ProbeFailed(f"set-up probe: {name} cannot run code: {last_error_line(e)}") from None
        if not result.ok or result.stdout.strip() != PROBE_EXPECTED:
            got = result.error or ("Timeout" if result.timed_out else f"output {result.stdout.strip()!r}")
            raise ProbeFailed(f"set-up probe: {name} ran {PROBE_CODE} and got {got}, not {PROBE_EXPECTED!r}")


class RayInterpreter:
    """The Interpreter protocol over a Ray actor handle of InterpreterPool, so a generator can be
    handed a local pool or a remote one alike."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def run_async(self, code: str, *, timeout_s: float | None = None, session: str | None = None) -> ExecResult:
        return await self._handle.run_async.remote(code, timeout_s=timeout_s, session=session)

    async def close_session_async(self, session: str) -> None:
        await self._handle.close_session_async.remote(session)
