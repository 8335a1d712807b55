"""Benchmark loading (the five shared CIR files, jsonl and parquet), prompt building, task lists."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_BENCHMARKS
from transformers import AutoTokenizer

from cir_actors.config import load_config
from cir_actors.data.loaders import (
    CIR_INSTRUCTION,
    DataError,
    build_prompt,
    last_boxed,
    load_benchmark,
    load_benchmarks,
    load_tasks,
)

# file -> (rows, field the gold comes from, first three golds), read off the files by hand.
EXPECTED = {
    "MATH_OAI": (500, "answer", ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}"]),
    "AIME24": (30, "solution (last \\boxed{})", ["204", "113", "371"]),
    "AIME25": (30, "solution (last \\boxed{})", ["70", "588", "16"]),
    "amc23": (40, "solution", ["27", "36", "45"]),
    "OlymMATH-EN-EASY": (100, "solution", ["948", "4\\sqrt{15}-14", "3"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_benchmarks_load_with_the_right_gold(name):
    rows, field = load_benchmark(SHARED_BENCHMARKS / f"{name}.jsonl")
    count, expected_field, first_golds = EXPECTED[name]
    assert len(rows) == count and field == expected_field
    assert [r["gold"] for r in rows[:3]] == first_golds
    raw = [json.loads(line) for line in (SHARED_BENCHMARKS / f"{name}.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in rows] == [r["problem"].strip() for r in raw]
    assert all(r["gold"] and "\\boxed" not in r["gold"] for r in rows)
    if name.startswith("AIME"):  # every AIME answer is an integer 0..999
        assert all(r["gold"].isdigit() and int(r["gold"]) < 1000 for r in rows)
    if name == "MATH_OAI":
        assert [r["gold"] for r in rows] == [r["answer"].strip() for r in raw]
        assert {r["subject"] for r in rows} >= {"Algebra", "Precalculus", "Number Theory"}


def test_load_benchmarks_directory():
    all_rows = load_benchmarks(SHARED_BENCHMARKS)
    assert {k: len(v) for k, v in all_rows.items()} == {k: v[0] for k, v in EXPECTED.items()}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{1} then \\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("nested \\boxed{\\left\\{ 1, \\{2\\} \\right\\}} end", "\\left\\{ 1, \\{2\\} \\right\\}"),
        ("\\boxed {7}", "7"),
        ("\\boxed{ok} then \\boxed{unclosed", "ok"),
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_malformed_rows_name_file_line_and_field(tmp_path):
    good = json.dumps({"problem": "1+1?", "answer": "2"})
    cases = {
        "missing.jsonl": (good + "\n" + json.dumps({"problem": "2+2?"}), r"missing\.jsonl: line 2: field 'answer' is missing"),
        "badjson.jsonl": (good + "\n\n{not json", r"badjson\.jsonl: line 3: not valid JSON"),
        "empty.jsonl": (good + "\n" + json.dumps({"problem": " ", "answer": "1"}), r"line 2: field 'problem' is empty"),
        "type.jsonl": (good + "\n" + json.dumps({"problem": "x", "answer": [1]}), r"line 2: field 'answer' should be"),
        "nobox.jsonl": (
            json.dumps({"problem": "a", "solution": "\\boxed{3}"}) + "\n" + json.dumps({"problem": "b", "solution": "3"}),
            r"nobox\.jsonl: line 2: field 'solution' has no \\boxed",
        ),
    }
    for fname, (content, pattern) in cases.items():
        (tmp_path / fname).write_text(content + "\n")
        with pytest.raises(DataError, match=pattern) as info:
            load_benchmark(tmp_path / fname)
        assert "\n" not in str(info.value)  # one sentence
    with pytest.raises(DataError, match="field 'gold' .* is missing"):
        load_benchmark(tmp_path / "missing.jsonl", answer_field="gold")
    with pytest.raises(DataError, match="does not exist"):
        load_benchmark(tmp_path / "nope.jsonl")


def test_parquet_and_explicit_fields(tmp_path):
    table = pa.table({"question": ["What is 6*7?", "Half of 14?"], "final": [42, 7], "id": ["a", "b"]})
    pq.write_table(table, tmp_path / "t.parquet")
    rows, field = load_benchmark(tmp_path / "t.parquet", answer_field="final")
    assert field == "final"
    assert rows == [{"id": "a", "problem": "What is 6*7?", "gold": "42"}, {"id": "b", "problem": "Half of 14?", "gold": "7"}]
    with pytest.raises(DataError, match="no answer field found"):
        load_benchmark(tmp_path / "t.parquet")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_build_prompt_chat_and_raw(tok):
    text, ids = build_prompt("What is 2+3?", tok, use_chat_template=True)
    assert text == f"<|im_start|>user\n{CIR_INSTRUCTION}\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok.apply_chat_template(
        [{"role": "user", "content": f"{CIR_INSTRUCTION}\nWhat is 2+3?"}], tokenize=True, add_generation_prompt=True
    )["input_ids"] and tok.decode(ids) == text
    raw_text, raw_ids = build_prompt("What is 2+3?", tok, use_chat_template=False)
    assert raw_text == f"{CIR_INSTRUCTION}\nWhat is 2+3?" and tok.decode(raw_ids) == raw_text


def test_load_tasks_synthetic_and_file(tok, tmp_path):
    cfg = load_config(None, ["data.num_train=50", "data.num_eval=20"])
    train, held = load_tasks(cfg, tok, "train"), load_tasks(cfg, tok, "eval")
    assert len(train) == 50 and len(held) == 20
    assert train == load_tasks(cfg, tok, "train")  # deterministic, prompts included
    assert not {t.problem for t in train} & {t.problem for t in held}
    assert all(t.prompt_token_ids == tuple(build_prompt(t.problem, tok, True)[1]) for t in train[:5])

    path = SHARED_BENCHMARKS / "amc23.jsonl"
    cfg = load_config(None, ["data.source=file", f"data.train_path={path}", "generator.max_prompt_tokens=1024"])
    tasks = load_tasks(cfg, tok, "train")
    assert len(tasks) == 40 and tasks[0].gold == "27" and load_tasks(cfg, tok, "eval") == []
    short = load_config(None, ["data.source=file", f"data.train_path={path}", "generator.max_prompt_tokens=100"])
    with pytest.raises(DataError, match=r"amc23\.jsonl: problem 0: the prompt is \d+ tokens, over generator"):
        load_tasks(short, tok, "train")
