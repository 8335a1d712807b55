"""Trajectory dumps: a bounded, stratified sample of each step's trained trajectories, per token.

    RUN_DIR/trajectories/step_000012.msgpack    one file per step (msgpack frames, no pickle):
        frame 0: {"format", "step", "records", "omitted", "bytes"}; then one frame per trajectory.

A record holds what one needs to debug a tool-use trajectory token by token: token ids and their
text pieces, provenance (prompt / sampled / interpreter), loss mask, behaviour log-prob (generator),
the learner's proximal and current log-probs (taken from the training forward itself, see
`LearnerRank.train_step(record=...)`), the importance weight and ratio with their clip state, the
policy version, the turn index (interpreter outputs seen so far) and the distance from the last
interpreter output; and per trajectory the reward, verdict, extracted answer, advantage, budget,
finish reason and tool calls (code, output, error, duration).

Selection (`select_stratified`) happens on each learner rank over its shard: round-robin over the
strata correct / wrong / tool error / truncated, so every file shows some of each kind there is.
Size is bounded (`DumpsConfig.max_bytes_per_step`): records that would pass it are left out and
counted. Also here: turn-indexed loss diagnostics (`turn_sums`, merged over ranks by
`merge_turn_sums`, named by `turn_metrics`). What this module does not do: render (`ops/viewer.py`).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from cir_actors.types import FinishReason, ScoredTrajectory

log = logging.getLogger(__name__)
FORMAT = 1
PROMPT, SAMPLED, INTERPRETER = 0, 1, 2  # provenance codes
CLIP_NONE, CLIP_LOW, CLIP_HIGH, CLIP_DUAL = 0, 1, 2, 3  # clip state codes (as loss.policy_loss counts them)
LOW_PROB = math.log(0.01)  # a sampled token whose proximal probability is below 1% is "low-probability"
MAX_TURN = 4  # turn indices >= MAX_TURN share one bucket
DISTANCE_BUCKETS = ((0, 8), (8, 32), (32, 128), (128, 1 << 30))  # tokens since the last interpreter output

_ARRAY_FIELDS = (
    "token_ids", "provenance", "loss_mask", "behaviour_logprob", "proximal_logprob", "current_logprob",
    "is_weight", "ratio", "clip", "version", "turn", "since_tool",
)  # fmt: skip


def stratum(s: ScoredTrajectory) -> str:
    """The kind a trajectory is sampled as: tool_error, truncated, correct or wrong (first that holds)."""
    t = s.trajectory
    if t.num_interp_errors or t.num_interp_timeouts:
        return "tool_error"
    if t.finish_reason in (FinishReason.LENGTH, FinishReason.BUDGET):
        return "truncated"
    return "correct" if s.verdict.correct else "wrong"


STRATA = ("correct", "wrong", "tool_error", "truncated")


def select_stratified(kinds: list[str], k: int) -> list[int]:
    """Indices of up to k items, round-robin over STRATA (each stratum in its given order)."""
    queues = {name: [i for i, kind in enumerate(kinds) if kind == name] for name in STRATA}
    picked: list[int] = []
    while len(picked) < k and any(queues.values()):
        for name in STRATA:
            if queues[name] and len(picked) < k:
                picked.append(queues[name].pop(0))
    return picked


def provenance(loss_mask_T: np.ndarray, prompt_len: int) -> np.ndarray:
    """0 prompt, 1 sampled (loss mask 1), 2 interpreter output (response tokens the model did not sample)."""
    prov = np.where(np.asarray(loss_mask_T) > 0, SAMPLED, INTERPRETER).astype(np.int8)
    prov[:prompt_len] = PROMPT
    return prov


def turn_positions(prov_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token: the turn index (interpreter outputs that ended before it) and the distance in
    tokens from the end of the last interpreter output (-1 before the first one)."""
    prov = np.asarray(prov_T)
    n = len(prov)
    interp = prov == INTERPRETER
    ends = interp & ~np.append(interp[1:], False)  # last token of each interpreter segment
    turn = (np.cumsum(ends) - ends).astype(np.int16)  # ends strictly before t
    idx = np.arange(n)
    last = np.maximum.accumulate(np.where(ends, idx, -1))
    last_before = np.concatenate([[-1], last[:-1]]) if n else last
    since = np.where((last_before >= 0) & ~interp, idx - last_before - 1, -1).astype(np.int32)
    return turn, since


def token_values(
    behaviour_T: np.ndarray, proximal_T: np.ndarray, current_T: np.ndarray, advantage: float, mask_T: np.ndarray,
    *, clip_low: float, clip_high: float, is_cap: float, dual_clip: float | None,
) -> dict[str, np.ndarray]:
    """Importance weight min(exp(p - b), cap), ratio exp(c - p) and clip state per token, with the
    conditions of `loss.policy_loss` (zero where the mask is 0)."""
    m = np.asarray(mask_T) > 0
    b, p, c = (np.asarray(x, np.float64) for x in (behaviour_T, proximal_T, current_T))
    log_w = p - b
    weight = np.minimum(np.exp(log_w), is_cap)
    ratio = np.exp(c - p)
    clip = np.full(len(m), CLIP_NONE, np.int8)
    if advantage < 0:
        clip[ratio < 1.0 - clip_low] = CLIP_LOW
        if dual_clip is not None:
            obj = np.minimum(ratio * advantage, np.clip(ratio, 1 - clip_low, 1 + clip_high) * advantage)
            clip[obj < dual_clip * advantage] = CLIP_DUAL
    elif advantage > 0:
        clip[ratio > 1.0 + clip_high] = CLIP_HIGH
    clip[~m] = CLIP_NONE
    return {
        "is_weight": np.where(m, weight, 0.0).astype(np.float32),
        "ratio": np.where(m, ratio, 0.0).astype(np.float32),
        "clip": clip,
        "log_w": np.where(m, log_w, 0.0),
    }


def build_record(
    s: ScoredTrajectory, proximal_T: np.ndarray, current_T: np.ndarray | None, advantage: float, *,
    pieces: list[str], trained: bool, group: int, lcfg: Any,
) -> dict[str, Any]:
    """One dump record (plain Python and numpy; `encode_record` makes it msgpack-ready).
    `current_T` None (a sample not run through the loss: zero advantage) records the proximal values."""
    t = s.trajectory
    mask = np.asarray(t.loss_mask_T).copy()
    mask[0] = 0  # the first token has no log-prob (as the learner's collate)
    cur = proximal_T if current_T is None else current_T
    prov = provenance(t.loss_mask_T, t.prompt_len)
    turn, since = turn_positions(prov)
    vals = token_values(t.logprobs_T, proximal_T, cur, advantage, mask, clip_low=lcfg.clip_low,
                        clip_high=lcfg.clip_high, is_cap=lcfg.is_cap, dual_clip=lcfg.dual_clip)  # fmt: skip
    v = s.verdict
    return {
        "task_id": t.task_id, "sample_index": t.sample_index, "group": int(group), "kind": stratum(s),
        "prompt_len": t.prompt_len, "finish_reason": str(t.finish_reason), "budget": t.budget,
        "num_code_blocks": t.num_code_blocks, "num_executed": t.num_executed,
        "num_interp_errors": t.num_interp_errors, "num_interp_timeouts": t.num_interp_timeouts,
        "gen_time_s": t.gen_time_s, "interp_wait_s": t.interp_wait_s, "response_text": t.response_text,
        "tool_calls": [dict(c) for c in t.tool_calls],
        "reward": float(s.reward), "advantage": float(advantage), "trained": bool(trained),
        "verdict": {"correct": v.correct, "reason": str(v.reason), "predicted": v.predicted,
                    "duration_s": v.duration_s},
        "extracted_answer": v.predicted,
        "min_version": t.min_version(), "max_version": int(t.versions_T.max()) if len(t.versions_T) else -1,
        "pieces": list(pieces),
        "token_ids": np.asarray(t.token_ids_T, np.int32),
        "provenance": prov,
        "loss_mask": mask.astype(np.int8),
        "behaviour_logprob": np.asarray(t.logprobs_T, np.float32),
        "proximal_logprob": np.asarray(proximal_T, np.float32),
        "current_logprob": np.asarray(cur, np.float32),
        "is_weight": vals["is_weight"], "ratio": vals["ratio"], "clip": vals["clip"],
        "version": np.asarray(t.versions_T, np.int32),
        "turn": turn, "since_tool": since,
    }  # fmt: skip


def encode_record(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    for k in _ARRAY_FIELDS:
        arr = np.ascontiguousarray(rec[k])
        out[k] = {"dtype": arr.dtype.str, "data": arr.tobytes()}
    return out


def decode_record(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for k in _ARRAY_FIELDS:
        out[k] = np.frombuffer(d[k]["data"], dtype=np.dtype(d[k]["dtype"])).copy()
    return out


def dump_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "trajectories" / f"step_{step:06d}.msgpack"


def write_step(run_dir: str | Path, step: int, records: list[dict[str, Any]], max_bytes: int) -> dict[str, Any]:
    """Write one step's records (those that fit in `max_bytes`, in order); return the figures for
    metrics.jsonl: dump/trajectories, dump/omitted, dump/bytes. No records: no file."""
    if not records:
        return {"dump/trajectories": 0, "dump/omitted": 0, "dump/bytes": 0}
    from cir_actors.serialization import write_frames

    payloads, total = [], 0
    for rec in records:
        b = msgpack.packb(encode_record(rec), use_bin_type=True)
        if total + len(b) + 4 <= max_bytes:
            payloads.append(rec)
            total += len(b) + 4
    header = {"format": FORMAT, "step": step, "records": len(payloads), "omitted": len(records) - len(payloads),
              "bytes": total}  # fmt: skip
    path = dump_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        write_frames(f, [header, *(encode_record(r) for r in payloads)])
    tmp.replace(path)
    return {"dump/trajectories": len(payloads), "dump/omitted": header["omitted"], "dump/bytes": path.stat().st_size}


def read_step(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, decoded records) of one dump file."""
    from cir_actors.serialization import read_frames

    with open(path, "rb") as f:
        frames = list(read_frames(f))
    if not frames or frames[0].get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a trajectory dump (format {FORMAT})")
    return frames[0], [decode_record(d) for d in frames[1:]]


# ---------------------------------------------------------------- turn-indexed diagnostics
_SUM_KEYS = ("tokens", "kl", "is_weight", "clip_low", "clip_high", "low_prob", "tool_errors")


def _bucket_names() -> list[str]:
    turns = [f"turn{k}" for k in range(MAX_TURN)] + [f"turn{MAX_TURN}+"]
    dist = [f"dist{lo}-{hi - 1}" if hi < 1 << 30 else f"dist{lo}+" for lo, hi in DISTANCE_BUCKETS]
    return turns + dist


def turn_sums(
    behaviour_T: np.ndarray, proximal_T: np.ndarray, current_T: np.ndarray, advantage: float, mask_T: np.ndarray,
    prompt_len: int, tool_calls: tuple[dict[str, Any], ...] | list, *, lcfg: Any, into: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Add one trajectory's sampled tokens to per-bucket sums: by turn index (interpreter outputs
    seen) and by distance from the last interpreter output (tokens before any output are in no
    distance bucket). Per bucket: tokens, kl (k3 of behaviour vs proximal), is_weight (sum and
    `is_weight_max`), clip_low, clip_high, low_prob (proximal prob < 1%), and tool_errors (turns
    k >= 1 whose opening interpreter output was an error)."""
    out = into if into is not None else {}
    mask = np.asarray(mask_T).astype(bool).copy()
    mask[0] = False
    prov = provenance(mask_T, prompt_len)
    turn, since = turn_positions(prov)
    vals = token_values(behaviour_T, proximal_T, current_T, advantage, mask, clip_low=lcfg.clip_low,
                        clip_high=lcfg.clip_high, is_cap=lcfg.is_cap, dual_clip=lcfg.dual_clip)  # fmt: skip
    log_w = vals["log_w"]
    kl = np.exp(log_w) - 1.0 - log_w
    low = np.asarray(proximal_T) < LOW_PROB
    names = _bucket_names()
    selectors = [(names[k], mask & (turn == k)) for k in range(MAX_TURN)]
    selectors.append((names[MAX_TURN], mask & (turn >= MAX_TURN)))
    for name, (lo, hi) in zip(names[MAX_TURN + 1 :], DISTANCE_BUCKETS):
        selectors.append((name, mask & (since >= lo) & (since < hi)))
    errors = [not c.get("ok", True) for c in tool_calls]
    for name, sel in selectors:
        n = int(sel.sum())
        if not n:
            continue
        b = out.setdefault(name, {key: 0.0 for key in _SUM_KEYS} | {"is_weight_max": 0.0})
        b["tokens"] += n
        b["kl"] += float(kl[sel].sum())
        b["is_weight"] += float(vals["is_weight"][sel].sum())
        b["is_weight_max"] = max(b["is_weight_max"], float(vals["is_weight"][sel].max()))
        b["clip_low"] += float((vals["clip"][sel] == CLIP_LOW).sum())
        b["clip_high"] += float((vals["clip"][sel] == CLIP_HIGH).sum())
        b["low_prob"] += float(low[sel].sum())
        if name.startswith("turn"):
            ks = np.unique(turn[sel])
            b["tool_errors"] += float(sum(1 for k in ks if 1 <= k <= len(errors) and errors[k - 1]))
    return out


def merge_turn_sums(parts: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for part in parts:
        for name, b in part.items():
            acc = out.setdefault(name, {key: 0.0 for key in _SUM_KEYS} | {"is_weight_max": 0.0})
            for key, v in b.items():
                acc[key] = max(acc[key], v) if key == "is_weight_max" else acc[key] + v
    return out


def turn_metrics(sums: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat metrics `turn/<bucket>/<figure>`: tokens, mismatch_kl, is_weight_mean, is_weight_max,
    clip_frac_low, clip_frac_high, low_prob_rate, and (turn buckets) tool_errors."""
    out: dict[str, float] = {}
    for name in _bucket_names():
        b = sums.get(name)
        if not b or not b["tokens"]:
            continue
        n = b["tokens"]
        p = f"turn/{name}/"
        out |= {p + "tokens": n, p + "mismatch_kl": b["kl"] / n, p + "is_weight_mean": b["is_weight"] / n,
                p + "is_weight_max": b["is_weight_max"], p + "clip_frac_low": b["clip_low"] / n,
                p + "clip_frac_high": b["clip_high"] / n, p + "low_prob_rate": b["low_prob"] / n}  # fmt: skip
        if name.startswith("turn"):
            out[p + "tool_errors"] = b["tool_errors"]
    return out


def dump_step(run_dir: str | Path, step: int, records: list[dict[str, Any]], cfg: Any) -> dict[str, Any]:
    """What the driver calls once per step: write the learner's records (`Learner.train_step(record=...)`)
    and, when a W&B run is active, log them as the table `samples` (`wandb_table`). Returns the
    metrics.jsonl figures (dump/trajectories, dump/omitted, dump/bytes)."""
    figures = write_step(run_dir, step, records, cfg.dumps.max_bytes_per_step)
    wandb = sys.modules.get("wandb")  # only when the trainer imported it (W&B not disabled)
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None and records:
        try:
            run.log({"samples": wandb_table(wandb, step, records)}, step=step)
        except Exception as e:  # noqa: BLE001 - W&B is an observer: a failure to log must not stop training
            log.warning("W&B samples table not logged: %s", e)
    return figures


TABLE_COLUMNS = ("step", "task_id", "sample", "kind", "problem", "response", "reward", "verdict", "answer",
                 "finish_reason", "tool_calls", "tool_errors", "versions", "tokens")  # fmt: skip


def wandb_table(wandb: Any, step: int, records: list[dict[str, Any]]) -> Any:
    """A `wandb.Table` of the records: the problem (decoded prompt), the response with its code and
    output blocks, reward, verdict, extracted answer, finish reason and the tool calls (JSON)."""
    import json

    table = wandb.Table(columns=list(TABLE_COLUMNS))
    for r in records:
        pl = r["prompt_len"]
        table.add_data(
            step, r["task_id"], r["sample_index"], r["kind"], "".join(r["pieces"][:pl]), "".join(r["pieces"][pl:]),
            r["reward"], r["verdict"]["reason"], r["extracted_answer"], r["finish_reason"],
            json.dumps(r["tool_calls"], default=str), r["num_interp_errors"] + r["num_interp_timeouts"],
            f"{r['min_version']}..{r['max_version']}", len(r["token_ids"]),
        )  # fmt: skip
    return table
