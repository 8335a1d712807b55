"""Moving weights from the learner to the generators, and proving they arrived.

`fingerprint` is the checksum a publication carries and a generator echoes back after loading: a hash
of every tensor's name, dtype and shape and of the exact bytes of at most `FINGERPRINT_SAMPLES` of
its elements, taken at a fixed stride. It costs the same for a 7B model as for a tiny one (a few
MB hashed, never a pass over all the weights), it is bit-exact (no floating-point sums, so no
dependence on thread counts or reduction order), and it catches what goes wrong in practice: an
old version (an optimizer step changes every tensor), a missing, renamed, reshaped or mis-ordered
tensor, a corrupted stretch longer than the stride. It does not catch a single flipped element
between two sampled ones (tensors of at most `FINGERPRINT_SAMPLES` elements are hashed whole).

Two transports (`learner.publish`):
- object store: the learner's rank 0 puts a {hf_name: tensor} state dict once; `PolicyUpdate.weights`
  is its reference and every generator reads it (zero-copy on the same node). Nothing here.
- collective broadcast: `BroadcastSender` (learner rank 0) and `receive_broadcast` (each generator)
  form their own process group, independent of the learner's DeepSpeed world and of any group the
  generator's engine has: a gloo (CPU) or NCCL (GPU) group built on a TCPStore that the sender
  hosts. Rank 0 is the sender, ranks 1..G the generators. Each publication is a small header
  (version and the list of (name, dtype, shape)) followed by the tensors packed into flat byte
  buckets, so per-tensor latency is paid once per bucket.
  A broadcast is one collective: a member that dies fails it for everyone (its sockets close), and
  the group is formed anew by the next publication. While the group forms, every member waits for
  the others in `_rendezvous`, which `abort_broadcast` (anyone who can reach the sender's store,
  e.g. the driver replacing a generator that will never join) ends at once with `BroadcastAborted`.
This module does not decide *when* to publish: that is the scheduler's.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import msgpack
import torch
import torch.distributed as dist

FINGERPRINT_SAMPLES = 16384


def _tensor_digest(name: str, t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    stride = max(1, -(-flat.numel() // FINGERPRINT_SAMPLES))
    sample = flat[::stride].contiguous().cpu()
    h = hashlib.blake2b(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode(), digest_size=16)
    h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.digest()


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short hex digest of every tensor's name, dtype, shape and strided element sample, in name order."""
    fp = StreamingFingerprint()
    for name, t in named_tensors:
        fp.add(name, t)
    return fp.digest()


class StreamingFingerprint:
    """`fingerprint` computed one tensor at a time (for weights that are gathered and sent in a
    stream and never all held at once); `digest()` equals `fingerprint` over the same tensors.
    With an `executor`, each tensor is hashed on its threads (torch's strided gather and blake2b
    release the GIL), so that hashing overlaps the caller's copying; the caller must keep the
    tensors unchanged until `digest()`."""

    def __init__(self, executor: Executor | None = None) -> None:
        self._entries: list[tuple[str, bytes | Future]] = []
        self._executor = executor

    def add(self, name: str, t: torch.Tensor) -> None:
        d = self._executor.submit(_tensor_digest, name, t) if self._executor else _tensor_digest(name, t)
        self._entries.append((name, d))

    def digest(self) -> str:
        h = hashlib.sha256()
        for _, d in sorted((n, d if isinstance(d, bytes) else d.result()) for n, d in self._entries):
            h.update(d)
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (torch name without the prefix, e.g. "float32") and shape of one published tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _dtype(self.dtype).itemsize


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    raise ValueError(f"unknown tensor dtype '{name}' in a weight broadcast header")


_ALIGN = 64  # every tensor starts 64-byte aligned inside a bucket, so byte views cast to any dtype


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def plan_buckets(specs: list[TensorSpec], bucket_bytes: int) -> list[list[tuple[int, int]]]:
    """Consecutive tensors packed into buckets of at most `bucket_bytes` (a larger tensor gets a
    bucket of its own): per bucket, (spec index, byte offset). Both ends compute the same plan."""
    buckets: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    used = 0
    for i, spec in enumerate(specs):
        size = _aligned(spec.nbytes)
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append((i, used))
        used += size
    if current:
        buckets.append(current)
    return buckets


def _bucket_size(specs: list[TensorSpec], bucket: list[tuple[int, int]]) -> int:
    last, offset = bucket[-1]
    return offset + _aligned(specs[last].nbytes)


def group_address(backend: str, host: str, port: int, world_size: int) -> str:
    """What `PolicyUpdate.broadcast_group` holds: e.g. "gloo://10.0.0.3:41234?world=3"."""
    return f"{backend}://{host}:{port}?world={world_size}"


def parse_group_address(address: str) -> tuple[str, str, int, int]:
    """(backend, host, port, world size) from `group_address`'s form."""
    u = urlparse(address)
    world = parse_qs(u.query).get("world")
    if u.scheme not in ("gloo", "nccl") or not u.hostname or not u.port or not world:
        raise ValueError(
            f"broadcast group address '{address}' is not of the form gloo|nccl://host:port?world=N"
        )
    return u.scheme, u.hostname, u.port, int(world[0])


def node_ip() -> str:
    """This node's IP as other nodes see it (Ray's view when Ray is up, else the outbound interface)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _make_group(backend: str, store: dist.Store, rank: int, world: int, host: str, timeout: timedelta) -> Any:
    """A process group object of its own (not registered with torch.distributed's default world)."""
    prefixed = dist.PrefixStore("cir-weights", store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(prefixed, rank, world, opts)
    if not hasattr(dist, "ProcessGroupNCCL"):
        raise RuntimeError("the weight broadcast asks for nccl but this torch build has no NCCL")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(prefixed, rank, world, opts)


_JOINED, _ABORT = "cir-joined", "cir-abort"


class BroadcastAborted(RuntimeError):
    """The group was dissolved before it formed (`abort_broadcast`): the publication did not happen."""


def _rendezvous(store: dist.Store, world: int, timeout: timedelta) -> None:
    """Count this member in and wait until all `world` members are, or the group is aborted, or
    `timeout` passes (naming how many joined), before any collective can block on a missing one."""
    store.add(_JOINED, 1)
    deadline = time.monotonic() + timeout.total_seconds()
    while (joined := store.add(_JOINED, 0)) < world:
        if store.check([_ABORT]):
            raise BroadcastAborted(f"weight broadcast aborted before it formed: {store.get(_ABORT).decode()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"weight broadcast group: {joined} of {world} members joined within "
                               f"{timeout.total_seconds():.0f} s")
        time.sleep(0.05)


def abort_broadcast(address: str, reason: str, timeout_s: float = 10.0) -> bool:
    """Dissolve the group at `address` before it forms: its members waiting in the rendezvous raise
    `BroadcastAborted` with `reason`. False when the sender's store cannot be reached (it is gone:
    nobody waits in it). A group already formed is not affected (a dead member fails its collectives)."""
    _, host, port, world = parse_group_address(address)
    try:
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=timeout_s))
        store.set(_ABORT, reason)
    except (RuntimeError, OSError):  # torch raises DistNetworkError (a RuntimeError) when unreachable
        return False
    return True


def _broadcast(pg: Any, tensor: torch.Tensor, wait: bool = True) -> Any:
    """Broadcast from rank 0; with wait=False the caller waits on the returned work (and keeps
    `tensor` alive until then), so that the next bucket is packed or consumed meanwhile."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    work = pg.broadcast([tensor], opts)
    if wait:
        work.wait()
    return work


class BroadcastSender:
    """The learner's end of the weight broadcast: rank 0 of a group of 1 + `num_receivers`.

    Construction only opens the rendezvous store (non-blocking); the first `send` forms the group
    and blocks until every receiver has called `receive_broadcast` with this address. Each `send`
    must be matched by one `receive_broadcast` per receiver, in the same order.
    """

    def __init__(
        self,
        num_receivers: int,
        backend: str = "gloo",
        *,
        host: str | None = None,
        port: int = 0,
        device: str = "cpu",
        bucket_bytes: int = 16 << 20,
        timeout_s: float = 600.0,
    ) -> None:
        if num_receivers < 1:
            raise ValueError(f"a weight broadcast needs at least one receiver, got {num_receivers}")
        self.host = host or node_ip()
        self.world_size = num_receivers + 1
        self.backend = backend
        self.device = torch.device(device)
        self.bucket_bytes = bucket_bytes
        self._timeout = timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(
            self.host, port, self.world_size, is_master=True, timeout=self._timeout, wait_for_workers=False
        )
        self.address = group_address(backend, self.host, self._store.port, self.world_size)
        self._pg: Any = None

    def send(
        self, version: int, specs: list[TensorSpec], tensors: Iterable[torch.Tensor], *, checksum: bool = True
    ) -> str:
        """Broadcast one publication: `tensors` in the order of `specs` (a stream is fine: each is
        copied into a bucket as it comes). With `checksum`, returns the fingerprint of what was
        sent (one more pass over the weights; the learner, which computes it before publishing, passes False)."""
        if self._pg is None:
            _rendezvous(self._store, self.world_size, self._timeout)
            self._pg = _make_group(self.backend, self._store, 0, self.world_size, self.host, self._timeout)
        header = msgpack.packb(
            {
                "version": version,
                "bucket_bytes": self.bucket_bytes,
                "specs": [[s.name, s.dtype, list(s.shape)] for s in specs],
            }
        )
        _broadcast(self._pg, torch.tensor([len(header)], dtype=torch.int64, device=self.device))
        _broadcast(self._pg, torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device))
        fp = StreamingFingerprint()
        it = iter(tensors)
        in_flight: tuple[Any, torch.Tensor] | None = None  # one bucket on the wire while the next is packed
        for bucket in plan_buckets(specs, self.bucket_bytes):
            buf = torch.empty(_bucket_size(specs, bucket), dtype=torch.uint8, device=self.device)
            for i, offset in bucket:
                spec, t = specs[i], next(it)
                if tuple(t.shape) != spec.shape or str(t.dtype).removeprefix("torch.") != spec.dtype:
                    raise ValueError(
                        f"tensor '{spec.name}' is {t.dtype}{tuple(t.shape)}, its spec says {spec}"
                    )
                buf[offset : offset + spec.nbytes].view(t.dtype).copy_(t.reshape(-1))
                if checksum:
                    fp.add(spec.name, t)
            if in_flight is not None:
                in_flight[0].wait()
            in_flight = (_broadcast(self._pg, buf, wait=False), buf)
        if in_flight is not None:
            in_flight[0].wait()
        return fp.digest() if checksum else ""

    def close(self) -> None:
        self._pg = None
        self._store = None


_RECEIVER_GROUPS: dict[tuple[str, int], Any] = {}  # (address, rank) -> group; one per generator process


def receive_broadcast(
    update: Any,
    specs: list[TensorSpec] | None = None,
    *,
    rank: int,
    device: str = "cpu",
    timeout_s: float = 600.0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The generator's end: yields (hf_name, tensor) for one publication sent by `BroadcastSender`.

    `update` is the `PolicyUpdate` whose `broadcast_group` names the group; `rank` is this
    receiver's rank in it, 1 + the generator's index (rank 0 is the learner). The first call in a
    process joins the group (blocking until all members have joined) and keeps it for later
    updates. The header's version must equal `update.version` (a mismatch means the receivers and
    the sender fell out of step; it raises). `specs`, when given, must match the header exactly.

    Tensors are views into a freshly allocated bucket, valid after the iteration goes on (copy
    them into the engine's parameters, e.g. vLLM's `reload_weights(weights_iterator=...)`), on
    `device` ("cuda" for NCCL). Consume the iterator to the end: every receiver must take part in
    every bucket's broadcast, or the whole group stalls until `timeout_s`.
    """
    if not update.broadcast_group:
        raise ValueError(f"PolicyUpdate version {update.version} carries no broadcast_group")
    backend, host, port, world = parse_group_address(update.broadcast_group)
    if not 1 <= rank < world:
        raise ValueError(f"receiver rank {rank} outside 1..{world - 1} for group {update.broadcast_group}")
    key = (update.broadcast_group, rank)
    dev = torch.device(device)
    if key not in _RECEIVER_GROUPS:
        # One publisher at a time: a new group replaces this process's old ones (a learner that was
        # replaced, or reset its group), which would otherwise hold a store client each for good.
        for old in [k for k in _RECEIVER_GROUPS if k[0] != key[0]]:
            _RECEIVER_GROUPS.pop(old)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
        _rendezvous(store, world, timeout)
        _RECEIVER_GROUPS[key] = (store, _make_group(backend, store, rank, world, node_ip(), timeout))
    try:
        yield from _receive(_RECEIVER_GROUPS[key][1], update, specs, dev)
    except BaseException:
        _RECEIVER_GROUPS.pop(key, None)  # a failed collective leaves the group unusable: the next publication forms a new one
        raise


def _receive(
    pg: Any, update: Any, specs: list[TensorSpec] | None, dev: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    length = torch.zeros(1, dtype=torch.int64, device=dev)
    _broadcast(pg, length)
    raw = torch.empty(int(length.item()), dtype=torch.uint8, device=dev)
    _broadcast(pg, raw)
    header = msgpack.unpackb(raw.cpu().numpy().tobytes())
    sent = [TensorSpec(n, d, tuple(s)) for n, d, s in header["specs"]]
    if header["version"] != update.version:
        raise RuntimeError(
            f"weight broadcast out of step: expected version {update.version}, sender sent {header['version']}"
        )
    if specs is not None and list(specs) != sent:
        raise RuntimeError("weight broadcast header does not match the expected tensor specs")
    plan = plan_buckets(sent, header["bucket_bytes"])

    def post(k: int) -> tuple[Any, torch.Tensor]:
        buf = torch.empty(_bucket_size(sent, plan[k]), dtype=torch.uint8, device=dev)
        return _broadcast(pg, buf, wait=False), buf

    pending = post(0) if plan else None
    for k, bucket in enumerate(plan):
        work, buf = pending
        work.wait()
        pending = post(k + 1) if k + 1 < len(plan) else None  # the next bucket arrives while this one is used
        for i, offset in bucket:
            spec = sent[i]
            yield spec.name, buf[offset : offset + spec.nbytes].view(_dtype(spec.dtype)).view(spec.shape)


def close_receivers() -> None:
    """Forget this process's receiver groups (e.g. before joining a new learner's group)."""
    _RECEIVER_GROUPS.clear()
