"""The driver's checkpoint takes the buffer's cut under `recovery.call_timeout_s`: the buffer answers
with references and the driver fetches their data itself. A buffer stopped when a checkpoint begins
is found within that deadline (it was 600 s: a CI run waited 7 min for Ray to drop the connection),
and the previous checkpoint stays the latest. A real ReplayBuffer actor holds real object refs."""

from __future__ import annotations

import os
import signal
import threading
import time

from cir_actors.config import load_config
from cir_actors.serialization import decode_scored, read_frames
from tests.test_serialization import _scored


class _Learner:
    """Stands in for the learner ranks: the checkpoint only asks them to save."""

    def save_checkpoint(self, path) -> None:
        path.mkdir(parents=True)
        (path / "weights").write_text("w")


def test_a_buffer_stopped_at_a_checkpoint_is_found_within_the_call_deadline(ray_session, tmp_path):
    import ray

    from cir_actors.control.replay_buffer import ReplayBuffer
    from cir_actors.control.trainer import StatefulRoleDied, Trainer

    buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote(2)
    samples = [_scored(s) for s in range(2)]
    for i, s in enumerate(samples):  # one ready group of two samples, held as object refs
        ray.get(buffer.add.remote(7, 2, 0, i, [ray.put(s)], s.reward, 0), timeout=60)
    t = Trainer.__new__(Trainer)
    t.cfg = load_config(None, ["recovery.call_timeout_s=5"])
    t.ckpt_dir, t.learner, t.buffer = tmp_path / "checkpoints", _Learner(), buffer
    pid = ray.get(buffer.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    try:
        step = t.save_checkpoint(1)
        with open(step / "buffer.msgpack", "rb") as f:
            groups = list(read_frames(f))
        assert [g["group_id"] for g in groups] == [7]
        got = [decode_scored(x) for x in groups[0]["samples"]]
        assert [g.trajectory.token_ids_T.tolist() for g in got] == [s.trajectory.token_ids_T.tolist() for s in samples]

        os.kill(pid, signal.SIGSTOP)
        out: dict = {}

        def save() -> None:
            try:
                t.save_checkpoint(2)
            except BaseException as e:  # noqa: BLE001 - handed to the test's thread
                out["error"] = e

        start = time.monotonic()
        th = threading.Thread(target=save, daemon=True)
        th.start()
        th.join(60)
        assert not th.is_alive(), "the checkpoint still waits on a stopped buffer after 60 s"
        assert isinstance(out.get("error"), StatefulRoleDied), out
        assert "the buffer answered nothing for 5 s (recovery.call_timeout_s)" in str(out["error"]), out
        assert time.monotonic() - start < 30
        assert (t.ckpt_dir / "latest").read_text() == "step-000001"
    finally:
        os.kill(pid, signal.SIGCONT)
        ray.kill(buffer, no_restart=True)
