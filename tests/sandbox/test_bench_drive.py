"""The interpreter benchmark's open-loop driver counts a call's wait for a busy client (a queue it
must not hide) and issues every call."""

from __future__ import annotations

import time

from cir_actors.bench.interpreter import _drive_paced


def test_open_loop_latency_counts_the_wait_for_a_busy_client():
    calls = []

    def call() -> None:
        calls.append(1)
        time.sleep(0.02)

    # 20 calls offered at 200/s to one client that needs 20 ms each: the queue grows by ~15 ms a call
    lat, _ = _drive_paced(call, 20, 1, 200.0)
    assert len(lat) == len(calls) == 20
    assert lat[-1] > 150, lat  # the last one waited behind the others (~300 ms)
    # the same calls spread over 20 clients: nobody waits for anybody
    lat, _ = _drive_paced(call, 20, 20, 200.0)
    assert len(lat) == 20 and lat[len(lat) // 2] < 150, lat
