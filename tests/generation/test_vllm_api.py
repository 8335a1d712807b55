"""The generator's start-up check of the vLLM APIs it uses, and the pinned range in pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cir_actors.generation import generator

ROOT = Path(__file__).resolve().parents[2]


def test_installed_vllm_has_every_api():
    generator.check_vllm_api()


@pytest.mark.parametrize(
    "attr, value, words",
    [("VLLM_ENGINE_METHODS", ("generate", "pause_everything"), ["AsyncLLM has no method 'pause_everything'"]),
     ("VLLM_ENGINE_ARGS", ("logprobs_mode", "weight_transfer"), ["AsyncEngineArgs has no field 'weight_transfer'"])],
)
def test_missing_api_is_named_in_one_sentence(monkeypatch, attr, value, words):
    monkeypatch.setattr(generator, attr, value)
    with pytest.raises(RuntimeError) as info:
        generator.check_vllm_api()
    assert all(w in str(info.value) for w in words) and "pyproject.toml" in str(info.value)


def test_gpu_extra_pins_a_range_that_admits_the_tested_version():
    import vllm
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    (req,) = [Requirement(r) for r in extra if r.startswith("vllm")]
    spec = SpecifierSet(str(req.specifier))
    assert any(s.operator == "<" for s in spec), "the gpu extra must have an upper bound"
    assert vllm.__version__.split("+")[0] in spec
