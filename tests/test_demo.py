"""`make demo`'s script end to end, shrunk to seconds of each stage: the tiny model, a few SFT
updates, both evaluations on the one in-process engine (the second after `EvalRunner.load`), two
real RL steps (Ray, vLLM, sandbox, scorer, DeepSpeed), and the report with the gain's interval.
What it measures is `make demo`'s business; this checks that the stages still fit together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_runs_end_to_end_and_reports_the_gain_with_its_interval(tmp_path):
    run_dir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as `make demo`
    proc = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "demo.py"), "--sft-steps", "3", "--warm-target", "1.0",
         "--eval-n", "2", f"logging.run_dir={run_dir}", "data.num_eval=6", "scheduler.total_steps=2",
         "scheduler.budget_schedule=[[0,1]]", "learner.prompts_per_step=2", "learner.mini_batch_prompts=2",
         "generator.samples_per_prompt=2", "data.num_train=300"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (run_dir / "demo_results.md").read_text()
    assert "6 held-out problems x 2 samples with tools, x 1 without" in report, report
    assert "RL gain with tools: " in report and "(95 % interval +-" in report and "over the 6 problems" in report
    results = json.loads((run_dir / "demo_results.json").read_text())
    assert results["rl_steps"] == 2 and results["sft"]["steps"] == 3
    gain = results["gain"]
    assert gain["problems"] == 6
    assert gain["difference"] == pytest.approx(results["after"]["tools"] - results["before"]["tools"])
    # each evaluation wrote every sample: 6 problems x 2 with tools, x 1 without
    for tag in ("warm_start", "after_rl"):
        assert len((run_dir / f"eval_{tag}_tools" / "samples.jsonl").read_text().splitlines()) == 12
        assert len((run_dir / f"eval_{tag}_no_tools" / "samples.jsonl").read_text().splitlines()) == 6
    assert (run_dir / "rl" / "metrics.jsonl").is_file()
