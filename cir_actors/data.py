"""Prompts and data loading: the CIR instruction, prompt building, benchmark files, task lists.

Covers: the CIR prompt text; `build_prompt` (instruction + question, through the chat template or
raw); `load_benchmark(s)` for jsonl/parquet files (field inference for the five CIR benchmarks, the
gold answer plain or extracted from the last \\boxed{} of a solution); `load_tasks` turning the
configured source into `Task`s. Does not cover scoring (scorer.py) or the synthetic problems
themselves (tasks.py).
"""

from __future__ import annotations

CIR_INSTRUCTION = (
    "Please solve the following problem step by step. During your reasoning process, if needed, you can "
    "choose to write python code to enhance your reasoning. The code executor will run your code and provide "
    "the execution results back to you to support your reasoning process. Please put the final answer "
    "within \\boxed{}."
)
