"""Sequence packing (`learner.packing`) gives the padded path's log-probs, loss and gradients on the
tiny model (fp32, within 1e-5): through the learner's own collation (`_collate` / `_collate_packed`)
and loss (`policy_loss`, every correction, the sequence-level ones by segment), with the chunked
and the full-logits forward, and with gradient checkpointing. Attention must not cross from one
packed trajectory into the next: a sample's log-probs do not depend on its neighbours."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cir_actors.learning.learner_rank import (
    _as_trajectory,
    _collate,
    _collate_packed,
    _per_sample,
    _Sample,
    plan_micro_batches,
)
from cir_actors.learning.loss import forward_logprobs, policy_loss

LENGTHS = [37, 20, 29, 5]
ADVANTAGES = [1.0, -0.5, 0.7, -1.2]


@pytest.fixture()
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    m.train()  # dropout is 0 in the tiny model: train mode is deterministic
    return m


def _samples(seed: int = 0, lengths: list[int] = LENGTHS) -> list[_Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for n, adv in zip(lengths, ADVANTAGES):
        t = _as_trajectory(rng.integers(3, 500, n))
        mask = np.zeros(n, np.int8)
        mask[min(3, n - 1):] = 1  # a 3-token "prompt", the rest sampled
        behav = np.where(mask > 0, rng.normal(-3.0, 0.5, n), 0.0).astype(np.float32)
        t = dataclasses.replace(t, loss_mask_T=mask, logprobs_T=behav, prompt_len=3)
        s = _Sample(t, adv, 0)
        s.proximal_T = torch.from_numpy(np.where(mask > 0, behav + rng.normal(0, 0.05, n), 0.0).astype(np.float32))
        out.append(s)
    return out


def _step(model, samples, *, packed, chunk=0, correction="tis", temperature=0.7):
    """The learner's loss_fn on one micro-batch: (loss, per-sample log-probs, gradients)."""
    batch = (_collate_packed if packed else _collate)(samples, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    lp, _, _ = forward_logprobs(model, batch["input_ids"], batch["attention_mask"], temperature=temperature,
                                chunk_tokens=chunk, position_ids_B_T=batch.get("position_ids"))
    n_tokens = float(batch["mask"].sum())
    loss, _ = policy_loss(lp, batch["prox"], batch["behav"], batch["adv"], batch["mask"], clip_low=0.2,
                          clip_high=0.28, is_cap=2.0, num_tokens=n_tokens, correction=correction,
                          is_band=(0.9, 1.1), geo_band=(0.98, 1.02), segments=batch.get("segments"))
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), _per_sample(batch, lp, samples), grads


def _assert_same(a, b, tol=1e-5):
    loss_a, lp_a, g_a = a
    loss_b, lp_b, g_b = b
    assert abs(loss_a - loss_b) < tol, (loss_a, loss_b)
    for x, y in zip(lp_a, lp_b):
        assert x.shape == y.shape
        assert float((x - y).abs().max()) < tol
    assert g_a.keys() == g_b.keys()
    assert max(float((g_a[k] - g_b[k]).abs().max()) for k in g_a) < tol


@pytest.mark.parametrize("chunk", [0, 16])
@pytest.mark.parametrize("correction", ["tis", "icepop", "seq_tis", "geo_mask"])
def test_packed_same_loss_logprobs_and_grads_as_padded(model, chunk, correction):
    padded = _step(model, _samples(), packed=False, chunk=chunk, correction=correction)
    packed = _step(model, _samples(), packed=True, chunk=chunk, correction=correction)
    assert padded[0] != 0.0
    _assert_same(padded, packed)


def test_packed_attention_stays_inside_each_trajectory(model):
    """The same trajectory packed behind different neighbours gets the same log-probs; were the
    block-causal mask lost (e.g. a KV cache built, or an attention mask passed with packed rows),
    the second sample would attend to the first."""
    a = _samples(seed=0)
    b = _samples(seed=1)
    with torch.no_grad():
        _, lp_ab, _ = _step(model, [a[0], a[1]], packed=True)
        _, lp_cb, _ = _step(model, [b[2], a[1]], packed=True)
        _, lp_alone, _ = _step(model, [a[1]], packed=False)
    assert float((lp_ab[1] - lp_alone[0]).abs().max()) < 1e-5
    assert float((lp_cb[1] - lp_alone[0]).abs().max()) < 1e-5


def test_packed_with_gradient_checkpointing_same_as_padded_without(model):
    padded = _step(model, _samples(), packed=False, chunk=16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    packed = _step(model, _samples(), packed=True, chunk=16)
    _assert_same(padded, packed)


def test_packed_first_token_of_each_sample_is_never_trained():
    batch = _collate_packed(_samples(), torch.device("cpu"))
    starts = np.cumsum([0] + LENGTHS[:-1])
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert batch["mask"][0, starts].eq(0).all()
    assert batch["position_ids"][0, starts].eq(0).all()
    assert batch["segments"][0].tolist() == [i for i, n in enumerate(LENGTHS) for _ in range(n)]
    assert batch["adv"][0, starts].tolist() == pytest.approx(ADVANTAGES)
    assert batch["mask"].sum() == sum(n - 3 for n in LENGTHS)


def test_plan_packed_fills_to_the_token_budget_without_padding():
    lengths = [60, 10, 30, 25, 64, 5, 40]
    plan = plan_micro_batches(lengths, 64, packed=True)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in mb) <= 64 for mb in plan)
    # first fit, longest first: [64], [60], [40, 10, 5]... fewer micro-batches than padded rows allow
    assert len(plan) < len(plan_micro_batches(lengths, 64))
    assert plan_micro_batches([100, 3], 64, packed=True) == [[0], [1]]  # too long: alone
