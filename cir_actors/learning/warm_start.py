"""SFT warm start: teach a fresh model the tool format before RL.

Demonstrations of the synthetic tasks (problem -> a ```python block -> its interpreter output ->
\\boxed{answer}) are trained with the learner's SFT mode — the same DeepSpeed ranks, the same
token-level trajectories and the same loss mask as RL, so interpreter tokens get no gradient here
either. The result is a Hugging Face model directory that RL starts from.

Where to stop: a tiny model learns to copy numbers in a sharp transition whose step varies from
machine to machine, so a fixed step count lands anywhere between ~10 % and ~80 % accuracy. With
`target_accuracy` the warm start checks, every `check_every` updates, the probability that
sampling at temperature 1 reproduces a demonstration exactly (the mean of exp(sum of its sampled
tokens' log-probs), on `check_size` training problems held out of SFT: an estimate of sampled
accuracy, computed by the learner's forward pass, no generation), and stops once it is reached —
and, with `kind_floor`, once every task kind's estimate reaches the floor too. The floor matters
because the kinds learn at different steps: with a pooled target alone, one seed stopped with
powmod at 97 % and mul at 12 %, and GRPO, which learns only from groups with mixed rewards, then
had almost nothing to learn mul from (held-out 54.2 % -> 51.7 % after 60 steps).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from cir_actors.config import Config

log = logging.getLogger(__name__)

# The demo's warm start (`entrypoints/demo.py` and `bench.py recipes` default to these; docs/demo.md
# has the measurements behind them).
DEMO_SFT_STEPS = 1500
DEMO_SFT_LR = 2e-3
DEMO_WARM_TARGET = 0.55
DEMO_KIND_FLOOR = 0.5


def warm_start_refusal(cfg: Config, *, target_accuracy: float | None, kind_floor: float = 0.0,
                       check_size: int = 128) -> str | None:
    """Why `warm_start` cannot run with these settings, in one sentence, or None: the demo and
    `bench.py recipes` ask before anything starts. Pure."""
    if kind_floor > 0 and target_accuracy is None:
        return "kind_floor is a condition of the stop at target_accuracy; give target_accuracy too"
    if cfg.data.source != "synthetic":
        return "the warm start needs data.source 'synthetic' (its demonstrations come from the task generator)"
    if target_accuracy is not None and cfg.data.num_train < 2 * check_size:
        return (f"the warm start's stop rule needs data.num_train >= {2 * check_size} (it estimates accuracy on "
                f"{check_size} of them), got {cfg.data.num_train}")
    return None


def warm_start(cfg: Config, base_model: str | Path, out_dir: str | Path, *, steps: int, batch_size: int = 32,
               lr: float | None = None, target_accuracy: float | None = None, kind_floor: float = 0.0,
               check_every: int = 10, check_size: int = 128) -> tuple[Path, dict[str, Any]]:
    """Run up to `steps` SFT updates of `batch_size` demonstrations on `base_model` (fewer when
    the estimate reaches `target_accuracy` and each kind's reaches `kind_floor`); returns the HF
    directory of the result and a summary (steps taken, losses, time, and each check's step,
    estimated accuracy and estimate per kind)."""
    from transformers import AutoTokenizer

    from cir_actors.data.loaders import load_tasks
    from cir_actors.data.tasks import demonstration_trajectory
    from cir_actors.learning.learner import Learner

    why = warm_start_refusal(cfg, target_accuracy=target_accuracy, kind_floor=kind_floor, check_size=check_size)
    if why is not None:
        raise ValueError(why)
    sft_cfg = cfg.model_copy(deep=True)
    if lr is not None:
        sft_cfg.learner.lr = lr
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    tasks = load_tasks(sft_cfg, tokenizer, "train")
    demos = [demonstration_trajectory(t, tokenizer) for t in tasks]
    if target_accuracy is not None:
        if len(demos) < 2 * check_size:
            raise ValueError(f"target_accuracy needs at least {2 * check_size} training problems, got {len(demos)}")
        demos, check = demos[:-check_size], demos[-check_size:]
        check_kinds = [t.subject for t in tasks[-check_size:]]
    rng = random.Random(cfg.data.seed)
    order = list(range(len(demos)))
    rng.shuffle(order)
    learner = Learner(sft_cfg, str(base_model), name="sft-learner")
    losses: list[float] = []
    checks: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for step in range(1, steps + 1):
            idx = [order[((step - 1) * batch_size + i) % len(order)] for i in range(batch_size)]
            m = learner.sft_step([demos[i] for i in idx])
            losses.append(float(m["loss"]))
            if step % 25 == 1 or step == steps:
                log.info("sft step %d/%d loss %.4f", step, steps, m["loss"])
            if target_accuracy is not None and (step % check_every == 0 or step == steps):
                probs = reproduction_probabilities(learner, check)
                by_kind = {k: float(np.mean([p for p, c in zip(probs, check_kinds) if c == k]))
                           for k in sorted(set(check_kinds))}
                checks.append({"step": step, "accuracy": float(np.mean(probs)), "by_kind": by_kind})
                log.info("sft step %d: estimated sampled accuracy %.3f (target %.2f), by kind %s (floor %.2f)", step,
                         checks[-1]["accuracy"], target_accuracy, {k: round(v, 3) for k, v in by_kind.items()},
                         kind_floor)
                if reached_target(checks[-1], target_accuracy, kind_floor):
                    break
        out = Path(out_dir)
        learner.save_checkpoint(out)
    finally:
        learner.shutdown()
    return out / "hf", {"steps": len(losses), "batch_size": batch_size, "first_loss": losses[0],
                        "last_loss": losses[-1], "checks": checks, "time_s": time.monotonic() - t0}


def reached_target(check: dict[str, Any], target_accuracy: float, kind_floor: float) -> bool:
    """The warm start's stopping rule: the estimate reaches the target and every kind's the floor."""
    return check["accuracy"] >= target_accuracy and min(check["by_kind"].values()) >= kind_floor


def reproduction_probabilities(learner: Any, demos: list[Any]) -> np.ndarray:
    """For each demonstration, the probability that sampling at temperature 1 reproduces its
    sampled tokens exactly, given its prompt and interpreter output (the learner's current weights)."""
    logprobs = learner.compute_logprobs([d.token_ids_T for d in demos])
    return np.array([np.exp(float((lp * d.loss_mask_T)[1:].sum())) for lp, d in zip(logprobs, demos)])
