"""A run's inputs checked before anything starts: the model directory and its tokenizer, every row
of the training and held-out data, every gold answer parsed by math-verify.

A driver (train, demo, bench) calls `check_inputs(cfg)` after loading its config and before Ray or
any engine starts, so bad input is one sentence and exit code 2, not a traceback from inside an
actor minutes later (or, for a gold answer math-verify cannot read, a run where every reward is
silently wrong and nothing is learned). Everything here runs in the driver's process and main
thread, in seconds. Not covered: whether the sandbox and the scorer work on this machine (the
set-up probes, `interpreter.probe_interpreter` and `scorer.probe_scorer`), nor the config's own
values (`config.load_config`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cir_actors.config import Config
from cir_actors.data.loaders import DataError, load_tasks
from cir_actors.types import Task

log = logging.getLogger(__name__)

GOLD_CHECK_S = 120.0  # bound on parsing every gold answer (~2 ms each on a busy 2-core CPU: 12k in ~25 s)


class InputError(ValueError):
    """A run's input (model directory, data) is unusable, phrased for the user in one sentence."""


@dataclass(frozen=True)
class CheckedInputs:
    model_path: str
    tokenizer: Any
    train: list[Task]
    eval: list[Task]


def check_model_path(cfg: Config) -> str:
    """model.path as a Hugging Face model directory (InputError if it is not); None builds (or reuses)
    the tiny model in model.cache_dir. A directory this user may not read or write is one sentence too."""
    where = f"model.path '{cfg.model.path}'" if cfg.model.path else f"model.cache_dir '{cfg.model.cache_dir}'"
    try:
        if cfg.model.path is None:
            from cir_actors.data.tiny_model import build_tiny_model

            return str(build_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
        p = Path(cfg.model.path)
        if not p.exists():
            raise InputError(f"{where} does not exist (expected a Hugging Face model directory)")
        if not p.is_dir() or not (p / "config.json").is_file():
            raise InputError(f"{where} is not a Hugging Face model directory (no config.json in it)")
        return str(p)
    except OSError as e:
        raise InputError(f"{where}: {type(e).__name__}: {e.strerror or e} ({e.filename})") from None


def load_checked_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001 -- any loader failure is one sentence for the user
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(f"model.path '{model_path}': its tokenizer cannot be loaded ({type(e).__name__}: {first})") from None


def check_golds(tasks: list[Task], source: str, total_s: float = GOLD_CHECK_S) -> None:
    """InputError naming the first task whose gold answer math-verify cannot parse (and how many)."""
    from cir_actors.scoring.scorer import unparsable_golds

    bad, checked = unparsable_golds(((t.task_id, t.gold) for t in tasks), total_s=total_s)
    if bad:
        task_id, gold = bad[0]
        more = f" ({len(bad)} of {checked} gold answers fail)" if len(bad) > 1 else ""
        raise InputError(
            f"{source}: problem {task_id}: gold answer {gold!r} cannot be parsed by math-verify, so every "
            f"answer to it would score as wrong{more}; fix or remove it"
        )
    if checked < len(tasks):
        log.warning("%s: checked %d of %d gold answers within %.0f s; the rest are not checked",
                    source, checked, len(tasks), total_s)


def check_inputs(cfg: Config) -> CheckedInputs:
    """Model directory, tokenizer, every train and eval row, every gold answer of a data file.

    Raises InputError or DataError (one sentence each). The synthetic family's golds are integers
    written by data/tasks.py: they are not re-parsed.
    """
    model_path = check_model_path(cfg)
    tokenizer = load_checked_tokenizer(model_path)
    train = load_tasks(cfg, tokenizer, "train")
    if not train:
        raise DataError(f"{cfg.data.train_path or 'the synthetic family'}: no training problems")
    held_out = load_tasks(cfg, tokenizer, "eval")
    if cfg.data.source == "file":
        check_golds(train, str(cfg.data.train_path))
        if held_out:
            check_golds(held_out, str(cfg.data.eval_path))
    return CheckedInputs(model_path, tokenizer, train, held_out)
