"""Weight publication through a shared-memory region, for generators on the learner's node.

One region per publisher: a file under /dev/shm (tmpfs), created once for the model's size with
every page touched (so no version pays page faults), holding a 4 KiB header and two slots of the
whole state dict each, laid out by `plan_layout` (every tensor 64-byte aligned). The writer
(learner rank 0, `SharedWeightsWriter`) puts version v into the slot that does not hold v-1, so a
generator can still be loading v-1 while v is written; it then names the slot in a
`types.SharedWeights`. A reader (`read_slot`, run inside the vLLM engine process) maps the region
once and hands out tensors that are views of the slot: the engine's weight loader copies from
them into its parameters, the only copy on the reader's side.

Who may touch a slot is decided by open-file-description locks (`F_OFD_SETLK`) on one byte per
slot: readers take it shared for the time of their load, the writer exclusive for the time of its
write, and the writer waits (with a deadline) rather than overwrite a slot a reader holds. The
kernel drops the locks of a process that dies, so a dead generator never blocks the learner. The
header also keeps, per slot, a sequence number (odd while a write is under way) and the version
it holds: a reader checks both under its lock and refuses a slot that holds another version (it
was overwritten: the reader came too late) or a write that never finished (a writer died in the
middle); after its load it checks that the sequence number did not move. So a reader gets the
version it asked for intact, or an error before anything was loaded, never a mix of two versions.

What this does not do: cross nodes (the learner falls back to the object store for a generator
on another node) or GPUs (CUDA IPC handles would take the place of the file; not built: docs/learner.md
says why).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import struct
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from cir_actors.learning.weight_sync import StreamingFingerprint, TensorSpec, _dtype
from cir_actors.types import SharedWeights

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "cir-weights-"  # then the creating process's pid, its pid namespace and a random part
_MAGIC = b"CIRWTS01"
_HEADER = 4096  # magic, slot size, then per slot (sequence number, version); the slots follow
_SLOT_FIELDS = struct.Struct("<Qq")  # sequence number (odd: being written), version (-1: none)
_ALIGN = 64
_PAGE = mmap.PAGESIZE
# Linux's open-file-description locks: they belong to an open file, not to a process, so they
# conflict between two opens in one process too (the tests rely on that) and die with the file.
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


class SlotRefused(RuntimeError):
    """The slot does not hold the asked-for version intact (overwritten, or a write that never
    finished); nothing was loaded from it."""


class TornRead(RuntimeError):
    """The slot changed while it was being read (the lock protocol was broken): what was loaded
    from it is a mix and must not be served."""


_POOL: ThreadPoolExecutor | None = None


class SlotBusy(TimeoutError):
    """A reader held the slot the next version goes into for as long as the writer would wait
    (a generator's engine stuck in a load): nothing was written."""


def _hash_pool() -> ThreadPoolExecutor:
    """Two threads for fingerprinting beside a copy (two cores here; more would only contend)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cir-fingerprint")
    return _POOL


def fingerprint_views(views: list[tuple[str, torch.Tensor]]) -> str:
    """`weight_sync.fingerprint` of a slot's views, hashed on two threads."""
    fp = StreamingFingerprint(_hash_pool())
    for name, t in views:
        fp.add(name, t)
    return fp.digest()


def plan_layout(specs: list[TensorSpec]) -> tuple[tuple[tuple[str, str, tuple[int, ...], int], ...], int]:
    """((name, dtype, shape, byte offset) per tensor, slot size in bytes rounded up to a page)."""
    layout, used = [], 0
    for s in specs:
        layout.append((s.name, s.dtype, tuple(s.shape), used))
        used += (s.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return tuple(layout), max(_PAGE, (used + _PAGE - 1) // _PAGE * _PAGE)


def local_node_id() -> str:
    """This process's Ray node id (the learner and a generator compare theirs), or the host name
    when Ray is not running here."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    import socket

    return "host:" + socket.gethostname()


def plan_shared_publication(
    learner_node: str, receiver_nodes: list[str] | None, alive_nodes: int
) -> tuple[bool, list[str]]:
    """(write the shared-memory region?, the receivers' nodes that need the object store instead).

    Known receivers: shared memory if any is on the learner's node, the object store for those that
    are not. Unknown receivers (`None`): shared memory, and the object store as well unless the
    cluster has a single node (a generator anywhere else could not read the region)."""
    if receiver_nodes is None:
        return True, ([] if alive_nodes <= 1 else ["<unknown>"])
    return learner_node in receiver_nodes, sorted({n for n in receiver_nodes if n != learner_node})


def _lock(fd: int, slot: int, kind: int, timeout_s: float, what: str) -> None:
    """Take (or with F_UNLCK release) the lock byte of `slot`, waiting at most `timeout_s`."""
    arg = struct.pack("hhqqi4x", kind, os.SEEK_SET, slot, 1, 0)  # struct flock, l_pid 0 for OFD locks
    deadline = time.monotonic() + timeout_s
    pause = 0.0005
    while True:
        try:
            fcntl.fcntl(fd, _F_OFD_SETLK, arg)
            return
        except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held by someone else
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what}: slot {slot} stayed locked for {timeout_s:.0f} s") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.01)


def _views(buf: mmap.mmap, base: int, layout: Iterable[tuple[str, str, tuple[int, ...], int]]) -> list[tuple[str, torch.Tensor]]:
    out = []
    with warnings.catch_warnings():  # a read-only mapping gives read-only views: the loader only reads them
        warnings.simplefilter("ignore", UserWarning)
        for name, dtype, shape, offset in layout:
            dt = _dtype(dtype)
            n = 1
            for d in shape:
                n *= d
            t = torch.frombuffer(buf, dtype=dt, count=n, offset=base + offset) if n else torch.empty(0, dtype=dt)
            out.append((name, t.view(shape)))
    return out


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def region_prefix(pid: int | None = None) -> str:
    """The start of the name of every region created by `pid` (default: this process)."""
    return f"{PREFIX}{os.getpid() if pid is None else pid}-{_pid_namespace()}-"


def sweep_orphans() -> list[str]:
    """Unlink regions whose creating process is gone (a learner rank killed before it could clean
    up); returns their paths. Regions of live processes, and of processes in another pid namespace
    (another container sharing /dev/shm: their pids mean nothing here), are left alone."""
    removed = []
    for p in SHM_DIR.glob(PREFIX + "*"):
        try:
            pid, ns = p.name[len(PREFIX):].split("-")[:2]
            if ns != _pid_namespace():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            removed.append(str(p))
        except (ValueError, PermissionError):
            continue
    return removed


class SharedWeightsWriter:
    """The learner's end: owns the region (creates it, writes versions into it, unlinks it on `close`)."""

    def __init__(self, specs: list[TensorSpec], *, lock_timeout_s: float = 300.0) -> None:
        for p in sweep_orphans():
            log.info("removed a shared-memory weight region left by a dead process: %s", p)
        self.specs = list(specs)
        self.layout, self.slot_bytes = plan_layout(self.specs)
        self.path = str(SHM_DIR / f"{region_prefix()}{uuid.uuid4().hex[:8]}")
        self.node_id = local_node_id()
        self.lock_timeout_s = lock_timeout_s
        size = _HEADER + 2 * self.slot_bytes
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(self._fd, 0, size)  # tmpfs pages allocated now, not at the first write
            self._mm = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as e:
            os.close(self._fd)
            os.unlink(self.path)
            raise RuntimeError(
                f"cannot create a {size / 1e9:.2f} GB weight region in {SHM_DIR} ({e.strerror}): "
                "learner.publish 'shared_memory' needs twice the published model's size free there; "
                "enlarge it or use learner.publish 'object_store'") from e
        # Touch one byte of every page for writing, so that no later write takes a page fault.
        torch.frombuffer(self._mm, dtype=torch.uint8)[::_PAGE].zero_()
        self._mm[: len(_MAGIC)] = _MAGIC
        struct.pack_into("<Q", self._mm, 8, self.slot_bytes)
        for slot in (0, 1):
            _SLOT_FIELDS.pack_into(self._mm, 16 + 16 * slot, 0, -1)
        self._dst = [_views(self._mm, _HEADER + slot * self.slot_bytes, self.layout) for slot in (0, 1)]
        self._last_slot = 1  # the first version goes into slot 0

    @property
    def nbytes(self) -> int:
        return _HEADER + 2 * self.slot_bytes

    def write(
        self, version: int, tensors: Iterable[torch.Tensor], *, checksum: bool = False,
        lock_timeout_s: float | None = None,
    ) -> tuple[SharedWeights, str]:
        """Copy `tensors` (in the order of the specs; a stream is fine) into the slot not holding the
        previous version, once no reader holds it, waiting for that at most `lock_timeout_s` (default
        the writer's), else `SlotBusy`; (where it is, its fingerprint if `checksum`)."""
        slot = 1 - self._last_slot
        try:
            _lock(self._fd, slot, fcntl.F_WRLCK, self.lock_timeout_s if lock_timeout_s is None else lock_timeout_s,
                  f"publishing version {version} into {self.path}: a generator still loads the version there")
        except TimeoutError as e:
            raise SlotBusy(str(e)) from None
        try:
            seq, _ = _SLOT_FIELDS.unpack_from(self._mm, 16 + 16 * slot)
            _SLOT_FIELDS.pack_into(self._mm, 16 + 16 * slot, seq + 1, -1)  # odd: a write is under way
            # The slot's copy of tensor i is hashed on another thread while tensor i+1 is copied
            # (the copy, not the source: a gathered ZeRO-3 tensor is freed once the next one comes).
            fp = StreamingFingerprint(_hash_pool())
            it = iter(tensors)
            for spec, (_, dst) in zip(self.specs, self._dst[slot], strict=True):
                t = next(it)
                if tuple(t.shape) != spec.shape or str(t.dtype).removeprefix("torch.") != spec.dtype:
                    raise ValueError(f"tensor '{spec.name}' is {t.dtype}{tuple(t.shape)}, its spec says {spec}")
                dst.copy_(t)
                if checksum:
                    fp.add(spec.name, dst)
            digest = fp.digest() if checksum else ""
            _SLOT_FIELDS.pack_into(self._mm, 16 + 16 * slot, seq + 2, version)
        finally:
            _lock(self._fd, slot, fcntl.F_UNLCK, 1.0, "release")
        self._last_slot = slot
        where = SharedWeights(path=self.path, node_id=self.node_id, slot=slot, version=version, layout=self.layout)
        return where, digest

    def close(self) -> None:
        """Unlink the region (memory is returned once every reader has unmapped it too)."""
        if self._fd < 0:
            return
        self._dst = []
        with contextlib.suppress(BufferError):  # a caller still holds a view: the mapping goes with it
            self._mm.close()
        os.close(self._fd)
        self._fd = -1
        Path(self.path).unlink(missing_ok=True)


class _Mapping:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        # Mapped once per process and kept: later versions reuse the page tables (no faults).
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        if self.mm[: len(_MAGIC)] != _MAGIC:
            self.close()
            raise SlotRefused(f"{path} is not a weight region (bad magic)")
        (self.slot_bytes,) = struct.unpack_from("<Q", self.mm, 8)

    def unlinked(self) -> bool:
        return os.fstat(self.fd).st_nlink == 0

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.mm.close()
        os.close(self.fd)


_MAPPINGS: dict[str, _Mapping] = {}  # path -> this process's mapping of it


def _mapping(path: str) -> _Mapping:
    for p in [p for p, m in _MAPPINGS.items() if p != path and m.unlinked()]:  # regions whose writer closed
        _MAPPINGS.pop(p).close()
    if path not in _MAPPINGS:
        _MAPPINGS[path] = _Mapping(path)
    return _MAPPINGS[path]


@contextlib.contextmanager
def read_slot(where: SharedWeights, *, timeout_s: float = 60.0) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Hold `where`'s slot (a shared lock) and yield (name, tensor) views of the version it names;
    the views are valid inside the `with` only. Raises `SlotRefused` before yielding if the slot
    does not hold that version intact, `TornRead` after the body if the slot changed under it."""
    m = _mapping(where.path)
    end = max((off + TensorSpec(n, d, s).nbytes for n, d, s, off in where.layout), default=0)
    if not 0 <= where.slot <= 1 or end > m.slot_bytes or _HEADER + 2 * m.slot_bytes > len(m.mm):
        raise SlotRefused(f"{where.path}: slot {where.slot} or its layout lies outside the region")
    _lock(m.fd, where.slot, fcntl.F_RDLCK, timeout_s, f"loading version {where.version} from {where.path}")
    try:
        seq, version = _SLOT_FIELDS.unpack_from(m.mm, 16 + 16 * where.slot)
        if seq % 2 or version != where.version:
            state = "a write that never finished" if seq % 2 else f"version {version}"
            raise SlotRefused(f"{where.path} slot {where.slot} holds {state}, not version {where.version}")
        views = _views(m.mm, _HEADER + where.slot * m.slot_bytes, where.layout)
        yield views
        del views
        if _SLOT_FIELDS.unpack_from(m.mm, 16 + 16 * where.slot) != (seq, version):
            raise TornRead(f"{where.path} slot {where.slot} changed while version {where.version} was read")
    finally:
        _lock(m.fd, where.slot, fcntl.F_UNLCK, 1.0, "release")


def close_readers() -> None:
    """Unmap every region this process mapped (a generator's shutdown)."""
    while _MAPPINGS:
        _MAPPINGS.popitem()[1].close()
