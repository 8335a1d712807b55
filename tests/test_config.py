"""The typed config: every file in configs/ validates; bad input gets one sentence naming key and value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cir_actors.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny_cpu.yaml", "qwen2.5-math-7b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert cfg.scheduler.budget_at(0) >= 0


def test_paper_recipe():
    cfg = load_config(ROOT / "configs" / "qwen2.5-math-7b.yaml")
    assert cfg.generator.samples_per_prompt == 16
    assert (cfg.learner.prompts_per_step, cfg.learner.mini_batch_prompts) == (128, 64)
    assert cfg.learner.lr == 1e-6 and cfg.learner.weight_decay == 0.01 and cfg.learner.grad_clip == 1.0
    assert (cfg.generator.max_prompt_tokens, cfg.generator.max_response_tokens) == (1024, 4096)
    assert (cfg.learner.clip_low, cfg.learner.clip_high) == (0.2, 0.28)
    assert cfg.learner.kl_coef == 0 and cfg.learner.entropy_coef == 0
    assert [cfg.scheduler.budget_at(s) for s in (0, 99, 100, 199, 200, 299)] == [2, 2, 3, 3, 4, 4]
    assert cfg.interpreter.output_max_chars == 400


def test_overrides_are_typed():
    cfg = load_config(None, ["learner.lr=1e-6", "scheduler.budget_schedule=[[0,1],[5,3]]", "model.dtype=bfloat16"])
    assert cfg.learner.lr == 1e-6
    assert cfg.scheduler.budget_at(4) == 1 and cfg.scheduler.budget_at(5) == 3
    assert cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["learner.lrr=1"], ["learner.lrr", "unknown key"]),
        (["learner.lr=-1"], ["learner.lr", "-1", "greater than 0"]),
        (["model.dtype=int8"], ["model.dtype", "int8"]),
        (["learner.prompts_per_step=6"], ["prompts_per_step", "6", "mini_batch_prompts"]),
        (["scheduler.budget_schedule=[[5,2]]"], ["budget_schedule", "step 0"]),
        (["learner"], ["section.key=value"]),
    ],
)
def test_bad_values_give_one_sentence(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("learner:\n  zero_stag: 2\n")
    with pytest.raises(ConfigError, match="learner.zero_stag"):
        load_config(typo)


def test_dry_run_cli(tmp_path):
    ok = subprocess.run(
        [sys.executable, "entrypoints/train.py", "--config", "configs/tiny_cpu.yaml", "--dry-run", "learner.lr=0.01"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.01" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "entrypoints/train.py", "--dry-run", "generator.temperature=hot"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode != 0
    assert "generator.temperature" in bad.stderr and "hot" in bad.stderr and "Traceback" not in bad.stderr


def test_dry_run_checks_sampling_and_the_window_of_a_local_model():
    def dry(*args):
        return subprocess.run([sys.executable, "entrypoints/train.py", "--dry-run", *args],
                              check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)

    top_p = dry("generator.top_p=0.9")
    assert top_p.returncode == 2 and "generator.top_p = 0.9 < 1 cannot be trained on" in top_p.stderr
    recipe = ["--config", "configs/qwen2.5-math-7b.yaml", "model.path=tests/data/qwen2.5-math-7b"]
    ok = dry(*recipe)
    assert ok.returncode == 0 and "fit the context window of 16384" in ok.stderr, ok.stderr
    short = dry(*recipe, "model.max_position_embeddings=4096")
    assert short.returncode == 2 and "exceeds the model's context window of 4096 tokens" in short.stderr, short.stderr
    hub = dry("--config", "configs/qwen2.5-math-7b.yaml")
    assert hub.returncode == 0 and "is not a local directory" in hub.stderr, hub.stderr


def test_correction_options_load_and_bad_bands_are_one_sentence():
    from cir_actors.config import ConfigError, load_config

    cfg = load_config(None, ["learner.correction=icepop", "learner.is_band=[0.5,5.0]"])
    assert cfg.learner.correction == "icepop" and cfg.learner.is_band == (0.5, 5.0)
    with pytest.raises(ConfigError, match="learner.is_band .* must satisfy"):
        load_config(None, ["learner.is_band=[2.0,5.0]"])
    with pytest.raises(ConfigError, match="learner.correction"):
        load_config(None, ["learner.correction=vtrace"])


def test_plus_recipe_is_the_7b_recipe_with_the_options():
    base = load_config(ROOT / "configs" / "qwen2.5-math-7b.yaml")
    plus = load_config(ROOT / "configs" / "qwen2.5-math-7b-plus.yaml")
    assert plus.learner.correction == "icepop" and plus.learner.is_band == (0.5, 5.0)
    assert plus.buffer.dynamic_sampling and plus.buffer.void_turn_filter and plus.scheduler.roc
    assert plus.model.path == base.model.path and plus.generator.samples_per_prompt == base.generator.samples_per_prompt


def test_memory_option_defaults_gradient_checkpointing_on_cuda_packing_with_varlen_attention():
    assert load_config(None, []).learner.gradient_checkpointing is False
    assert load_config(None, ["model.device=cuda"]).learner.gradient_checkpointing is True
    assert load_config(None, ["model.device=cuda", "learner.gradient_checkpointing=false"]).learner.gradient_checkpointing is False
    assert load_config(None, []).learner.packing is False  # sdpa: a packed row's attention is quadratic
    assert load_config(None, ["learner.attn_implementation=flash_attention_2"]).learner.packing is True
    assert load_config(None, ["learner.packing=true"]).learner.packing is True
