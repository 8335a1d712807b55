"""Build (or reuse) the tiny model and print its directory.

    python entrypoints/build_model.py [--out DIR] [--config FILE] [model.tiny.KEY=VALUE ...]

--out is the cache directory the model goes under (default: model.cache_dir of the config).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="cache directory to build under")
    parser.add_argument("--config", help="YAML config file (its model.tiny section is used)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.tiny.hidden_size=256")
    args = parser.parse_args(argv)

    from cir_actors.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"build_model: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    from cir_actors.data.tiny_model import build_tiny_model

    # --out is relative to where the user stands; the config's cache_dir to the project root.
    cache_dir = Path(args.out).resolve() if args.out else cfg.model.cache_dir
    print(build_tiny_model(cfg.model.tiny, cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
