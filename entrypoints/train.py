"""Train: `python entrypoints/train.py --config configs/tiny_cpu.yaml [section.key=value ...] [--dry-run]`.

Runs locally (starts Ray) or under `ray job submit --working-dir . -- python entrypoints/train.py ...`
(joins the running cluster when cluster.address is set or RAY_ADDRESS is in the environment).
Re-running with the same logging.run_dir resumes from its latest checkpoint. The driver runs as a
child of this process, which starts it again (it resumes) when it is killed, e.g. by the OOM killer
(`recovery.max_driver_restarts`, cir_actors/ops/driver.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir_actors.config import ConfigError, dump_config, load_config
from cir_actors.data.loaders import DataError
from cir_actors.data.preflight import InputError, check_inputs
from cir_actors.types import ProbeFailed


def dry_run_checks(cfg) -> str:
    """The load-time refusals that need no Ray and no download (ConfigError when one fails)."""
    from cir_actors.data.model_setup import check_training, check_window, is_local_model_dir

    check_training(cfg)
    g = cfg.generator
    need = g.max_prompt_tokens + g.max_response_tokens
    if cfg.model.path is None:
        return f"dry run: sampling settings trainable; the tiny model is built with room for {need} tokens"
    if not is_local_model_dir(cfg.model.path):
        return (f"dry run: sampling settings trainable; model.path '{cfg.model.path}' is not a local directory, "
                "so its context window is checked when the run resolves it")
    window = check_window(cfg, cfg.model.path)
    return f"dry run: sampling settings trainable; prompt + response {need} tokens fit the context window of {window}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the tiny CPU defaults)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the resolved config, check sampling and (for a local model) the "
                             "context window, exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-6")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(dump_config(cfg), end="")
            print(dry_run_checks(cfg), file=sys.stderr)
            return 0
        check_inputs(cfg)  # model, every data row, every gold answer: before Ray or any engine starts
    except (ConfigError, DataError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from cir_actors.ops import driver

    if cfg.recovery.max_driver_restarts and not driver.is_child():  # the run outlives its driver's death
        return driver.supervise([str(Path(__file__).resolve()), *argv], cfg.recovery.max_driver_restarts)
    from cir_actors.control.trainer import train

    try:
        train(cfg)
    except ProbeFailed as e:  # a broken sandbox or scorer, found at set-up
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
