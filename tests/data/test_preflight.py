"""Bad input stops a run before anything starts: `train.py` with a malformed row, a missing gold
field, a gold math-verify cannot parse, or a bad model path prints one sentence and exits 2 before
Ray or any engine starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import PROJECT_ROOT

from cir_actors.config import load_config
from cir_actors.data.preflight import InputError, check_inputs


def _rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = [{"problem": "What is 2+3?", "answer": "5"}, {"problem": "What is 1/2 as a fraction?", "answer": "\\frac{1}{2}"}]


def _train(*overrides: str, tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "entrypoints" / "train.py"), f"logging.run_dir={tmp_path / 'run'}",
         "logging.wandb_mode=disabled", *overrides],
        env=env, capture_output=True, text=True, timeout=300, check=False, cwd=PROJECT_ROOT,
    )
    return proc, time.monotonic() - t0


def _assert_one_sentence_before_ray(proc, elapsed, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Ray" not in proc.stdout + proc.stderr  # no "Started a local Ray instance", no Ray log at all
    assert elapsed < 90  # a Ray start plus an engine would take minutes on this machine


@pytest.mark.parametrize(
    ("rows", "needles"),
    [
        ([GOOD[0], '{"problem": "What is 1+1?", "answer": ', GOOD[1]], ["data.jsonl: line 2", "not valid JSON"]),
        ([GOOD[0], {"problem": "What is 1+1?"}], ["data.jsonl: line 2", "'answer'", "missing"]),
        ([*GOOD, {"problem": "Which?", "answer": "}{", "id": "p-bad"}], ["problem p-bad", "math-verify", "'}{'"]),
    ],
    ids=["malformed-row", "missing-gold", "unparsable-gold"],
)
def test_bad_training_data_is_one_sentence_and_exit_2_before_ray(tmp_path, tiny_model_dir, rows, needles):
    data = _rows(tmp_path / "data.jsonl", rows)
    proc, elapsed = _train("data.source=file", f"data.train_path={data}", f"model.path={tiny_model_dir}",
                           tmp_path=tmp_path)
    _assert_one_sentence_before_ray(proc, elapsed, *needles)


def test_bad_held_out_data_is_caught_too(tmp_path, tiny_model_dir):
    train = _rows(tmp_path / "train.jsonl", GOOD)
    held = _rows(tmp_path / "held.jsonl", [GOOD[0], {"problem": "Which?", "answer": "}{", "id": "h-2"}])
    proc, elapsed = _train("data.source=file", f"data.train_path={train}", f"data.eval_path={held}",
                           f"model.path={tiny_model_dir}", tmp_path=tmp_path)
    _assert_one_sentence_before_ray(proc, elapsed, "held.jsonl", "problem h-2")


@pytest.mark.parametrize("which", ["missing", "not-a-model"])
def test_bad_model_path_is_one_sentence_and_exit_2_before_ray(tmp_path, which):
    path = tmp_path / "nowhere"
    if which == "not-a-model":
        path.mkdir()
        (path / "weights.bin").write_bytes(b"")
    proc, elapsed = _train(f"model.path={path}", tmp_path=tmp_path)
    needle = "does not exist" if which == "missing" else "no config.json"
    _assert_one_sentence_before_ray(proc, elapsed, f"model.path '{path}'", needle)


def test_a_model_cache_that_cannot_be_written_is_one_sentence(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match=r"model.cache_dir '.*a-file/models': NotADirectoryError"):
        check_inputs(load_config(None, [f"model.cache_dir={blocker / 'models'}"]))


def test_good_inputs_pass_the_checks(tmp_path, tiny_model_dir):
    data = _rows(tmp_path / "data.jsonl", GOOD)
    cfg = load_config(None, ["data.source=file", f"data.train_path={data}", f"model.path={tiny_model_dir}"])
    checked = check_inputs(cfg)
    assert [t.gold for t in checked.train] == ["5", "\\frac{1}{2}"] and checked.eval == []
    # a tokenizer that cannot load is one sentence too
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="tokenizer cannot be loaded"):
        check_inputs(load_config(None, [f"model.path={tmp_path / 'broken'}"]))


def test_the_demo_refuses_a_warm_start_it_cannot_run_before_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "entrypoints" / "demo.py"), "data.num_train=64"],
                          env=env, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    _assert_one_sentence_before_ray(proc, time.monotonic() - t0, "data.num_train >= 256", "got 64")


@pytest.mark.parametrize("entrypoint", ["demo", "bench"])
def test_demo_and_bench_check_the_model_before_ray(tmp_path, entrypoint):
    path = tmp_path / "nowhere"
    args = ["demo.py", f"model.path={path}"] if entrypoint == "demo" else ["bench.py", "train", "--model", str(path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "entrypoints" / args[0]), *args[1:]], env=env,
                          capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    _assert_one_sentence_before_ray(proc, time.monotonic() - t0, f"model.path '{path}'", "does not exist")
