"""The GPU path (marked `gpu`; skipped without CUDA): a bf16 DeepSpeed step on nccl with gradient
checkpointing and chunked log-probs, and an nccl weight broadcast into a CUDA vLLM engine whose
fingerprint check must pass. Run where a GPU exists: `python -m pytest -m gpu tests/learning/test_gpu.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GPU_OVERRIDES = [
    "model.device=cuda", "model.dtype=bfloat16", "learner.backend=nccl", "learner.bf16=true",
    "learner.num_gpus=1", "learner.gradient_checkpointing=true", "learner.logprob_chunk_tokens=64",
    "learner.prompts_per_step=2", "learner.mini_batch_prompts=2", "generator.num_gpus=1",
    "generator.gpu_memory_utilization=0.3", "generator.max_response_tokens=64",
    "generator.max_inflight_trajectories=8", "learner.publish=broadcast",
]


def _groups(model_dir):
    from transformers import AutoModelForCausalLM

    from cir_actors.learning.loss import token_logprobs
    from cir_actors.types import FinishReason, ScoredTrajectory, Trajectory, Verdict, VerdictReason

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    groups = []
    for g in range(2):
        group = []
        for i, r in enumerate((1.0, -1.0)):
            ids = rng.integers(3, 400, 40).astype(np.int32)
            mask = np.zeros(40, np.int8)
            mask[6:] = 1
            with torch.no_grad():
                lp = token_logprobs(model(torch.from_numpy(ids.astype(np.int64))[None]).logits, torch.from_numpy(
                    ids.astype(np.int64))[None])[0].numpy() * mask
            traj = Trajectory(f"t{g}", i, ids, mask, lp.astype(np.float32), np.zeros(40, np.int32), 6,
                              FinishReason.STOP, 2)
            group.append(ScoredTrajectory(traj, Verdict(r > 0, None, VerdictReason.CORRECT if r > 0 else
                                                         VerdictReason.WRONG), r))
        groups.append(group)
    return groups


@pytest.fixture(scope="module")
def gpu_cfg():
    from cir_actors.config import load_config

    return load_config(None, GPU_OVERRIDES)


def test_bf16_training_step_on_cuda(ray_session, tiny_model_dir, gpu_cfg):
    from cir_actors.learning.learner import Learner

    learner = Learner(gpu_cfg, tiny_model_dir, name="test-gpu-learner")
    try:
        out = learner.train_step(_groups(tiny_model_dir))
    finally:
        learner.shutdown()
    assert np.isfinite(out["loss"]) and out["grad_norm"] > 0 and out["updates"] == 1


def test_nccl_broadcast_into_cuda_vllm_with_fingerprint(ray_session, tiny_model_dir, gpu_cfg):
    from cir_actors.generation.generator import LocalGenerator
    from cir_actors.learning.learner import Learner
    from cir_actors.sandbox.pool import InterpreterPool

    learner = Learner(gpu_cfg, tiny_model_dir, name="test-gpu-learner-bc")
    pool = InterpreterPool(gpu_cfg.interpreter)
    local = LocalGenerator(gpu_cfg, str(tiny_model_dir), pool)
    try:
        learner.train_step(_groups(tiny_model_dir))
        update = learner.publish(via="broadcast")
        served = local.run(local.gen.update_weights(update), timeout=300)
        learner.wait_published()
        assert served.checksum == update.checksum and served.version == update.version
    finally:
        local.close()
        pool.close()
        learner.shutdown()
