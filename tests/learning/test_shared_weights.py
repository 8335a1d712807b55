"""The shared-memory weight region: exact round trip, two slots, the lock protocol, torn and late
reads refused, memory freed, and the cross-node fallback rule (plain CPU, no actors, no timing)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cir_actors.learning.shared_weights import (
    PREFIX,
    SHM_DIR,
    SharedWeightsWriter,
    SlotBusy,
    SlotRefused,
    TornRead,
    plan_shared_publication,
    read_slot,
    region_prefix,
    sweep_orphans,
)
from cir_actors.learning.weight_sync import TensorSpec, fingerprint


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(300, 257, generator=g),
        "norm.weight": torch.randn(257, generator=g).bfloat16(),  # odd byte counts: offsets stay aligned
        "pos.ids": torch.randint(0, 1 << 40, (3, 5), generator=g),
        "empty": torch.empty(0, 4),
        "head.weight": torch.randn(129, 300, generator=g),
    }


def _specs(sd):
    return [TensorSpec(k, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in sd.items()]


@pytest.fixture
def writer():
    w = SharedWeightsWriter(_specs(_state(0)), lock_timeout_s=0.3)
    yield w
    w.close()


def _read(where) -> dict[str, torch.Tensor]:
    with read_slot(where, timeout_s=0.3) as views:
        return {name: t.clone() for name, t in views}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_versions_alternate_slots_and_arrive_bit_identical(writer):
    v1, v2 = _state(1), _state(2)
    where1, fp1 = writer.write(1, v1.values(), checksum=True)
    where2, fp2 = writer.write(2, v2.values(), checksum=True)
    assert (where1.slot, where2.slot) == (0, 1) and where1.path == where2.path
    assert fp1 == fingerprint(v1.items()) and fp2 == fingerprint(v2.items()) and fp1 != fp2
    assert all(off % 64 == 0 for *_, off in where1.layout)
    assert _same(_read(where1), v1) and _same(_read(where2), v2)  # both slots hold their version
    with pytest.raises(ValueError, match="spec"):
        writer.write(3, [t.double() for t in v1.values()])


def test_a_read_during_the_next_write_gets_the_old_version_whole(writer):
    """A reader loads v1 while v2 is being written into the other slot (the writer paused half way):
    v1 arrives intact; v3, which belongs in v1's slot, waits for the reader and times out."""
    v1, v2, v3 = _state(1), _state(2), _state(3)
    where1, _ = writer.write(1, v1.values())
    half_way, resume = threading.Event(), threading.Event()

    def paused(sd):
        for i, t in enumerate(sd.values()):
            if i == 2:
                half_way.set()
                assert resume.wait(30)
            yield t

    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("where", writer.write(2, paused(v2))[0]))
    thread.start()
    assert half_way.wait(30)
    with read_slot(where1, timeout_s=0.3) as views:
        got = {name: t.clone() for name, t in views}
        resume.set()
        thread.join(30)
        with pytest.raises(SlotBusy, match="still loads"):  # slot 0 is held: not overwritten
            writer.write(3, v3.values())
        with pytest.raises(SlotBusy, match="stayed locked for 0 s"):  # a shorter wait than the writer's
            writer.write(3, v3.values(), lock_timeout_s=0.05)
        assert _same({name: t.clone() for name, t in views}, v1)
    assert _same(got, v1) and _same(_read(out["where"]), v2)
    where3, _ = writer.write(3, v3.values())  # released: now it goes in
    assert where3.slot == where1.slot and _same(_read(where3), v3)
    with pytest.raises(SlotRefused, match="holds version 3, not version 1"):  # came too late: refused whole
        _read(where1)


def test_the_slot_being_written_is_never_read_half_written(writer):
    """A reader of the slot under a write waits for it, then finds the new version (not its own):
    refused. A write that died half way leaves the slot refused too."""
    v1, v2, v3 = _state(1), _state(2), _state(3)
    where1, _ = writer.write(1, v1.values())
    writer.write(2, v2.values())
    half_way, resume = threading.Event(), threading.Event()

    def paused():
        for i, t in enumerate(v3.values()):
            if i == 2:
                half_way.set()
                assert resume.wait(30)
            yield t

    thread = threading.Thread(target=lambda: writer.write(3, paused()))
    thread.start()
    assert half_way.wait(30)
    try:
        with pytest.raises(TimeoutError):  # the writer holds slot 0
            _read(where1)
    finally:
        resume.set()
        thread.join(30)
    with pytest.raises(SlotRefused, match="version 3"):
        _read(where1)

    def dies():
        yield v1["embed.weight"]
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        writer.write(4, dies())  # into slot 1, which held v2
    with pytest.raises(SlotRefused, match="never finished"):
        _read(type(where1)(where1.path, where1.node_id, 1, 2, where1.layout))


def test_a_slot_that_changes_under_a_reader_is_reported_torn(writer):
    """The backstop behind the locks: a writer that ignored them (simulated by bumping the slot's
    sequence number) makes the read fail after the load, so the loader can distrust it."""
    import struct

    where, _ = writer.write(1, _state(1).values())
    with pytest.raises(TornRead), read_slot(where, timeout_s=0.3):
        seq, version = struct.unpack_from("<Qq", writer._mm, 16)
        struct.pack_into("<Qq", writer._mm, 16, seq + 2, version)


def test_a_reader_that_dies_holding_a_slot_frees_it(writer):
    """A generator's engine killed in the middle of a load (the driver's cure for one stuck there)
    leaves no lock behind: the kernel drops a dead process's locks, and the slot takes the next
    version. While the process lives and holds it, the writer says `SlotBusy`."""
    import json
    import signal

    where1, _ = writer.write(1, _state(1).values())
    writer.write(2, _state(2).values())
    w = where1
    code = (
        "import json, sys, time; from cir_actors.learning.shared_weights import read_slot; "
        "from cir_actors.types import SharedWeights; a = json.loads(sys.argv[1]); "
        "w = SharedWeights(a[0], a[1], a[2], a[3], tuple((n, d, tuple(s), o) for n, d, s, o in a[4])); "
        "ctx = read_slot(w, timeout_s=5); ctx.__enter__(); print('holding', flush=True); time.sleep(600)"
    )
    arg = json.dumps([w.path, w.node_id, w.slot, w.version, [[n, d, list(sh), o] for n, d, sh, o in w.layout]])
    reader = subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "holding"
        with pytest.raises(SlotBusy):
            writer.write(3, _state(3).values(), lock_timeout_s=0.2)
        reader.send_signal(signal.SIGKILL)
        reader.wait(timeout=10)
        where3, _ = writer.write(3, _state(3).values(), lock_timeout_s=5.0)
        assert where3.slot == where1.slot and _same(_read(where3), _state(3))
    finally:
        reader.kill()


def test_close_frees_the_region_and_orphans_of_dead_processes_are_swept():
    w = SharedWeightsWriter(_specs(_state(0)))
    where, _ = w.write(1, _state(1).values())
    _read(where)  # this process maps it too
    assert Path(w.path).exists() and w.nbytes >= 2 * sum(t.nbytes for t in _state(0).values())
    w.close()
    assert not Path(w.path).exists()
    # a region left by a process that died (a killed learner rank) is unlinked by the next writer
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    orphan = SHM_DIR / f"{region_prefix(int(dead.stdout))}test"
    live = SHM_DIR / f"{region_prefix()}test"
    foreign = SHM_DIR / f"{PREFIX}{int(dead.stdout)}-1-test"  # same pid, another pid namespace
    for p in (orphan, live, foreign):
        p.write_bytes(b"x")
    try:
        assert sweep_orphans() == [str(orphan)] and not orphan.exists() and live.exists() and foreign.exists()
    finally:
        for p in (orphan, live, foreign):
            p.unlink(missing_ok=True)
    assert not list(SHM_DIR.glob(f"{region_prefix()}*"))


def test_a_generator_on_another_node_gets_the_object_store():
    assert plan_shared_publication("A", ["A", "A"], 3) == (True, [])
    assert plan_shared_publication("A", ["A", "B"], 2) == (True, ["B"])
    assert plan_shared_publication("A", ["B", "C", "B"], 3) == (False, ["B", "C"])
    assert plan_shared_publication("A", None, 1) == (True, [])  # one node: every generator is local
    assert plan_shared_publication("A", None, 2)[1]  # unknown placement on a cluster: both


def test_shared_memory_is_cpu_only_in_the_config():
    from cir_actors.config import load_config

    assert load_config(None, ["learner.publish=shared_memory"]).learner.publish == "shared_memory"
    with pytest.raises(Exception, match="'cpu' only"):
        load_config(None, ["learner.publish=shared_memory", "model.device=cuda", "learner.backend=nccl"])
