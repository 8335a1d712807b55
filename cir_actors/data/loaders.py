"""Prompts and data loading: the CIR instruction, prompt building, benchmark files, task lists.

Covers: the CIR prompt text; `build_prompt` (instruction + question, through the chat template or
raw); `load_benchmark(s)` for jsonl/parquet files (field inference for the five CIR benchmarks, the
gold answer plain or extracted from the last \\boxed{} of a solution); `load_tasks` turning the
configured source into `Task`s. Does not cover scoring (scoring/scorer.py) or the synthetic problems
themselves (data/tasks.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cir_actors.types import Task

log = logging.getLogger(__name__)

CIR_INSTRUCTION = (
    "Please solve the following problem step by step. During your reasoning process, if needed, you can "
    "choose to write python code to enhance your reasoning. The code executor will run your code and provide "
    "the execution results back to you to support your reasoning process. Please put the final answer "
    "within \\boxed{}."
)

DATA_SUFFIXES = (".jsonl", ".parquet")
PROBLEM_FIELDS = ("problem", "question")  # tried in order when problem_field is None
ANSWER_FIELDS = ("answer", "solution")  # tried in order when answer_field is None
BOXED_NOTE = " (last \\boxed{})"


class DataError(ValueError):
    """A problem with a data file or row, phrased for the user in one sentence."""


# ------------------------------------------------------------------------------------------ prompts


def build_prompt(problem: str, tokenizer: Any, use_chat_template: bool) -> tuple[str, list[int]]:
    """CIR's instruction and the question, as text and token ids.

    Through the chat template (one user turn, generation prompt added) when asked and the tokenizer
    has one; otherwise the raw string, as CIR evaluated Qwen2.5-Math (then the tokenizer's own
    special tokens, e.g. a BOS, are added as for any raw text).
    """
    content = f"{CIR_INSTRUCTION}\n{problem}"  # one newline, as CIR (its reward code splits on it)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return text, list(tokenizer.encode(text, add_special_tokens=False))
    return content, list(tokenizer.encode(content, add_special_tokens=True))


def make_task(
    task_id: str,
    problem: str,
    gold: str,
    tokenizer: Any,
    use_chat_template: bool,
    max_prompt_tokens: int | None = None,
    subject: str | None = None,
    where: str = "",
) -> Task:
    """A Task with its prompt tokenized; a prompt over `max_prompt_tokens` is rejected (DataError)."""
    text, ids = build_prompt(problem, tokenizer, use_chat_template)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise DataError(
            f"{where or task_id}: the prompt is {len(ids)} tokens, over generator.max_prompt_tokens="
            f"{max_prompt_tokens} (raise it or shorten the problem)"
        )
    return Task(task_id, problem, gold, text, tuple(ids), subject)


# ----------------------------------------------------------------------------------- benchmark files


def last_boxed(text: str) -> str | None:
    """The content of the last balanced \\boxed{...} in `text` (None if there is none or it is unclosed)."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs, `where` naming file and line (jsonl) or row (parquet)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        return [(f"{path}: row {i + 1}", row) for i, row in enumerate(rows)]
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}: line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def _pick_field(first: dict[str, Any], given: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if given is not None:
        if given not in first:
            raise DataError(f"{where}: field '{given}' (the {what} field asked for) is missing; fields: {sorted(first)}")
        return given
    for name in candidates:
        if name in first:
            return name
    raise DataError(
        f"{where}: no {what} field found (tried {', '.join(candidates)}; fields: {sorted(first)}); "
        f"name it with data.{what}_field"
    )


def _text_field(row: dict[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: field '{field}' is missing")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field '{field}' should be a string or a number, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: field '{field}' is empty")
    return text


def load_benchmark(
    path: str | Path, problem_field: str | None = None, answer_field: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Rows of a jsonl or parquet file as dicts {id, problem, gold, subject?}, and the gold's field.

    With no field names given, the problem is `problem` (or `question`) and the gold answer is
    `answer` when the file has it (MATH500), else `solution` (AIME, AMC23, OlymMATH). When the
    gold field of the first row holds a \\boxed{}, the gold of every row is its last balanced
    \\boxed{...} (AIME's solutions), and the returned field name says so: "solution (last \\boxed{})".
    A malformed row raises DataError naming the file, the line and the field.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"benchmark file '{p}' does not exist")
    if p.suffix not in DATA_SUFFIXES:
        raise DataError(f"{p}: expected a {' or '.join(DATA_SUFFIXES)} file")
    rows = _read_rows(p)
    if not rows:
        raise DataError(f"{p}: no rows")
    where0, first = rows[0]
    if not isinstance(first, dict):
        raise DataError(f"{where0}: expected a JSON object, got {type(first).__name__}")
    pfield = _pick_field(first, problem_field, PROBLEM_FIELDS, "problem", where0)
    afield = _pick_field(first, answer_field, ANSWER_FIELDS, "answer", where0)
    boxed = last_boxed(str(first.get(afield, ""))) is not None
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        problem = _text_field(row, pfield, where)
        gold = _text_field(row, afield, where)
        if boxed:
            inner = last_boxed(gold)
            if inner is None or not inner.strip():
                raise DataError(f"{where}: field '{afield}' has no \\boxed{{...}} answer (the file's first row has one)")
            gold = inner.strip()
        task_id = row.get("unique_id", row.get("id"))
        item = {"id": str(task_id) if task_id is not None else f"{p.stem}-{len(out)}", "problem": problem, "gold": gold}
        if row.get("subject") is not None:
            item["subject"] = str(row["subject"])
        out.append(item)
    return out, afield + (BOXED_NOTE if boxed else "")


def load_benchmarks(
    path_or_dir: str | Path, problem_field: str | None = None, answer_field: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """{file stem: rows} for one file or every jsonl/parquet file of a directory (sorted by name).

    Which field the gold came from is logged per file (INFO).
    """
    p = Path(path_or_dir)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{p}: no {' or '.join(DATA_SUFFIXES)} files in the directory")
    elif p.exists():
        files = [p]
    else:
        raise DataError(f"benchmark path '{p}' does not exist")
    out = {}
    for f in files:
        rows, field = load_benchmark(f, problem_field, answer_field)
        log.info("%s: %d problems, gold answer from field '%s'", f.name, len(rows), field)
        out[f.stem] = rows
    return out


def benchmark_tasks(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    use_chat_template: bool,
    max_prompt_tokens: int | None = None,
    source: str = "",
) -> list[Task]:
    """Tasks from `load_benchmark` rows (prompts tokenized; over-long prompts rejected)."""
    return [
        make_task(
            r["id"], r["problem"], r["gold"], tokenizer, use_chat_template, max_prompt_tokens,
            r.get("subject"), where=f"{source}: problem {r['id']}" if source else "",
        )
        for r in rows
    ]


# ------------------------------------------------------------------------------------------- tasks


def load_tasks(cfg: Any, tokenizer: Any, split: str) -> list[Task]:
    """The configured tasks of a split ("train" or "eval").

    data.source=synthetic: the synthetic family (data.num_train / data.num_eval problems, data.seed).
    data.source=file: data.train_path for train, data.eval_path for eval (an empty list when no
    eval file is configured). Prompts over generator.max_prompt_tokens are rejected (DataError).
    """
    from cir_actors.data.tasks import generate_problems

    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got '{split}'")
    d, use_chat, max_tokens = cfg.data, cfg.model.use_chat_template, cfg.generator.max_prompt_tokens
    if d.source == "synthetic":
        n = d.num_train if split == "train" else d.num_eval
        return [
            make_task(p.task_id, p.problem, p.gold, tokenizer, use_chat, max_tokens, p.kind)
            for p in generate_problems(n, seed=d.seed, split=split, kinds=d.kinds)
        ]
    path = d.train_path if split == "train" else d.eval_path
    if path is None:
        return []
    rows, field = load_benchmark(path, d.problem_field, d.answer_field)
    log.info("%s: %d %s problems, gold answer from field '%s'", path, len(rows), split, field)
    return benchmark_tasks(rows, tokenizer, use_chat, max_tokens, source=str(path))
