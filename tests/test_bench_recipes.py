"""`bench.py recipes`: how a recipe is parsed, and which config its warm start and result are
evaluated under (a recipe that only changes training, such as the group size or the temperature,
is evaluated exactly as the default, so its warm start is not evaluated a second time)."""

from __future__ import annotations

import pytest

from cir_actors.bench.recipes import evaluation_config, parse_recipe
from cir_actors.config import load_config


def test_parse_recipe():
    assert parse_recipe("default") == ("default", [])
    assert parse_recipe("n16=generator.samples_per_prompt=16,learner.prompts_per_step=8") == (
        "n16", ["generator.samples_per_prompt=16", "learner.prompts_per_step=8"])
    with pytest.raises(ValueError, match="expected name"):
        parse_recipe("=a=1")
    with pytest.raises(ValueError, match="is not key=value"):
        parse_recipe("x=a=1,b")


def _evaluated(extra: list[str]):
    base = load_config(None, ["data.seed=2"])
    return base, *evaluation_config(base, load_config(None, ["data.seed=2", *extra]), extra)


def test_a_recipe_that_changes_only_training_is_evaluated_as_the_default():
    extra = ["generator.samples_per_prompt=16", "generator.temperature=1.2", "learner.prompts_per_step=8"]
    base, cfg, rule = _evaluated(extra)
    assert cfg.generator == base.generator and rule == []
    assert cfg.learner.prompts_per_step == 8  # the rest of the config is the recipe's


def test_a_recipe_that_changes_what_a_response_is_is_evaluated_under_it():
    extra = ["generator.stop_at_answer=true", "generator.temperature=1.2", "generator.max_response_tokens=64"]
    base, cfg, rule = _evaluated(extra)
    assert cfg.generator.stop_at_answer and cfg.generator.max_response_tokens == 64
    assert cfg.generator.temperature == base.generator.temperature
    assert rule == ["generator.max_response_tokens=64", "generator.stop_at_answer=true"]
