"""Benchmarks, one module per measured part; `entrypoints/bench.py PART` runs one.

Each module exposes `run(args: list[str]) -> dict` that prints a readable table and returns the
figures; the entry point prints them as one JSON line with `--json`. Figures are ratios measured
side by side in one run, never timed assertions in tests.
"""
