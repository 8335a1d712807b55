"""Load-time refusals (window, TP with broadcast, sampling the learner cannot reproduce), the window
overrides applied identically in vLLM and the learner, and hub-id resolution into a node cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cir_actors.config import ConfigError, load_config
from cir_actors.data.model_setup import (
    check_feasible,
    check_training,
    check_window,
    context_window,
    ensure_local,
    hf_overrides,
    load_hf_config,
    read_model_config,
    resolve_model,
)

ROOT = Path(__file__).resolve().parents[2]
QWEN7B = ROOT / "tests" / "data" / "qwen2.5-math-7b"
RECIPE = ROOT / "configs" / "qwen2.5-math-7b.yaml"


def test_7b_window_refused_without_the_override():
    cfg = load_config(RECIPE, ["model.max_position_embeddings=null"])
    with pytest.raises(ConfigError) as info:
        check_window(cfg, QWEN7B)
    msg = str(info.value)
    assert "generator.max_prompt_tokens + generator.max_response_tokens = 1024 + 4096 = 5120" in msg
    assert "context window of 4096" in msg and "model.max_position_embeddings" in msg
    assert "\n" not in msg


def test_7b_recipe_is_feasible_on_the_shipped_config():
    cfg = load_config(RECIPE)
    assert check_feasible(cfg, QWEN7B) == 16384


def test_rope_window_follows_vllm_rules():
    raw = read_model_config(QWEN7B)
    yarn = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}}
    assert context_window(raw) == 4096
    assert context_window(raw, yarn) == 16384
    assert context_window(raw, {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}) == 8192
    cfg = load_config(RECIPE, ["model.max_position_embeddings=null",
                               ("model.rope_parameters={rope_type: yarn, factor: 2.0, "
                                "original_max_position_embeddings: 4096}")])
    over = hf_overrides(cfg, QWEN7B)
    # merged over the model's own (legacy top-level rope_theta carried into rope_parameters)
    assert over["rope_parameters"]["rope_theta"] == 10000.0 and over["rope_parameters"]["factor"] == 2.0
    assert check_window(cfg, QWEN7B) == 8192


def test_tp_with_broadcast_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config(RECIPE, ["generator.tensor_parallel_size=2"])
    assert "generator.tensor_parallel_size = 2" in str(info.value) and "learner.publish 'broadcast'" in str(info.value)
    assert load_config(RECIPE, ["generator.tensor_parallel_size=2", "learner.publish=object_store"])


@pytest.mark.parametrize(
    "override, words",
    [("generator.top_p=0.95", ["generator.top_p = 0.95", "nucleus"]),
     ("generator.temperature=0", ["generator.temperature = 0", "greedy"])],
)
def test_sampling_the_learner_cannot_reproduce_is_refused(override, words):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError) as info:
        check_training(cfg)
    assert all(w in str(info.value) for w in words)
    check_training(load_config(None, ["generator.temperature=0.7"]))  # reproducible: logits / T


def test_engine_and_learner_see_the_same_window(tiny_model_dir):
    """The overrides go through vLLM's own config construction and through transformers."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    cfg = load_config(None, [
        "generator.max_response_tokens=1500",
        "model.max_position_embeddings=4096",
        "model.rope_parameters={rope_type: yarn, factor: 2.0, original_max_position_embeddings: 1024, rope_theta: 20000.0}",
    ])
    with pytest.raises(ConfigError):
        check_window(load_config(None, ["generator.max_response_tokens=1500"]), tiny_model_dir)
    assert check_window(cfg, tiny_model_dir) == 2048
    over = hf_overrides(cfg, tiny_model_dir)
    mc = AsyncEngineArgs(model=str(tiny_model_dir), max_model_len=1756, hf_overrides=over).create_model_config()
    learner = load_hf_config(tiny_model_dir, cfg)
    assert mc.max_model_len == 1756
    for key in ("max_position_embeddings", "rope_parameters"):
        assert getattr(mc.hf_config, key) == getattr(learner, key) == over[key], key
    assert learner.rope_parameters["rope_theta"] == 20000.0


def test_hub_id_offline_gives_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["model.path=Qwen/Qwen2.5-Math-7B", f"model.hub_cache_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        resolve_model(cfg)
    msg = str(info.value)
    assert "'Qwen/Qwen2.5-Math-7B'" in msg and str(tmp_path) in msg and "HF_HUB_OFFLINE" in msg
    assert "\n" not in msg


def test_hub_id_resolves_from_a_populated_node_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A cache laid out as huggingface_hub lays it out resolves without any network, and a role
    handed the driver's snapshot path on a node where it is absent resolves the same id again."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--fake--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    cfg = load_config(None, ["model.path=fake/tiny", f"model.hub_cache_dir={tmp_path}"])
    path = resolve_model(cfg)
    assert Path(path) == repo / "snapshots" / sha
    assert json.loads((Path(path) / "config.json").read_text())["model_type"] == "qwen2"
    other_node = str(tmp_path / "elsewhere" / "models--fake--tiny" / "snapshots" / sha)
    assert Path(ensure_local(other_node, cfg)) == repo / "snapshots" / sha


def test_a_directory_without_config_json_is_refused(tmp_path):
    cfg = load_config(None, [f"model.path={tmp_path}"])
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(cfg)
