"""SFT warm start: teach a fresh model the tool format before RL.

Demonstrations of the synthetic tasks (problem -> a ```python block -> its interpreter output ->
\\boxed{answer}) are trained with the learner's SFT mode — the same DeepSpeed ranks, the same
token-level trajectories and the same loss mask as RL, so interpreter tokens get no gradient here
either. The result is a Hugging Face model directory that RL starts from. It does not evaluate.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from cir_actors.config import Config

log = logging.getLogger(__name__)


def warm_start(cfg: Config, base_model: str | Path, out_dir: str | Path, *, steps: int, batch_size: int = 32,
               lr: float | None = None) -> tuple[Path, dict[str, Any]]:
    """Run `steps` SFT updates of `batch_size` demonstrations on `base_model`; returns the HF
    directory of the result and a summary (losses, time)."""
    from transformers import AutoTokenizer

    from cir_actors.data import load_tasks
    from cir_actors.learner import Learner
    from cir_actors.tasks import demonstration_trajectory

    if cfg.data.source != "synthetic":
        raise ValueError("warm_start needs data.source 'synthetic' (its demonstrations come from the task generator)")
    sft_cfg = cfg.model_copy(deep=True)
    if lr is not None:
        sft_cfg.learner.lr = lr
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    tasks = load_tasks(sft_cfg, tokenizer, "train")
    demos = [demonstration_trajectory(t, tokenizer) for t in tasks]
    rng = random.Random(cfg.data.seed)
    order = list(range(len(demos)))
    rng.shuffle(order)
    learner = Learner(sft_cfg, str(base_model), name="sft-learner")
    losses: list[float] = []
    t0 = time.monotonic()
    try:
        for step in range(steps):
            idx = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
            m = learner.sft_step([demos[i] for i in idx])
            losses.append(float(m["loss"]))
            if step % 25 == 0 or step == steps - 1:
                log.info("sft step %d/%d loss %.4f", step + 1, steps, m["loss"])
        out = Path(out_dir)
        learner.save_checkpoint(out)
    finally:
        learner.shutdown()
    return out / "hf", {"steps": steps, "batch_size": batch_size, "first_loss": losses[0], "last_loss": losses[-1],
                        "time_s": time.monotonic() - t0}
