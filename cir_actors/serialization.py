"""msgpack encoding of scored and partial trajectories, for checkpointed buffers and trajectory dump files.

Length-prefixed frames (4-byte big-endian length, then one msgpack map), numpy arrays as
{dtype, data}. No pickle: a dump can be read back without trusting whoever wrote it.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import msgpack
import numpy as np

from cir_actors.types import (
    FinishReason,
    PartialTrajectory,
    ScoredTrajectory,
    Trajectory,
    Verdict,
    VerdictReason,
)

_ARRAYS = ("token_ids_T", "loss_mask_T", "logprobs_T", "versions_T")


def _encode_traj(t: Trajectory | PartialTrajectory) -> dict[str, Any]:
    d = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
    for k in _ARRAYS:
        arr = np.ascontiguousarray(d[k])
        d[k] = {"dtype": arr.dtype.str, "data": arr.tobytes()}
    if "finish_reason" in d:
        d["finish_reason"] = str(t.finish_reason)
    d["tool_calls"] = [dict(c) for c in t.tool_calls]
    return d


def _decode_arrays(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    for k in _ARRAYS:
        d[k] = np.frombuffer(d[k]["data"], dtype=np.dtype(d[k]["dtype"])).copy()
    d["tool_calls"] = tuple(d["tool_calls"])
    return d


def _decode_traj(d: dict[str, Any]) -> Trajectory:
    d = _decode_arrays(d)
    d["finish_reason"] = FinishReason(d["finish_reason"])
    return Trajectory(**d)


def encode_partial(p: PartialTrajectory) -> dict[str, Any]:
    return _encode_traj(p)


def decode_partial(d: dict[str, Any]) -> PartialTrajectory:
    return PartialTrajectory(**_decode_arrays(d))


def encode_scored(s: ScoredTrajectory) -> dict[str, Any]:
    v = s.verdict
    return {
        "trajectory": _encode_traj(s.trajectory),
        "verdict": {"correct": v.correct, "predicted": v.predicted, "reason": str(v.reason), "duration_s": v.duration_s},
        "reward": s.reward,
    }


def decode_scored(d: dict[str, Any]) -> ScoredTrajectory:
    v = d["verdict"]
    verdict = Verdict(v["correct"], v["predicted"], VerdictReason(v["reason"]), v["duration_s"])
    return ScoredTrajectory(_decode_traj(d["trajectory"]), verdict, float(d["reward"]))


def write_frames(f: BinaryIO, objects: Iterable[Any]) -> None:
    for obj in objects:
        payload = msgpack.packb(obj, use_bin_type=True)
        f.write(struct.pack(">I", len(payload)))
        f.write(payload)


def read_frames(f: BinaryIO) -> Iterator[Any]:
    while header := f.read(4):
        if len(header) < 4:
            raise ValueError("truncated frame header")
        (n,) = struct.unpack(">I", header)
        payload = f.read(n)
        if len(payload) < n:
            raise ValueError(f"truncated frame: expected {n} bytes, got {len(payload)}")
        yield msgpack.unpackb(payload, raw=False)
