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


def test_warm_starts_are_reused_only_under_the_config_they_were_measured_with():
    from cir_actors.bench.recipes import ROOT, reuse_refusal

    def setup(path: str, *overrides: str, eval_n: int = 2, settings: bool = True) -> dict:
        row = {"config": path, "overrides": list(overrides), "eval_n": eval_n}
        return row | ({"settings": load_config(path, list(overrides)).model_dump(mode="json")} if settings else {})

    demo = str(ROOT / "configs" / "demo.yaml")
    relative = "configs/demo.yaml"  # the same file written another way (the tests run from ROOT)
    assert reuse_refusal(setup(demo), setup(relative)) is None
    assert reuse_refusal(setup(demo, settings=False), setup(relative)) is None
    # the same path and overrides, but the file's content changed: named by the settings that changed
    measured = setup(demo) | {"settings": load_config(demo, ["learner.entropy_coef=0.01"]).model_dump(mode="json")}
    why = reuse_refusal(measured, setup(demo))
    assert why is not None and "learner.entropy_coef" in why and "generator" not in why
    # a setting added to the code since the warm starts were measured is not a difference; one removed is
    older = setup(demo)
    del older["settings"]["recovery"]["interpreter_call_s"]
    assert reuse_refusal(older, setup(demo)) is None
    assert "recovery.interpreter_call_s" in reuse_refusal(setup(demo), older)
    assert "config" in reuse_refusal(setup(demo, settings=False), setup(str(ROOT / "configs" / "tiny_cpu.yaml")))
    assert "overrides" in reuse_refusal(setup(demo), setup(demo) | {"overrides": ["data.seed=3"]})
    # how they are evaluated is no reason to refuse: the warm starts are evaluated again
    assert reuse_refusal(setup(demo), setup(demo, eval_n=4)) is None
    assert reuse_refusal(setup(demo, "data.num_eval=200"), setup(demo, "data.num_eval=500") | {"overrides": [
        "data.num_eval=200"]}) is None


def test_evaluation_of_and_the_gain_table():
    from cir_actors.bench.recipes import evaluation_of, gain_table

    now = {"eval_n": 4, "settings": {"data": {"num_eval": 500}}, "seeds": {}}
    assert evaluation_of(now) == {"n": 4, "num_eval": 500}
    assert evaluation_of(now, {"evaluation": {"n": 2, "num_eval": 200}}) == {"n": 2, "num_eval": 200}
    assert evaluation_of(now, {"runs": {}}) == {"n": 4, "num_eval": 500}  # a row from before rows recorded it
    here, there = {"n": 4, "num_eval": 500}, {"n": 2, "num_eval": 200}
    now["seeds"] = {"2": {"before": 0.572, "sft_steps": 550, "runs": {
        "a": {"gain": 0.134, "half_width_95": 0.03, "evaluation": here, "rl_s": 527.0},
        "b": {"gain": 0.068, "evaluation": there, "rl_s": 533.0}}}}
    table = gain_table(now, ["a", "b", "c"])
    assert "| 2 | 57.2% (550 SFT) | +13.4 +-3.0 (527 s) | +6.8 * (533 s) | - |" in table, table
    assert "500 problems x 4 samples" in table and "* measured under another evaluation" in table
    now["seeds"]["2"]["runs"].pop("b")
    assert "*" not in gain_table(now, ["a"])
