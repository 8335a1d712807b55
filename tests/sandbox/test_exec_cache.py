"""The interpreter pool's execution cache: hits are exactly a fresh run's result, any program
difference misses, only normal completions are stored, the bounds hold, sessions key by history.

Real sandbox (as tests/sandbox/test_interpreter.py); the cache is observed through `cache_stats()` and
through side effects a cached call cannot have (a file written in the session's working dir).
"""

from __future__ import annotations

import asyncio

import pytest

from cir_actors.config import ExecCacheConfig, InterpreterConfig
from cir_actors.sandbox.pool import ExecCache, InterpreterPool, _program_key
from cir_actors.types import ExecResult


@pytest.fixture(scope="module")
def cpool():
    with InterpreterPool(timeout_s=2.0, max_workers=2, max_output_bytes=1024,
                         cache={"enabled": True, "max_entries": 64, "max_bytes": 1 << 20}) as p:
        yield p


def test_off_by_default():
    assert InterpreterConfig().cache.enabled is False
    with InterpreterPool(max_workers=1) as p:
        code = "import random; print(random.random())"
        assert p.run(code).stdout != p.run(code).stdout  # every call really runs
        assert p.cache_stats() == {**p.cache_stats(), "enabled": False, "hits": 0, "lookups": 0}


def test_hit_is_exactly_the_fresh_result(cpool):
    code = "import random; print(random.random(), sum(range(10)))"
    before = cpool.cache_stats()
    fresh = cpool.run(code)
    assert fresh.ok and fresh.stdout.strip().endswith("45")
    again = cpool.run(code)
    assert again == fresh  # same stdout (the random draw included), same duration: no new run
    assert asyncio.run(cpool.run_async(code)) == fresh
    after = cpool.cache_stats()
    assert after["hits"] - before["hits"] == 2 and after["misses"] - before["misses"] == 1
    assert after["calls_saved"] - before["calls_saved"] == 2


@pytest.mark.parametrize("variant", ["import random; print(random.random(), sum(range(10))) ",
                                     "import random; print(random.random(), sum(range(10)))\n",
                                     "import random; print(random.random(), sum(range(11)))"])
def test_any_program_difference_misses(cpool, variant):
    code = "import random; print(random.random(), sum(range(10)))"
    base = cpool.run(code)
    other = cpool.run(variant)
    assert other.stdout != base.stdout  # a fresh draw: it ran
    # the same code under another timeout is another program (it might not finish within the shorter one)
    assert cpool.run(code, timeout_s=1.5).stdout != base.stdout


@pytest.mark.parametrize("code,field", [
    ("import random; print(random.random()); 1/0", "error"),
    ("import random, time; print(random.random(), flush=True); time.sleep(10)", "timed_out"),
    ("import random; print(random.random()); print('x' * 5000)", "truncated"),
    ("import os, random; print(random.random(), flush=True); os._exit(3)", "exit status"),
    ("import random; print(random.random(), flush=True); x = bytearray(4 << 30)", "memory"),
])
def test_never_caches_abnormal_endings(cpool, code, field):
    first = cpool.run(code)
    assert not first.ok
    if field == "timed_out":
        assert first.timed_out
    elif field == "truncated":
        assert first.truncated or first.error == "OutputLimitExceeded"
    stores = cpool.cache_stats()["stores"]
    second = cpool.run(code)
    assert not second.ok and second.stdout != first.stdout  # ran again: a new random draw
    assert cpool.cache_stats()["stores"] == stores


def test_bounds_hold():
    key = _program_key("print(1)", 5.0, ())
    size = ExecCache.size(key, ExecResult(ok=True, stdout="x" * 400))
    cache = ExecCache(ExecCacheConfig(enabled=True, max_entries=5, max_bytes=size * 3 + 10))
    for i in range(20):
        assert cache.put(_program_key(f"print({i})", 5.0, ()), ExecResult(ok=True, stdout=str(i).rjust(400)))
        assert len(cache) <= 3 and cache.bytes <= cache.cfg.max_bytes
    assert cache.evictions == 17
    assert cache.get(_program_key("print(19)", 5.0, ())).stdout.strip() == "19"  # newest kept
    assert cache.get(_program_key("print(0)", 5.0, ())) is None  # oldest gone
    assert not cache.put(key, ExecResult(ok=True, stdout="y" * 10_000))  # larger than the whole bound
    by_entries = ExecCache(ExecCacheConfig(enabled=True, max_entries=2, max_bytes=1 << 20))
    for i in range(5):
        by_entries.put(_program_key(str(i), 1.0, ()), ExecResult(ok=True, stdout=""))
    assert len(by_entries) == 2


def test_pool_stays_within_the_bound():
    with InterpreterPool(max_workers=2, cache={"enabled": True, "max_entries": 4, "max_bytes": 4096}) as p:
        for i in range(12):
            assert p.run(f"print('{i}' * 200)").ok
            st = p.cache_stats()
            assert st["entries"] <= 4 and st["bytes"] <= 4096
        assert p.cache_stats()["evictions"] > 0


def test_key_separates_history_and_code():
    assert _program_key("b", 5.0, ("a",)) != _program_key("a\nb", 5.0, ())
    assert _program_key("b", 5.0, ("a",)) != _program_key("b", 5.0, ())
    assert _program_key("x", 5.0, ("a", "b")) != _program_key("x", 5.0, ("ab",))


def test_sessions_key_by_history_and_replay_skipped_blocks():
    cfg = InterpreterConfig(sessions=True, timeout_s=3.0, max_workers=2, cache=ExecCacheConfig(enabled=True))
    with InterpreterPool(cfg) as p:
        # Session A runs two blocks for real; session B runs the same blocks and gets both from the cache.
        a1, a2 = p.run("x = 20", session="A"), p.run("x += 1; print(x)", session="A")
        b1, b2 = p.run("x = 20", session="B"), p.run("x += 1; print(x)", session="B")
        assert (b1, b2) == (a1, a2) and a2.stdout.strip() == "21"
        assert p.cache_stats()["hits"] == 2
        # The same second block after another first block is another program: a miss, run for real.
        c1, c2 = p.run("x = 5", session="C"), p.run("x += 1; print(x)", session="C")
        assert c1.ok and c2.stdout.strip() == "6"
        # B's next block is new: its child first replays the two cached blocks, so x is 21 there.
        b3 = p.run("x += 1; print(x)", session="B")
        assert b3.ok and b3.stdout.strip() == "22", b3
        st = p.cache_stats()
        assert st["replayed"] == 2 and st["calls_saved"] == st["hits"] - 2
        # Closing a session forgets its history: a block after that is keyed afresh.
        p.close_session("A")
        assert p.run("print(x)", session="A").error.startswith("NameError")


def test_session_after_a_timeout_is_not_cached():
    cfg = InterpreterConfig(sessions=True, timeout_s=1.0, max_workers=2, cache=ExecCacheConfig(enabled=True))
    with InterpreterPool(cfg) as p:
        assert p.run("import time; time.sleep(5)", session="S").timed_out
        stores = p.cache_stats()["stores"]
        assert p.run("print(1)", session="S").ok
        assert p.cache_stats()["stores"] == stores  # the session's trace is no longer trusted


def test_concurrent_samples_share_one_run(cpool):
    """The samples of a group reach the same program together: one runs it, the others wait for it."""
    code = "import random, time; time.sleep(0.3); print(random.random())"
    before = cpool.cache_stats()

    async def group(c: str) -> list:
        return await asyncio.gather(*[cpool.run_async(c) for _ in range(8)])

    results = asyncio.run(group(code))
    assert all(r.ok for r in results) and len({r.stdout for r in results}) == 1
    after = cpool.cache_stats()
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 7
    # A program that fails is not shared: every waiter runs it itself (eight different draws).
    failing = asyncio.run(group("import random, time; time.sleep(0.1); print(random.random()); 1/0"))
    assert all(not r.ok for r in failing) and len({r.stdout for r in failing}) == 8
