"""Moving weights from the learner to the generators, and proving they arrived.

`fingerprint` is the checksum a publication carries and a generator echoes back after loading: cheap
(two reductions per tensor, no full-bytes hash, so it is affordable for 7B models) and sensitive to
any change of any tensor's values, names or shapes. This module does not decide *when* to publish:
that is the scheduler's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short hex digest over (name, shape, sum, sum of squares) of every tensor, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t64 = t.detach().to(torch.float64)
        h.update(f"{name}|{tuple(t.shape)}|{t64.sum().item():.10e}|{t64.square().sum().item():.10e};".encode())
    return h.hexdigest()[:16]
