"""The memory planner on the paper recipe and the shipped Qwen2.5-Math-7B-shaped config.json (meta
device, no weights): loads, plans, fits on ray_cluster.yaml; without checkpointing it does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cir_actors.config import load_config
from cir_actors.ops import plan

ROOT = Path(__file__).resolve().parents[2]
QWEN7B = ROOT / "tests" / "data" / "qwen2.5-math-7b"
RECIPE = ROOT / "configs" / "qwen2.5-math-7b.yaml"


@pytest.fixture(scope="module")
def cluster():
    return plan.load_cluster(ROOT / "ray_cluster.yaml")


def test_7b_shape_on_the_meta_device():
    shape = plan.model_shape(QWEN7B)
    assert 7.5e9 < shape.params < 7.7e9  # Qwen2.5-7B: 7.62 B
    assert (shape.layers, shape.hidden, shape.kv_heads, shape.head_dim) == (28, 3584, 4, 128)


def test_recipe_fits_on_the_cluster(cluster):
    result = plan.plan(load_config(RECIPE), QWEN7B, cluster)
    learner, generator = result["roles"]
    assert result["gpus"]["learner"][1] == "A100-80G" and result["gpus"]["generator"][1] == "L40S-48G"
    assert learner.fits and generator.fits, plan.render(result)
    assert 30 < learner.total_gb < 80
    assert result["time"]["learner_s"] > 0 and result["time"]["generation_s"] > 0


def test_without_checkpointing_the_learner_does_not_fit(cluster):
    cfg = load_config(RECIPE, ["learner.gradient_checkpointing=false"])
    text = plan.render(plan.plan(cfg, QWEN7B, cluster))
    assert "does not fit: learner rank" in text and "largest term: activations" in text


def test_entrypoint(cluster):
    r = subprocess.run([sys.executable, "entrypoints/plan.py", "--config", str(RECIPE), "--cluster",
                        "ray_cluster.yaml", "--model-dir", str(QWEN7B)], cwd=ROOT, check=False, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "learner rank on learner.gpu (A100-80G)" in r.stdout and r.stdout.rstrip().endswith("fits")
    bad = subprocess.run([sys.executable, "entrypoints/plan.py", "--config", str(RECIPE), "--model-dir",
                          str(ROOT / "no-such-dir")], cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
