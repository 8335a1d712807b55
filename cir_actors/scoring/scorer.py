"""The scorer: extract a response's final answer and check it against the gold answer.

The answer is the content of the last complete `\\boxed{...}` (or `\\boxed 5`, `\\fbox{...}`) outside
the interpreter's ```` ```output ```` blocks: what the interpreter printed is not the model's answer.
Rollouts pass `Trajectory.sampled_text`, the model's sampled tokens only (by the loss mask's
provenance), so a program that prints a closing fence and a \\boxed{} cannot answer for the model;
stripping output blocks is the guard for a text given whole.
Equivalence is math-verify's (`parse` then `verify`, gold first: it is asymmetric).

math-verify's own timeout is `signal.alarm`, which raises off the main thread (every Ray actor
method runs off it), so it is disabled here. Instead every check runs in one of a few warm, long-
lived worker processes (`python -c ...`, JSON lines over pipes) and the caller waits on the pipe
with a deadline: a worker that misses it is killed (a thread could not be) and replaced by a fresh
one that warms up in the background, and the verdict is `timeout`. This works from any thread,
actor or event loop. The deadline covers the check itself, not the wait for a free worker nor a
replacement worker's start-up.

Rewards: correct / wrong from the config, and optionally a fixed reward for a response the length
limit cut (`training_reward`); no other shaping. Not covered here: extraction of unboxed answers
("the answer is 5"): CIR's prompt asks for `\\boxed{}` and scores nothing else.

`Scorer` is plain Python; the system runs several as Ray actors:
`ray.remote(Scorer).options(num_cpus=cfg.num_cpus, max_concurrency=...).remote(cfg)` and calls
`score_async` or `score_many` (an actor with an async method is an async actor: its plain `score`
would block the actor's event loop while it runs).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cir_actors.types import InfraFault, ProbeFailed, Verdict, VerdictReason, last_error_line

if TYPE_CHECKING:
    from cir_actors.config import ScorerConfig

_OUTPUT_BLOCK = re.compile(r"```output\b.*?(?:```|\Z)", re.DOTALL)
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_TOKEN = re.compile(r"[^\s$]+")

_WARMUP = [
    ("\\frac{1}{2}", "0.5"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("\\left[ -\\frac{1}{8}, \\frac{1}{8} \\right]", "[-1/8, 1/8)"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("x^2 + 2\\sqrt{3}", "2\\sqrt3 + x^2"),
    ("y = 2x + 1", "2x + 1"),
    ("30^\\circ", "\\frac{\\pi}{6}"),
    ("\\text{(C)}", "C"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
]
WORKER_STARTUP_S = 120.0  # generous: two shared cores may be busy with vLLM and DeepSpeed
CHECKER_RETRIES = 2  # re-checks of an answer whose math-verify worker crashed (not a deadline)
WORKER_MEMORY_MB = 4096  # address-space cap of a worker: a runaway sympy expansion dies, the host lives


# ---------------------------------------------------------------------------------------- extraction


def strip_output_blocks(text: str) -> str:
    """`text` without its interpreter output blocks (an unterminated one runs to the end)."""
    return _OUTPUT_BLOCK.sub(" ", text)


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] ('{'), or None if it never closes.
    Escaped characters (`\\{`, `\\}`, `\\\\`) do not count toward the balance."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def _box_content(text: str, pos: int) -> str | None:
    """The argument of a `\\boxed` whose name ends at `pos`: `{...}` or a bare token (`\\boxed 5`)."""
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] == "{":
        content = _braced(text, pos)
    else:
        m = _TOKEN.match(text, pos)
        content = m.group(0).rstrip(".,;:") if m else None
    if content is None or not content.strip():
        return None
    return content.strip()


def extract_answer(response: str) -> str | None:
    """The last complete, non-empty `\\boxed{}` / `\\boxed x` / `\\fbox{}` outside output blocks."""
    text = strip_output_blocks(response)
    for m in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, m.end())
        if content is not None:
            return content
    return None


def gold_answer(gold: str) -> str:
    """A gold answer as LaTeX: the last box's content when it has one, without enclosing `$`."""
    text = gold.strip()
    if _BOX.search(text):
        boxed = extract_answer(text)
        if boxed is not None:
            text = boxed
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


# ------------------------------------------------------------------------------------ gold answers


def math_verify_extraction() -> list[Any]:
    """How math-verify reads an answer here: LaTeX (a \\boxed{} first), then a plain expression."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def unparsable_golds(
    golds: Iterable[tuple[str, str]], *, per_gold_s: float = 2.0, total_s: float = 120.0
) -> tuple[list[tuple[str, str]], int]:
    """The (where, gold) pairs math-verify cannot parse, and how many were checked.

    In-process, for a run's set-up: a gold that does not parse makes every verdict on its task a
    parse failure (reward wrong, nothing learned), so it is bad input. Each parse has math-verify's
    own `per_gold_s` timeout (signal.alarm: main thread only; off it, none); checking stops after
    `total_s` (the rest are then unchecked, and the count says so).
    """
    import logging
    import threading

    from math_verify import parse

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    extraction = math_verify_extraction()
    timeout = max(1, round(per_gold_s)) if threading.current_thread() is threading.main_thread() else None
    bad: list[tuple[str, str]] = []
    checked = 0
    deadline = time.monotonic() + total_s
    for where, gold in golds:
        if time.monotonic() > deadline:
            break
        checked += 1
        try:
            ok = bool(parse("\\boxed{" + gold_answer(gold) + "}", extraction_config=extraction,
                            parsing_timeout=timeout))
        except Exception:  # noqa: BLE001 -- math-verify's timeout or a parser bug: unparsable either way
            ok = False
        if not ok:
            bad.append((where, gold))
    return bad, checked


# ------------------------------------------------------------------------------- worker process side


def _worker_main() -> None:
    """Loop of one worker process: read {"gold", "pred"} lines, answer {"parsed", "correct"} lines."""
    import ctypes
    import logging
    import resource
    import signal

    # Die with the parent even when busy in a pathological check (Linux). The signal follows the
    # parent *thread* that started us: workers are started by one long-lived thread (`_spawn`).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != int(os.environ.get("CIR_SCORER_PARENT", os.getppid())):
        return
    limit = int(os.environ.get("CIR_SCORER_MEMORY_MB", WORKER_MEMORY_MB)) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The protocol owns the original stdout; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: by design

    from math_verify import parse, verify

    extraction = math_verify_extraction()

    def check(gold: str, pred: str) -> dict[str, Any]:
        g = parse("\\boxed{" + gold + "}", extraction_config=extraction, parsing_timeout=None)
        p = parse("\\boxed{" + pred + "}", extraction_config=extraction, parsing_timeout=None)
        if not g or not p:
            return {"parsed": False, "correct": False}
        return {"parsed": True, "correct": bool(verify(g, p, timeout_seconds=None))}

    # Warm before saying ready: the first check of each kind of object pays sympy's lazy imports
    # and caches (up to ~1 s for a tuple or an interval), which would eat into a real deadline.
    for gold, pred in _WARMUP:
        check(gold, pred)
    proto.write('{"ready": true}\n')
    for line in sys.stdin:
        try:
            req = json.loads(line)
            resp = check(req["gold"], req["pred"])
        except Exception as e:  # noqa: BLE001 -- any failure is a verdict; str(e) may hang, so the type only
            resp = {"error": type(e).__name__}
        proto.write(json.dumps(resp) + "\n")


_WORKER_CMD = "from cir_actors.scoring.scorer import _worker_main; _worker_main()"


class _WorkerDied(Exception):
    pass


class _Worker:
    """Parent-side handle of one worker process. Not thread-safe: the pool lends it to one thread."""

    def __init__(self, memory_mb: int) -> None:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["CIR_SCORER_PARENT"] = str(os.getpid())
        env["CIR_SCORER_MEMORY_MB"] = str(memory_mb)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CMD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self._buf = b""
        self._ready = False

    def wait_ready(self) -> None:
        """Wait for the worker's ready line. A worker that cannot start is a broken installation, not a
        verdict: that raises rather than scoring everything as a parse failure."""
        if self._ready:
            return
        try:
            line = self._read_line(time.monotonic() + WORKER_STARTUP_S)
        except _WorkerDied as e:
            raise RuntimeError(f"a scorer worker exited while starting ({e}); its stderr says why") from None
        if line is None:
            raise RuntimeError(f"a scorer worker did not start within {WORKER_STARTUP_S:.0f} s")
        self._ready = True

    def check(self, gold: str, pred: str, timeout_s: float) -> dict[str, Any] | None:
        """The worker's answer, or None when it missed the deadline (then the caller kills it)."""
        self.wait_ready()
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _WorkerDied from e
        line = self._read_line(time.monotonic() + timeout_s)
        return None if line is None else json.loads(line)

    def _read_line(self, deadline: float) -> bytes | None:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _WorkerDied(f"scorer worker exited with code {self._proc.wait()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    @property
    def pid(self) -> int:
        return self._proc.pid

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # unflushed bytes to a dead worker
                    pass


_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer-spawn")


def _spawn(memory_mb: int) -> _Worker:
    """A new worker, started from the one spawner thread, which lives as long as the process: a
    worker started by a short-lived thread would get its parent-death signal when that thread ends."""
    return _spawner.submit(_Worker, memory_mb).result()


class _WorkerPool:
    """A few warm workers lent to one check at a time; a worker that misses a deadline is replaced."""

    def __init__(self, num_workers: int, memory_mb: int = WORKER_MEMORY_MB) -> None:
        self._memory_mb = memory_mb
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._closed = False
        for _ in range(num_workers):
            self._idle.put(_spawn(memory_mb))
        self.num_workers = num_workers
        self.replaced = 0  # workers killed for a deadline or a crash

    def check(self, gold: str, pred: str, timeout_s: float) -> dict[str, Any] | None:
        if self._closed:
            raise RuntimeError("scorer is closed")
        worker = self._idle.get()
        try:
            result = worker.check(gold, pred, timeout_s)
            if result is None:
                worker = self._replace(worker)
            return result
        except _WorkerDied:
            worker = self._replace(worker)
            return {"error": "WorkerDied"}
        finally:
            if self._closed:
                worker.kill()
            else:
                self._idle.put(worker)

    def wait_ready(self) -> None:
        """Block until every worker has started (all are borrowed at once, so each is seen)."""
        workers = [self._idle.get() for _ in range(self.num_workers)]
        try:
            for worker in workers:
                worker.wait_ready()
        finally:
            for worker in workers:
                self._idle.put(worker)

    def pids(self) -> list[int]:
        """Process ids of the idle workers (all of them when nothing is being checked)."""
        return [w.pid for w in list(self._idle.queue)]

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        self.replaced += 1
        return _spawn(self._memory_mb)  # starts now, warms while nobody waits on it

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


# ------------------------------------------------------------------------------------------- scoring


def _verdict(response: str, gold: str, pool: _WorkerPool, timeout_s: float) -> Verdict:
    t0 = time.monotonic()
    predicted = extract_answer(response)
    if predicted is None:
        return Verdict(False, None, VerdictReason.NO_BOX, time.monotonic() - t0)
    result = pool.check(gold_answer(gold), predicted, timeout_s)
    for _ in range(CHECKER_RETRIES):  # a crashed checker is the infrastructure's fault, not the model's
        if result is None or result.get("error") != "WorkerDied":
            break
        result = pool.check(gold_answer(gold), predicted, timeout_s)
    if result is not None and result.get("error") == "WorkerDied":
        raise InfraFault(f"math-verify worker died {CHECKER_RETRIES + 1} times checking one answer")
    if result is None:
        reason = VerdictReason.TIMEOUT
    elif "error" in result or not result["parsed"]:
        reason = VerdictReason.PARSE_FAILURE
    else:
        reason = VerdictReason.CORRECT if result["correct"] else VerdictReason.WRONG
    return Verdict(reason is VerdictReason.CORRECT, predicted, reason, time.monotonic() - t0)


_default_pool: _WorkerPool | None = None
_default_lock = threading.Lock()


def score(response: str, gold: str, *, timeout_s: float = 5.0) -> Verdict:
    """Score one response with this process's shared one-worker pool (started on first use); for
    throughput, build a `Scorer` with more workers."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = _WorkerPool(1)
            atexit.register(_default_pool.close)
    return _verdict(response, gold, _default_pool, timeout_s)


def training_reward(cfg: ScorerConfig, verdict: Verdict, *, truncated: bool = False) -> float:
    """The reward a trajectory trains with: `cfg.reward_truncated` when the response limit cut it (and
    that is set), else `reward_correct` or `reward_wrong` by the verdict."""
    if truncated and cfg.reward_truncated is not None:
        return cfg.reward_truncated
    return cfg.reward_correct if verdict.correct else cfg.reward_wrong


def _actor_name() -> str | None:
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_actor_name() or None
    except Exception:  # noqa: BLE001 -- a driver, or an older Ray: no actor name, not an error
        return None


class Scorer:
    """A pool of warm math-verify workers behind the scoring calls other roles make."""

    def __init__(self, cfg: ScorerConfig, *, name: str | None = None) -> None:
        """`name` tags this scorer's Prometheus series (default: the Ray actor's name, or "scorer")."""
        from cir_actors.ops.metrics import ScorerMetrics  # imports ray: kept out of the worker processes

        self.cfg = cfg
        self.name = name or _actor_name() or "scorer"
        self._metrics = ScorerMetrics(self.name)
        self._pool = _WorkerPool(cfg.num_workers)
        self._executor = ThreadPoolExecutor(max_workers=cfg.num_workers, thread_name_prefix="scorer")

    def score(self, response: str, gold: str) -> Verdict:
        verdict = _verdict(response, gold, self._pool, self.cfg.timeout_s)
        self._metrics.verdict(verdict.duration_s, verdict.reason)
        return verdict

    async def score_async(self, response: str, gold: str) -> Verdict:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.score, response, gold)

    def score_many(self, pairs: Iterable[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for (response, gold) pairs, in order, checked on all workers at once."""
        return list(self._executor.map(lambda pair: self.score(*pair), pairs))

    def warmup(self) -> None:
        """Wait until every worker is warm (otherwise the first checks include their start-up)."""
        self._pool.wait_ready()

    def reward(self, verdict: Verdict, mode: Literal["train", "eval"] = "train", *, truncated: bool = False) -> float:
        """Training reward from the config (`training_reward`) or evaluation accuracy (1 / 0)."""
        if mode == "train":
            return training_reward(self.cfg, verdict, truncated=truncated)
        if mode == "eval":
            return 1.0 if verdict.correct else 0.0
        raise ValueError(f"reward mode must be 'train' or 'eval', got {mode!r}")

    def stats(self) -> dict[str, int]:
        return {"workers": self._pool.num_workers, "workers_replaced": self._pool.replaced}

    def health(self) -> dict[str, int]:
        """The process serving this actor (a new pid after Ray restarted it) and its workers' replacements."""
        return {"pid": os.getpid(), "workers_replaced": self._pool.replaced}

    def worker_pids(self) -> list[int]:
        """The worker processes' ids (for CPU accounting in the bench; complete when idle)."""
        return self._pool.pids()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.close()

    def __del__(self) -> None:
        # Workers also die with the process (parent-death signal); this frees them sooner.
        with contextlib.suppress(Exception):
            self.close()


PROBE_RESPONSE, PROBE_GOLD = "so the answer is \\boxed{\\frac{1}{2}}", "0.5"


def probe_scorers(handles: list[Any], timeout_s: float = WORKER_STARTUP_S + 60) -> None:
    """One real score of a known-correct answer on every Scorer actor, all at once, at a run's set-up:
    a broken scorer is found here, in one sentence naming it (ProbeFailed), not later as a run
    whose every reward is wrong."""
    import ray

    refs = [h.score_async.remote(PROBE_RESPONSE, PROBE_GOLD) for h in handles]
    for i, ref in enumerate(refs):
        name = f"scorer {i} (actor scorer-{i})"
        try:
            verdict = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ProbeFailed(f"set-up probe: {name} did not score within {timeout_s:.0f} s") from None
        except Exception as e:  # noqa: BLE001 -- an actor that cannot start or score: one sentence
            raise ProbeFailed(f"set-up probe: {name} cannot score: {last_error_line(e)}") from None
        if not verdict.correct:
            raise ProbeFailed(
                f"set-up probe: {name} scored the known-correct {PROBE_RESPONSE!r} against gold {PROBE_GOLD!r} "
                f"as {verdict.reason.value}, not correct"
            )
