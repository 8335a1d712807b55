"""A step's row counts an interpreter pool or scorer that Ray restarted since the last row, even when
its last health answer came just before it was killed (an answer read late must not hide the kill).
Real Ray actors stand in for the scorers: the watch talks to nothing else."""

from __future__ import annotations

import os

from cir_actors.config import load_config
from cir_actors.ops.processes import wait_gone


def test_a_kill_right_after_a_health_answer_is_counted_in_the_next_row(ray_session, tmp_path):
    import ray

    from cir_actors.control.trainer import Trainer

    @ray.remote(num_cpus=0, max_restarts=-1)
    class Scorer:
        def health(self) -> dict:
            return {"pid": os.getpid()}

    t = Trainer.__new__(Trainer)
    t.cfg = load_config(None, [])
    t.interpreters, t.scorers = [], [Scorer.remote(), Scorer.remote()]
    t._stateless_probes, t._stateless_pids, t.recoveries, t.run_dir = {}, {}, [], tmp_path
    try:
        t._watch_stateless()  # checks sent between steps, answered, read at the next call
        ray.get([p[0] for p in t._stateless_probes.values()], timeout=60)
        t._watch_stateless()
        assert set(t._stateless_pids) == {"scorer-0", "scorer-1"}, t._stateless_pids
        before = t._stateless_pids["scorer-1"]
        ray.get(t._stateless_probes["scorer-1"][0], timeout=60)  # answered by the pid about to die
        ray.kill(t.scorers[1], no_restart=False)
        assert wait_gone(before, 30.0), "the killed scorer's process outlived its kill"
        t._watch_stateless(wait_s=30.0)  # the next row
        assert [(r["name"], r["healed_by"]) for r in t.recoveries] == [("scorer-1", "ray")], t.recoveries
        t._watch_stateless(wait_s=30.0)  # counted once, and the restarted actor answers again
        assert len(t.recoveries) == 1, t.recoveries
        assert t._stateless_pids["scorer-1"] != before, t._stateless_pids
        assert (tmp_path / "recoveries.jsonl").read_text().count("scorer-1") == 1
    finally:
        for s in t.scorers:
            ray.kill(s, no_restart=True)
