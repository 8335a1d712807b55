"""Benchmarks: `python entrypoints/bench.py PART [--json] [part options]`, or `all`.

Each PART is a module in cir_actors/bench/ with `run(argv) -> dict`; it prints a table and the
dict is printed as one JSON line (the last line of output) with --json.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_actors.config import ConfigError
from cir_actors.data.loaders import DataError
from cir_actors.data.preflight import InputError

PARTS = ["interpreter", "scorer", "generation", "learner", "train", "recovery", "partials", "recipes"]
ALL = PARTS[:-1]  # `all` (make bench) leaves out `recipes`: nine demo runs, over an hour


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        print("parts:", ", ".join(PARTS), "or all")
        return 0 if argv else 2
    part, rest = argv[0], argv[1:]
    as_json = "--json" in rest
    rest = [a for a in rest if a != "--json"]
    if part != "all" and part not in PARTS:
        print(f"bench: unknown part '{part}'; expected one of {', '.join(PARTS)} or all", file=sys.stderr)
        return 2
    results = {}
    for name in ALL if part == "all" else [part]:
        module = importlib.import_module(f"cir_actors.bench.{name}")
        print(f"== {name}", flush=True)
        try:
            results[name] = module.run(rest)
        except (ConfigError, DataError, InputError) as e:  # bad input: found before anything started
            print(f"error: {e}", file=sys.stderr)
            return 2
    if as_json:
        print(json.dumps(results if part == "all" else results[part], default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
