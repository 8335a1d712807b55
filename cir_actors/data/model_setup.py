"""Where the model comes from and whether the configured run can use it, checked before any actor starts.

Covers:
- `resolve_model(cfg)` / `ensure_local(path, cfg)`: `model.path` as a local directory, or a
  Hugging Face hub id fetched with `huggingface_hub.snapshot_download` into `model.hub_cache_dir`
  (one directory per node that every role on the node shares, so a node downloads once; the hub's
  own file locks serialise roles that ask at the same moment). With no hub reachable, one sentence.
- `hf_overrides(cfg, model_dir)`: the window settings (`model.max_position_embeddings`,
  `model.rope_parameters`) as one dict of config.json fields, applied identically as vLLM's
  `hf_overrides` in the generator and as `AutoConfig` keyword overrides in the learner
  (`load_hf_config`), so both compute the same positions.
- `context_window(...)`: the longest sequence the (overridden) model supports, computed as vLLM
  does (yarn: original_max_position_embeddings x factor; linear/dynamic: max_position_embeddings x
  factor; others: max_position_embeddings).
- `check_window` and `check_training` (`check_feasible` runs both): refusals in one sentence naming
  the fields — prompt + response over the window, and sampling settings whose behaviour log-probs
  the learner cannot reproduce (top_p < 1, temperature 0).
Not here: the pure-config cross checks (cir_actors/config.py) and memory feasibility
(entrypoints/plan.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cir_actors.config import Config, ConfigError

log = logging.getLogger(__name__)


def is_local_model_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - an old hub library without the constant: assume online
        return False


def resolve_hub(repo_id: str, cache_dir: str | Path, revision: str | None = None) -> str:
    """The local snapshot directory of `repo_id` in `cache_dir`, downloading it if it is not there.
    A cached snapshot is used without touching the network; otherwise one download (hub locks make
    concurrent callers on the node wait for it rather than download again)."""
    from huggingface_hub import snapshot_download

    cache_dir = str(Path(cache_dir).expanduser())
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not cached (or a partial cache): try the hub below
        log.info("%s not in the node cache %s (%s)", repo_id, cache_dir, type(e).__name__)
    if _hub_offline():
        raise ConfigError(
            f"model.path '{repo_id}' is neither a local model directory nor cached in model.hub_cache_dir "
            f"'{cache_dir}', and the Hugging Face hub is switched off (HF_HUB_OFFLINE): download it there or "
            "point model.path at a local copy"
        )
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - any failure to reach or read the hub is the user's to fix
        raise ConfigError(
            f"model.path '{repo_id}' is neither a local model directory nor cached in model.hub_cache_dir "
            f"'{cache_dir}', and the Hugging Face hub could not provide it ({type(e).__name__}): check the id "
            "and the network, or point model.path at a local copy"
        ) from None


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


def ensure_local(model_path: str | Path, cfg: Config) -> str:
    """`model_path` if it is a model directory on this node; otherwise the configured hub id
    resolved into this node's `model.hub_cache_dir` (a role on another node than the driver gets
    the driver's snapshot path, which does not exist here). One sentence when neither works."""
    path = str(model_path)
    if is_local_model_dir(path):
        return path
    hub_id = cfg.model.path if cfg.model.path and not Path(cfg.model.path).exists() else None
    if hub_id is None and _looks_like_hub_id(path) and not Path(path).exists():
        hub_id = path
    if hub_id is None or not _looks_like_hub_id(hub_id):
        raise ConfigError(f"model.path '{path}' is not a Hugging Face model directory (no config.json)")
    snap = Path(path)
    revision = snap.name if snap.parent.name == "snapshots" else None
    return resolve_hub(hub_id, cfg.model.hub_cache_dir, revision)


def resolve_model(cfg: Config) -> str:
    """The model directory for this run: `model.path` (local, or a hub id fetched into the node's
    cache), or the tiny model built in `model.cache_dir` when `model.path` is None."""
    if cfg.model.path:
        p = Path(cfg.model.path)
        if p.exists() and not is_local_model_dir(p):
            raise ConfigError(f"model.path '{p}' has no config.json: not a Hugging Face model directory")
        return ensure_local(cfg.model.path, cfg)
    from cir_actors.data.tiny_model import build_tiny_model

    return str(build_tiny_model(cfg.model.tiny, cfg.model.cache_dir))


# --------------------------------------------------------------------------------------- the window


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model config '{path}' could not be read as JSON ({type(e).__name__})") from None


def base_rope(raw: dict[str, Any]) -> dict[str, Any]:
    """The model's RoPE settings in the transformers>=5 form (`rope_parameters`, which holds
    rope_theta), also from an older config.json with `rope_theta` and `rope_scaling` at the top."""
    if isinstance(raw.get("rope_parameters"), dict):
        return dict(raw["rope_parameters"])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))}
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict):
        rope.update(scaling)
        if "type" in rope and "rope_type" not in scaling:
            rope["rope_type"] = rope.pop("type")
    return rope


def hf_overrides(cfg: Config, model_dir: str | Path) -> dict[str, Any]:
    """config.json fields to override, identical for the engine and the learner ({} when the
    model's own window is used). `model.rope_parameters` is merged over the model's own."""
    m = cfg.model
    out: dict[str, Any] = {}
    if m.max_position_embeddings is not None:
        out["max_position_embeddings"] = m.max_position_embeddings
    if m.rope_parameters:
        out["rope_parameters"] = {**base_rope(read_model_config(model_dir)), **m.rope_parameters}
    return out


def context_window(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> int:
    """Longest sequence (tokens) the model supports after `overrides`, as vLLM derives it."""
    merged = {**raw, **(overrides or {})}
    base = int(merged.get("max_position_embeddings") or 0)
    rope = overrides["rope_parameters"] if overrides and "rope_parameters" in overrides else base_rope(raw)
    kind = rope.get("rope_type", "default")
    factor = float(rope.get("factor", 1.0) or 1.0)
    if kind == "yarn":
        return int(int(rope.get("original_max_position_embeddings", base)) * factor)
    if kind in ("linear", "dynamic"):
        return int(base * factor)
    return base


def check_window(cfg: Config, model_dir: str | Path) -> int:
    """The window; ConfigError when generator.max_prompt_tokens + max_response_tokens exceed it."""
    raw = read_model_config(model_dir)
    over = hf_overrides(cfg, model_dir)
    window = context_window(raw, over)
    g = cfg.generator
    need = g.max_prompt_tokens + g.max_response_tokens
    if need > window:
        how = ("with model.max_position_embeddings / model.rope_parameters" if over else
               "from its config.json; extend it with model.max_position_embeddings and model.rope_parameters "
               "(docs/recipe-7b.md)")
        raise ConfigError(
            f"generator.max_prompt_tokens + generator.max_response_tokens = {g.max_prompt_tokens} + "
            f"{g.max_response_tokens} = {need} exceeds the model's context window of {window} tokens ({how})"
        )
    return window


def check_training(cfg: Config) -> None:
    """Sampling settings whose behaviour log-probs the learner cannot reproduce (it divides the
    logits by generator.temperature, as verl does, but applies no nucleus truncation)."""
    g = cfg.generator
    if g.top_p < 1.0:
        raise ConfigError(
            f"generator.top_p = {g.top_p} < 1 cannot be trained on: the learner's log-probs have no nucleus "
            "truncation, so they would disagree with the behaviour log-probs (set generator.top_p 1.0; "
            "evaluation may use any top_p)"
        )
    if g.temperature <= 0:
        raise ConfigError(
            "generator.temperature = 0 (greedy) cannot be trained on: greedy tokens have no sampling "
            "distribution for the learner to reproduce (use a temperature > 0)"
        )


def check_feasible(cfg: Config, model_dir: str | Path) -> int:
    """Every load-time refusal for a training run on `model_dir`; returns the context window."""
    check_training(cfg)
    return check_window(cfg, model_dir)


def load_hf_config(model_dir: str | Path, cfg: Config) -> Any:
    """The transformers config of `model_dir` with the same overrides the engine gets."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), **hf_overrides(cfg, model_dir))
