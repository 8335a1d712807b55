"""Per-sample advantages from the rewards of complete GRPO groups (all n samples of one prompt).

Three estimators, chosen by `learner.advantage`:
- `grpo`: (R - group mean) / (group std + eps), the std unbiased (ddof=1) as in verl and OpenRLHF;
- `mean`: R - group mean (Dr. GRPO: no std division, which otherwise up-weights easy/hard prompts);
- `reinforce_pp`: CIR's REINFORCE++-baseline: R - group mean, then whitened over the whole batch
  ((x - batch mean) / (batch std + eps)). OpenRLHF whitens over tokens, i.e. weighting each sample
  by its response length; pass `num_tokens_list` to get exactly that, or leave it None to whiten
  over samples.
A group whose rewards are all equal carries no signal: its advantages are exactly 0 under every
estimator (whitening would otherwise shift them off zero), it is left out of the batch statistics,
and it is counted in the returned stats. A one-sample group is such a group.

This module is numpy only: the learner's ranks call it on the rewards of the whole batch (gathered
from all ranks, a few floats) so every rank sees the same batch statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KINDS = ("grpo", "mean", "reinforce_pp")


def compute_advantages(
    rewards_G_list: Sequence[np.ndarray],
    kind: str,
    eps: float = 1e-6,
    num_tokens_list: Sequence[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], dict]:
    """Advantages, one float32 array per group (same shapes as the rewards), and stats:
    `groups`, `zero_adv_groups` (all rewards equal), `samples`, `adv_abs_mean`."""
    if kind not in KINDS:
        raise ValueError(f"advantage kind '{kind}' is not one of {', '.join(KINDS)}")
    rewards = [np.asarray(r, dtype=np.float64).reshape(-1) for r in rewards_G_list]
    flat = [r.size == 0 or bool(np.all(r == r[0])) for r in rewards]
    centered = [r - r.mean() if r.size else r for r in rewards]

    if kind == "grpo":
        out = [
            c / (r.std(ddof=1) + eps) if not f else np.zeros_like(r)
            for r, c, f in zip(rewards, centered, flat)
        ]
    elif kind == "mean":
        out = [c if not f else np.zeros_like(c) for c, f in zip(centered, flat)]
    else:
        live = [i for i, f in enumerate(flat) if not f]
        out = [np.zeros_like(c) for c in centered]
        if live:
            x = np.concatenate([centered[i] for i in live])
            if num_tokens_list is None:
                w = np.ones_like(x)
            else:
                w = np.concatenate(
                    [np.asarray(num_tokens_list[i], dtype=np.float64).reshape(-1) for i in live]
                )
            mean = float((w * x).sum() / w.sum())
            std = float(np.sqrt((w * (x - mean) ** 2).sum() / w.sum()))
            for i in live:
                out[i] = (centered[i] - mean) / (std + eps)

    out32 = [a.astype(np.float32) for a in out]
    n_samples = sum(r.size for r in rewards)
    stats = {
        "groups": len(rewards),
        "zero_adv_groups": int(sum(flat)),
        "samples": int(n_samples),
        "adv_abs_mean": float(sum(np.abs(a).sum() for a in out) / max(n_samples, 1)),
    }
    return out32, stats
