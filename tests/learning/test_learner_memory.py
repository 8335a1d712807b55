"""The learner's memory options give the same loss and gradients as the plain path (tiny model, fp32):
chunked/checkpointed log-probs vs the full logits, gradient checkpointing on vs off, the sampled
entropy diagnostic vs the full one; and the model is loaded in the training dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cir_actors.learning.loss import forward_logprobs, token_entropy, token_logprobs


@pytest.fixture()
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    m.train()  # dropout is 0 in the tiny model: train mode is deterministic
    return m


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = [37, 20, 29]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(len(lengths), T)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.from_numpy(rng.integers(3, 500, n))
        attn[b, :n] = 1
        mask[b, 5:n] = 1
    adv = torch.tensor([1.0, -0.5, 0.7])
    return ids, attn, mask, adv


def _loss_and_grads(model, *, chunk, entropy="none", temperature=0.7, coef=0.01):
    ids, attn, mask, adv = _batch()
    model.zero_grad(set_to_none=True)
    lp, ent, _ = forward_logprobs(model, ids, attn, temperature=temperature, chunk_tokens=chunk,
                                  entropy=entropy, loss_mask_B_T=mask)
    loss = -(lp * adv[:, None] * mask).sum() / mask.sum()
    if entropy == "full":
        loss = loss - coef * (ent * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), lp.detach(), grads


def _max_grad_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("chunk", [7, 16, 4096])
def test_chunked_logprobs_same_loss_and_grads(model, chunk):
    ref_loss, ref_lp, ref_g = _loss_and_grads(model, chunk=0)
    loss, lp, g = _loss_and_grads(model, chunk=chunk)
    ids, attn, _, _ = _batch()
    with torch.no_grad():  # the reference path is the plain formula on the model's logits
        plain = token_logprobs(model(input_ids=ids, attention_mask=attn).logits / 0.7, ids)
    assert float((ref_lp - plain).abs().max()) < 1e-5
    assert abs(loss - ref_loss) < 1e-5 and float((lp - ref_lp).abs().max()) < 1e-5
    assert _max_grad_diff(g, ref_g) < 1e-5


def test_chunked_entropy_bonus_same_grads(model):
    ref_loss, _, ref_g = _loss_and_grads(model, chunk=0, entropy="full")
    loss, _, g = _loss_and_grads(model, chunk=8, entropy="full")
    assert abs(loss - ref_loss) < 1e-5 and _max_grad_diff(g, ref_g) < 1e-5


def test_gradient_checkpointing_same_loss_and_grads(model):
    ref_loss, _, ref_g = _loss_and_grads(model, chunk=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    loss, _, g = _loss_and_grads(model, chunk=0)
    loss2, _, g2 = _loss_and_grads(model, chunk=16)
    assert abs(loss - ref_loss) < 1e-5 and _max_grad_diff(g, ref_g) < 1e-5
    assert abs(loss2 - ref_loss) < 1e-5 and _max_grad_diff(g2, ref_g) < 1e-5


@pytest.mark.parametrize("chunk", [0, 8])
def test_sampled_entropy_is_the_full_entropy_at_the_sampled_tokens(model, chunk):
    ids, attn, mask, _ = _batch()
    with torch.no_grad():
        full = token_entropy(model(input_ids=ids, attention_mask=attn).logits / 0.7)
        _, ent, valid = forward_logprobs(model, ids, attn, temperature=0.7, chunk_tokens=chunk, entropy="sample",
                                         loss_mask_B_T=mask, entropy_sample_tokens=10)
    assert int(valid.sum()) == 10 and bool((mask[valid] > 0).all())
    assert float((ent[valid] - full[valid]).abs().max()) < 1e-5
    _, none, _ = forward_logprobs(model, ids, attn, chunk_tokens=chunk, entropy="none", loss_mask_B_T=mask)
    assert none is None


def test_learner_loads_in_the_training_dtype(ray_session, tiny_model_dir):
    """bf16 training: the rank's module holds bf16 weights (no fp32 copy of the model besides the
    optimizer's master weights); with gradient checkpointing on, a step runs and reports a loss."""
    import ray

    from cir_actors.config import load_config
    from cir_actors.learning.learner_rank import LearnerRank

    cfg = load_config(None, ["learner.bf16=true", "learner.gradient_checkpointing=true", "model.dtype=bfloat16"])
    rank = ray.remote(LearnerRank).options(num_cpus=0.5).remote(cfg, str(tiny_model_dir), 0, 1)
    try:
        addr, port = ray.get(rank.address.remote(), timeout=60)
        ray.get(rank.setup.remote(addr, port), timeout=300)
        specs = ray.get(rank.weight_specs.remote(), timeout=60)
        dtypes = ray.get(rank.__ray_call__.remote(
            lambda self: sorted({str(p.dtype) for p in self.engine.module.parameters()})), timeout=60)
        ckpt = ray.get(rank.__ray_call__.remote(lambda self: self.engine.module.is_gradient_checkpointing),
                       timeout=60)
        sft = ray.get(rank.sft_step.remote([_traj(n) for n in (20, 31)]), timeout=300)
    finally:
        ray.kill(rank)
    assert dtypes == ["torch.bfloat16"] and ckpt and specs
    assert np.isfinite(sft["loss"]) and sft["loss"] > 0


def _traj(n):
    from cir_actors.types import FinishReason, Trajectory

    ids = np.arange(3, 3 + n, dtype=np.int32)
    mask = np.ones(n, np.int8)
    mask[:4] = 0
    return Trajectory("t", 0, ids, mask, np.zeros(n, np.float32), np.zeros(n, np.int32), 4, FinishReason.STOP, 0)
