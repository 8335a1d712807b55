"""msgpack frames for checkpointed buffers and dumps round-trip scored trajectories exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cir_actors.serialization import decode_scored, encode_scored, read_frames, write_frames
from cir_actors.types import FinishReason, ScoredTrajectory, Trajectory, Verdict, VerdictReason


def _scored(seed: int) -> ScoredTrajectory:
    rng = np.random.default_rng(seed)
    n = 12
    mask = (rng.random(n) > 0.5).astype(np.int8)
    mask[:3] = 0
    traj = Trajectory(
        task_id=f"t{seed}", sample_index=seed, token_ids_T=rng.integers(0, 500, n).astype(np.int32),
        loss_mask_T=mask, logprobs_T=(-rng.random(n) * mask).astype(np.float32),
        versions_T=np.where(mask == 1, seed, -1).astype(np.int32), prompt_len=3,
        finish_reason=FinishReason.BUDGET, budget=2, num_code_blocks=3, num_executed=2,
        response_text="```python\nprint(1)\n```", tool_calls=({"code": "print(1)", "ok": True, "output": "1"},),
    )
    return ScoredTrajectory(traj, Verdict(False, "7", VerdictReason.WRONG, 0.01), -1.0)


def test_round_trip_is_exact():
    items = [_scored(s) for s in range(3)]
    buf = io.BytesIO()
    write_frames(buf, [encode_scored(s) for s in items])
    buf.seek(0)
    back = [decode_scored(d) for d in read_frames(buf)]
    for a, b in zip(items, back, strict=True):
        for k in ("token_ids_T", "loss_mask_T", "logprobs_T", "versions_T"):
            x, y = getattr(a.trajectory, k), getattr(b.trajectory, k)
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert b.trajectory.finish_reason is FinishReason.BUDGET
        assert b.trajectory.tool_calls == a.trajectory.tool_calls
        assert b.verdict == a.verdict and b.reward == a.reward


def test_truncated_frame_is_an_error():
    buf = io.BytesIO()
    write_frames(buf, [encode_scored(_scored(0))])
    data = buf.getvalue()[:-5]
    with pytest.raises(ValueError, match="truncated"):
        list(read_frames(io.BytesIO(data)))
