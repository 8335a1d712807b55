"""`ray job submit --working-dir . -- python entrypoints/train.py ...` against a running head.

The head is this test's own (LocalHead: loopback, free ports, its own temp dir, RAY_AUTH_MODE=disabled,
the venv's bin first on PATH so that the job's `python` is the project's). The upload must stay
small: Ray honours .gitignore, so .venv, .cache and runs/ never leave the machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from cir_actors.ops.local_head import LocalHead

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MAX_UPLOAD_MIB = 5.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    with LocalHead(num_cpus=2, dashboard=True) as h:
        yield h
    assert h.pids() == [], "the head left processes behind"


def test_working_dir_package_excludes_ignored_dirs(tmp_path):
    """What `--working-dir .` uploads, built by the code path `ray job submit` takes."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    seen = {}

    def capture(working_dir, excludes, is_file=False):
        seen.update(working_dir=working_dir, excludes=excludes)

    probe = PROJECT_ROOT / "runs" / f"upload-probe-{uuid.uuid4().hex}.bin"
    probe.parent.mkdir(exist_ok=True)
    probe.write_bytes(b"\0" * 1024)  # runs/ is where checkpoints go: it must never be uploaded
    try:
        pkg = tmp_path / "pkg.zip"
        # The job SDK: .gitignore respected, Ray's default excludes (.git, .venv, __pycache__) added.
        upload_working_dir_if_needed({"working_dir": str(PROJECT_ROOT)}, include_gitignore=True, upload_fn=capture)
        create_package(seen["working_dir"], pkg, include_gitignore=True, excludes=seen["excludes"])
    finally:
        probe.unlink()
    names = zipfile.ZipFile(pkg).namelist()
    assert "entrypoints/train.py" in names and "cir_actors/ops/cluster.py" in names
    assert (PROJECT_ROOT / ".venv").is_dir()  # present locally, absent from the package
    for ignored in (".venv/", ".cache/", "runs/", ".git/"):
        assert not any(n.startswith(ignored) for n in names), ignored
    assert not any("__pycache__" in n for n in names)
    size_mib = pkg.stat().st_size / 2**20
    assert size_mib < MAX_UPLOAD_MIB
    print(f"working-dir package: {len(names)} files, {size_mib:.2f} MiB")


def test_job_submit_runs_train_dry_run_with_the_venv_python(head):
    entry = (
        "python -c 'import sys; print(\"JOB_PYTHON\", sys.executable)' && "
        "python entrypoints/train.py --config configs/tiny_cpu.yaml --dry-run"
    )
    out = subprocess.run(
        ["ray", "job", "submit", "--address", head.dashboard_url, "--working-dir", ".", "--", "sh", "-c", entry],
        check=False, cwd=PROJECT_ROOT, env=head.env(), capture_output=True, text=True, timeout=240,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert re.search(r"Job '\S+' succeeded", log), log[-4000:]
    # The resolved config printed by --dry-run came back through the job's logs.
    assert "model:" in log and "learner:" in log and "backend: gloo" in log
    job_python = re.search(r"JOB_PYTHON (\S+)", log)[1]
    assert Path(job_python).parent == Path(sys.executable).parent, job_python
    # The working dir went up as a package (its content and size: the test above).
    assert re.search(r"Uploading package gcs://_ray_pkg_\w+\.zip", log), log[-4000:]


def test_a_failing_job_is_reported_as_failed(head):
    out = subprocess.run(
        ["ray", "job", "submit", "--address", head.dashboard_url, "--working-dir", ".", "--",
         "python", "entrypoints/train.py", "--config", "configs/does-not-exist.yaml", "--dry-run"],
        check=False, cwd=PROJECT_ROOT, env=head.env(), capture_output=True, text=True, timeout=240,
    )
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert re.search(r"Job '\S+' failed", log), log[-4000:]
    assert "does not exist" in log  # the entrypoint's one-sentence error reaches the user


def test_job_submit_runs_a_real_training_job(head, tmp_path):
    """The main job itself, submitted: one real RL step (vLLM, sandbox, scorer, DeepSpeed) on the
    head's 2 CPUs; the run directory lives outside the uploaded working dir."""
    run_dir = tmp_path / "job-run"
    out = subprocess.run(
        ["ray", "job", "submit", "--address", head.dashboard_url, "--working-dir", ".", "--",
         "python", "entrypoints/train.py", "--config", "configs/tiny_cpu.yaml",
         f"logging.run_dir={run_dir}", "logging.wandb_mode=disabled", f"model.cache_dir={PROJECT_ROOT / '.cache' / 'models'}",
         "scheduler.total_steps=1", "learner.prompts_per_step=2", "learner.mini_batch_prompts=2",
         "generator.samples_per_prompt=2", "generator.max_response_tokens=32", "data.num_train=16",
         "generator.num_cpus=0.5", "learner.num_cpus=0.5"],
        check=False, cwd=PROJECT_ROOT, env=head.env(), capture_output=True, text=True, timeout=480,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert re.search(r"Job '\S+' succeeded", log), log[-4000:]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"step": 1' in rows[0]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000001"
