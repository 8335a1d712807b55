"""Evaluation: pass@k and the aggregation (pure), the entrypoint's bad-input sentences, and the tiny
model evaluated end to end on a benchmark slice with and without tools (real vLLM, real sandbox)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest

from cir_actors.config import load_config
from cir_actors.scoring.evaluation import (
    EvalError,
    EvalRunner,
    SampleRecord,
    aggregate,
    benchmark_tasks_for,
    ks_for,
    load_tokenizer,
    paired_difference,
    pass_at_k,
    results_markdown,
    summarize,
)
from cir_actors.types import Task

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT.parent / "shared" / "data" / "benchmarks"


# ------------------------------------------------------------------------------------------- pure


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c of them correct) holding at least one correct."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert math.isclose(pass_at_k(n, c, k), _brute_pass_at_k(n, c, k), abs_tol=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(2) == [1, 2]
    assert ks_for(6) == [1, 2, 4, 6]
    assert ks_for(16) == [1, 2, 4, 8, 16]


def _rec(task, correct, tokens=10, blocks=0, executed=0, failures=0, subject=None, reason=None):
    return SampleRecord(
        task,
        correct,
        tokens,
        blocks,
        executed,
        failures,
        reason or ("correct" if correct else "wrong"),
        "stop",
        subject,
    )


def test_aggregate_hand_computed():
    records = [
        _rec("a", True, tokens=10, blocks=2, executed=2, failures=1),
        _rec("a", False, tokens=20, blocks=1, executed=1),
        _rec("b", False, tokens=30, reason="no_box"),
        _rec("b", False, tokens=40, blocks=3, executed=2, failures=2),
    ]
    m = aggregate(records)
    assert (m["problems"], m["samples"], m["n"]) == (2, 4, 2)
    assert m["avg_at_n"] == pytest.approx(0.25)
    assert m["pass_at_k"] == {"1": pytest.approx(0.25), "2": pytest.approx(0.5)}
    assert m["mean_response_tokens"] == pytest.approx(25.0)
    assert m["mean_code_blocks"] == pytest.approx(1.5)
    assert m["mean_executed_calls"] == pytest.approx(1.25)
    assert m["interp_error_rate"] == pytest.approx(3 / 5)
    assert m["verdicts"] == {"correct": 1, "no_box": 1, "wrong": 2}
    assert aggregate([_rec("a", True)])["interp_error_rate"] is None  # nothing executed: no rate


def _samples_file(path, rows):
    path.write_text("".join(json.dumps({"benchmark": b, "task_id": t, "correct": c}) + "\n" for b, t, c in rows))
    return path


def test_paired_difference_hand_computed(tmp_path):
    """Per problem: the mean over its samples; the difference and its 95 % interval over problems,
    only problems both evaluations have."""
    before = _samples_file(tmp_path / "a.jsonl", [("B", "p1", False), ("B", "p1", True), ("B", "p2", False),
                                             ("B", "p2", False), ("B", "p3", True), ("B", "p3", True),
                                             ("B", "only-before", True)])
    after = _samples_file(tmp_path / "b.jsonl", [("B", "p1", True), ("B", "p1", True), ("B", "p2", True),
                                            ("B", "p2", False), ("B", "p3", True), ("B", "p3", True),
                                            ("C", "p1", False)])  # another benchmark's p1: not the same problem
    d = paired_difference(before, after)
    diffs = [0.5, 0.5, 0.0]  # p1 0.5 -> 1, p2 0 -> 0.5, p3 1 -> 1
    sd = math.sqrt(sum((x - 1 / 3) ** 2 for x in diffs) / 2)
    assert d["problems"] == 3 and d["difference"] == pytest.approx(1 / 3)
    assert d["half_width_95"] == pytest.approx(1.96 * sd / math.sqrt(3))
    assert (d["before"], d["after"]) == (pytest.approx(0.5), pytest.approx(5 / 6))
    same = paired_difference(before, before)
    assert same["difference"] == 0 and same["half_width_95"] == 0
    with pytest.raises(EvalError, match="share no problem"):
        paired_difference(before, _samples_file(tmp_path / "c.jsonl", [("B", "other", True)]))


def test_summarize_subjects_mean_and_markdown():
    math_recs = [
        _rec("p1", True, subject="Algebra"),
        _rec("p1", True, subject="Algebra"),
        _rec("p2", False, subject="Geometry"),
        _rec("p2", True, subject="Geometry"),
    ]
    aime_recs = [_rec("q1", False), _rec("q1", False)]
    s = summarize({"MATH": math_recs, "AIME": aime_recs})
    assert s["benchmarks"]["MATH"]["avg_at_n"] == pytest.approx(0.75)
    assert s["benchmarks"]["MATH"]["subjects"]["Algebra"]["avg_at_n"] == 1.0
    assert s["benchmarks"]["MATH"]["subjects"]["Geometry"]["pass_at_k"]["2"] == 1.0
    assert "subjects" not in s["benchmarks"]["AIME"]
    assert s["mean"]["avg_at_n"] == pytest.approx((0.75 + 0.0) / 2)
    settings = {
        "model": "m",
        "tools": True,
        "max_tool_calls": 3,
        "n": 2,
        "temperature": 1.0,
        "top_p": 0.95,
        "max_response_tokens": 64,
    }
    md = results_markdown({"settings": settings, **s, "elapsed_s": 1.0})
    assert "| MATH | 2 | 2 | 75.0 | 75.0 | 100.0 |" in md
    assert "## MATH by subject" in md and "| Geometry | 1 | 2 | 50.0 |" in md
    assert "at most 3 calls" in md


# ---------------------------------------------------------------------------------- bad input, CLI


def _entrypoint():
    spec = importlib.util.spec_from_file_location("evaluate_entry", ROOT / "entrypoints" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--data", "/nonexistent/bench.jsonl"], "does not exist"),
        (["--data", str(BENCHMARKS), "generator.no_such_field=1"], "unknown key 'generator.no_such_field'"),
        (
            ["--data", str(BENCHMARKS), "--model", "/nonexistent/model"],
            "model '/nonexistent/model' does not exist",
        ),
        (["--data", str(BENCHMARKS), "--model", str(BENCHMARKS)], "no config.json"),
        (["--data", str(BENCHMARKS / "amc23.jsonl"), "data.answer_field=final"], "field 'final'"),
    ],
)
def test_entrypoint_bad_input_is_one_sentence(argv, expected, capsys, tiny_model_dir):
    code = _entrypoint().main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert (
        err.startswith("error: ")
        and expected in err
        and "Traceback" not in err
        and len(err.splitlines()) == 1
    )


def test_entrypoint_rejects_a_broken_tokenizer(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (tmp_path / "tokenizer.json").write_text("{not json")
    code = _entrypoint().main(["--data", str(BENCHMARKS), "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer cannot be loaded" in err


# -------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def eval_cfg():
    return load_config(
        None,
        [
            "generator.max_prompt_tokens=512",
            "generator.max_response_tokens=48",
            "generator.max_inflight_trajectories=16",
            "generator.temperature=1.0",
            "generator.top_p=0.95",
            "scorer.num_workers=1",
        ],
    )


@pytest.fixture(scope="module")
def runner(eval_cfg, tiny_model_dir):
    """Engine and sandbox as local objects (the CLI with no Ray session). The Ray-actor setting
    (use_ray=True: `ray job submit`, the demo) differs only in where the two live: it gets one
    short test of its own below (a second engine start, ~30 s)."""
    r = EvalRunner(eval_cfg, tiny_model_dir, use_ray=False)
    yield r
    r.close()


@pytest.fixture(scope="module")
def benchmarks(eval_cfg, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tasks = benchmark_tasks_for(eval_cfg, tok, BENCHMARKS / "amc23.jsonl", limit=3)
    # A probe whose prompt ends with a closed code block: the rollout runs it before the model goes
    # on, so with tools every sample executes it, whatever the (random) model then writes.
    text = (
        tok.apply_chat_template(
            [{"role": "user", "content": "What is 6 * 7?"}], tokenize=False, add_generation_prompt=True
        )
        + "```python\nprint(6 * 7)\n```"
    )
    ids = tuple(tok.encode(text, add_special_tokens=False))
    tasks["probe"] = [Task("probe-0", "What is 6 * 7?", "42", text, ids, subject="arithmetic")]
    return tasks


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_evaluate_tiny_model_with_tools(runner, benchmarks, tmp_path):
    out = tmp_path / "tools"
    results = runner.run(benchmarks, n=2, tools=True, out_dir=out, max_tool_calls=2)
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "samples.jsonl", "config.yaml"}
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["settings"]["ray"] is runner.use_ray
    amc = results["benchmarks"]["amc23"]
    assert (amc["problems"], amc["samples"], amc["n"]) == (3, 6, 2)
    assert set(amc["pass_at_k"]) == {"1", "2"}
    assert 0 < amc["mean_response_tokens"] <= 48
    samples = _samples(out)
    assert len(samples) == 8
    for s in samples:
        assert (
            s["budget"] == 2
            and s["num_executed"] <= 2
            and s["reason"] in {"correct", "wrong", "no_box", "parse_failure", "timeout"}
        )
        assert s["correct"] == (s["reason"] == "correct")
    probe = [s for s in samples if s["benchmark"] == "probe"]
    assert all(s["num_executed"] >= 1 and s["tool_calls"][0]["ok"] for s in probe)
    assert all("42" in s["tool_calls"][0]["output"] and "42" in s["response"] for s in probe)
    assert results["benchmarks"]["probe"]["mean_executed_calls"] >= 1
    assert results["benchmarks"]["probe"]["interp_error_rate"] is not None
    assert "arithmetic" in results["benchmarks"]["probe"]["subjects"]
    md = (out / "results.md").read_text()
    assert "| amc23 | 3 | 2 |" in md and "| probe | 1 | 2 |" in md and "## probe by subject" in md


def test_evaluate_tiny_model_without_tools(runner, benchmarks, tmp_path):
    out = tmp_path / "text"
    results = runner.run(benchmarks, n=2, tools=False, out_dir=out, max_tool_calls=2)
    assert results["settings"]["tools"] is False and results["settings"]["max_tool_calls"] == 0
    samples = _samples(out)
    assert len(samples) == 8 and all(s["num_executed"] == 0 and s["tool_calls"] == [] for s in samples)
    probe = [s for s in samples if s["benchmark"] == "probe"]
    assert all(s["num_code_blocks"] >= 1 for s in probe)  # written, counted, not run
    assert results["benchmarks"]["probe"]["interp_error_rate"] is None
    assert "tools off" in (out / "results.md").read_text()


def _perturbed_copy(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """The model with noise added to every weight: another checkpoint of the same model."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    save_file({k: (v + 0.2 * torch.randn(v.shape, generator=g).to(v.dtype)).contiguous() for k, v in weights.items()},
              str(out / "model.safetensors"), {"format": "pt"})
    return out


def _hf_logprobs(model_dir: Path, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, by transformers' forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_load_serves_another_checkpoint_without_a_new_engine(runner, benchmarks, tiny_model_dir, tmp_path):
    """`EvalRunner.load`: the engine then computes what transformers computes from the new
    checkpoint's files (it did not before), and the results name it; a model of another shape is
    refused in one sentence with the served weights untouched."""
    from cir_actors.learning.weight_sync import fingerprint
    from cir_actors.scoring.evaluation import EvalError, _read_weights

    other = _perturbed_copy(tiny_model_dir, tmp_path / "other")
    gen = next(o for o in runner._local if hasattr(o, "compute_logprobs"))
    ids = list(benchmarks["probe"][0].prompt_token_ids)

    def engine_logprobs() -> list[float]:
        return [float(x) for x in runner._call(gen.compute_logprobs([ids]))[0][1:]]

    def close(a: list[float], b: list[float]) -> bool:
        return max(abs(x - y) for x, y in zip(a, b, strict=True)) < 2e-3

    want = _hf_logprobs(other, ids)
    assert close(engine_logprobs(), _hf_logprobs(tiny_model_dir, ids)) and not close(engine_logprobs(), want)
    try:
        checksum = runner.load(other)
        assert checksum == fingerprint(_read_weights(other).items())
        assert close(engine_logprobs(), want)
        results = runner.run({"probe": benchmarks["probe"]}, n=2, tools=True, out_dir=tmp_path / "o", max_tool_calls=2)
        assert results["settings"]["model"] == str(other)

        bigger = tmp_path / "bigger"
        bigger.mkdir()
        config = json.loads((tiny_model_dir / "config.json").read_text())
        (bigger / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
        with pytest.raises(EvalError, match="config.json differs in num_hidden_layers"):
            runner.load(bigger)
        assert close(engine_logprobs(), want)
    finally:
        runner.load(tiny_model_dir)  # the module's other tests evaluate the tiny model
    assert close(engine_logprobs(), _hf_logprobs(tiny_model_dir, ids))


def test_entrypoint_evaluates_several_checkpoints_on_one_engine(tiny_model_dir, tmp_path, capsys):
    """`evaluate.py --model A --model B`: B checked against A before anything starts (another shape: exit 2,
    one sentence), then each evaluated into its own directory, named by its step for a run's
    checkpoint, and comparison.md with a row per model."""
    entry = _entrypoint()
    other = _perturbed_copy(tiny_model_dir, tmp_path / "run" / "checkpoints" / "step-000002" / "learner" / "hf")
    wider = tmp_path / "wider"
    wider.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    data = str(BENCHMARKS / "amc23.jsonl")
    assert entry.main(["--data", data, "--model", str(tiny_model_dir), "--model", str(wider)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model") and "hidden_size" in err and len(err.splitlines()) == 1

    out = tmp_path / "eval"
    argv = ["--data", data, "--limit", "2", "--n", "1", "--max-tool-calls", "1", "--out", str(out),
            "--model", str(tiny_model_dir), "--model", str(other),
            "generator.max_prompt_tokens=512", "generator.max_response_tokens=32", "scorer.num_workers=1"]
    assert entry.main(argv) == 0
    first, second = tiny_model_dir.name, "step-000002"
    for label, model in ((first, tiny_model_dir), (second, other)):
        results = json.loads((out / label / "results.json").read_text())
        assert results["settings"]["model"] == str(model) and results["benchmarks"]["amc23"]["samples"] == 2
    table = (out / "comparison.md").read_text()
    assert f"| {first} | " in table and f"| {second} | " in table and "| model | amc23 | mean |" in table
    assert entry.checkpoint_labels(["/a/x", "/b/x", "/c/step-000010/learner/hf"]) == ["x", "x-2", "step-000010"]


def test_evaluate_through_ray_actors(ray_session, eval_cfg, tiny_model_dir, benchmarks, tmp_path):
    """The setting of `ray job submit` and of the demo: the engine and the sandbox as Ray actors
    (anonymous, so a training run's named actors can live beside them), gone after close()."""
    import ray

    with EvalRunner(eval_cfg, tiny_model_dir, use_ray=True) as runner:
        results = runner.run({"probe": benchmarks["probe"]}, n=2, tools=True, out_dir=tmp_path, max_tool_calls=2)
        actors = runner._gen_actors + runner._pool_actors
        assert len(runner._gen_actors) == 1 and len(runner._pool_actors) == 1
        assert ray.get(runner._gen_actors[0].served_version.remote()) == 0
        checksum = runner.load(_perturbed_copy(tiny_model_dir, tmp_path / "other"))  # through the object store
        served = ray.get(runner._gen_actors[0].served_policy.remote())
        assert (served.version, served.checksum) == (1, checksum)
    assert results["settings"]["ray"] is True
    samples = _samples(tmp_path)
    assert len(samples) == 2 and all(s["tool_calls"][0]["ok"] and "42" in s["tool_calls"][0]["output"] for s in samples)
    for actor in actors:  # close() killed them
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=60)
