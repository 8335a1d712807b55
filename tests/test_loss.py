"""The clipped, off-policy-corrected GRPO loss against hand-computed values, term by term."""

from __future__ import annotations

import math

import pytest
import torch

from cir_actors.loss import policy_loss, token_entropy, token_logprobs

CLIP = {"clip_low": 0.2, "clip_high": 0.28, "is_cap": 5.0}


def one_token(ratio: float, adv: float, w: float = 1.0, **kw):
    """A single masked token with the given ratio, advantage and off-policy weight exp(p - b)."""
    prox = torch.tensor([[-1.0]])
    cur = (prox + math.log(ratio)).requires_grad_(True)
    behav = prox - math.log(w)
    loss, diag = policy_loss(cur, prox, behav, torch.tensor([adv]), torch.ones(1, 1), **{**CLIP, **kw})
    loss.backward()
    return loss.item(), cur.grad.item(), diag


def test_unclipped_token_and_its_gradient():
    loss, grad, diag = one_token(1.1, 2.0)
    assert loss == pytest.approx(-2.2)
    assert grad == pytest.approx(-2.2)  # d(-r A)/dc = -r A
    assert diag["clip_frac_low"] == diag["clip_frac_high"] == 0.0


def test_clip_high_positive_advantage():
    loss, grad, diag = one_token(1.5, 1.0)
    assert loss == pytest.approx(-1.28)  # min(1.5, 1.28) * 1
    assert grad == 0.0
    assert diag["clip_frac_high"] == 1.0 and diag["clip_frac_low"] == 0.0


def test_clip_high_does_not_bind_below_one():
    loss, _, diag = one_token(0.5, 1.0)
    assert loss == pytest.approx(-0.5)  # min(0.5, 0.8): the pessimistic term is the unclipped one
    assert diag["clip_frac_low"] == 0.0


def test_clip_low_negative_advantage():
    loss, grad, diag = one_token(0.5, -1.0)
    assert loss == pytest.approx(0.8)  # min(-0.5, -0.8)
    assert grad == 0.0
    assert diag["clip_frac_low"] == 1.0


def test_dual_clip_floors_negative_advantage():
    no_dual, _, _ = one_token(4.0, -1.0)
    assert no_dual == pytest.approx(4.0)  # min(-4, -1.28)
    loss, grad, diag = one_token(4.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0)
    assert grad == 0.0 and diag["dual_clip_frac"] == 1.0
    # the floor never touches positive advantages
    pos, _, _ = one_token(4.0, 1.0, dual_clip=3.0)
    assert pos == pytest.approx(-1.28)


def test_off_policy_weight_and_cap():
    loss, grad, diag = one_token(1.0, 1.0, w=2.0)
    assert loss == pytest.approx(-2.0) and grad == pytest.approx(-2.0)
    assert diag["is_cap_frac"] == 0.0 and diag["is_weight_max"] == pytest.approx(2.0)
    loss, _, diag = one_token(1.0, 1.0, w=10.0)
    assert loss == pytest.approx(-5.0)  # capped at is_cap
    assert diag["is_cap_frac"] == 1.0
    # k3 estimate of KL(b || p) with p/b = 10: 10 - 1 - ln 10
    assert diag["kl_prox_behav"] == pytest.approx(9.0 - math.log(10.0), rel=1e-5)
    assert diag["logprob_abs_diff"] == pytest.approx(math.log(10.0), rel=1e-5)


def test_mask_and_token_mean():
    prox = torch.zeros(2, 3)
    cur = torch.log(torch.tensor([[1.1, 9.0, 0.9], [1.0, 1.2, 9.0]]))
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, diag = policy_loss(cur, prox, None, adv, mask, **CLIP)
    # masked tokens: (1.1, +1) -> 1.1; (0.9, +1) -> 0.9; (1.2, -1) -> min(-1.2, -1.2) = -1.2; mean over 3
    assert loss.item() == pytest.approx(-(1.1 + 0.9 - 1.2) / 3)
    assert diag["num_tokens"] == 3.0
    # the 9.0 ratios are masked: they must not show up in the diagnostics
    assert diag["ratio_max"] == pytest.approx(1.2)
    # an explicit batch denominator (micro-batching): same sum, other divisor
    loss10, _ = policy_loss(cur, prox, None, adv, mask, **CLIP, num_tokens=10)
    assert loss10.item() == pytest.approx(-(1.1 + 0.9 - 1.2) / 10)


def test_per_token_advantages_accepted():
    prox = torch.zeros(1, 2)
    loss, _ = policy_loss(prox.clone(), prox, None, torch.tensor([[2.0, -1.0]]), torch.ones(1, 2), **CLIP)
    assert loss.item() == pytest.approx(-(2.0 - 1.0) / 2)


def test_micro_batches_with_batch_denominator_sum_to_the_full_batch():
    g = torch.Generator().manual_seed(0)
    cur, prox, beh = (torch.randn(6, 7, generator=g) * 0.3 - 2 for _ in range(3))
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 7, generator=g) > 0.3).int()
    full, _ = policy_loss(cur, prox, beh, adv, mask, **CLIP, dual_clip=3.0)
    n = int(mask.sum())
    parts = [
        policy_loss(cur[s], prox[s], beh[s], adv[s], mask[s], **CLIP, dual_clip=3.0, num_tokens=n)[0]
        for s in (slice(0, 2), slice(2, 6))
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-6)


def test_on_policy_equals_plain_clipped_grpo():
    """behaviour = proximal (or None) is exactly the textbook clipped surrogate, value and gradient."""
    g = torch.Generator().manual_seed(1)
    prox = torch.randn(4, 9, generator=g) - 2
    cur0 = prox + 0.4 * torch.randn(4, 9, generator=g)
    adv = torch.randn(4, generator=g)
    mask = (torch.rand(4, 9, generator=g) > 0.25).float()

    def ours(behav):
        cur = cur0.clone().requires_grad_(True)
        loss, _ = policy_loss(cur, prox, behav, adv, mask, **CLIP)
        loss.backward()
        return loss.item(), cur.grad

    cur = cur0.clone().requires_grad_(True)
    r = torch.exp(cur - prox)
    a = adv[:, None]
    surrogate = torch.min(r * a, torch.clamp(r, 0.8, 1.28) * a)
    plain = -(surrogate * mask).sum() / mask.sum()
    plain.backward()
    for behav in (None, prox.clone()):
        value, grad = ours(behav)
        assert value == pytest.approx(plain.item(), rel=1e-6)
        torch.testing.assert_close(grad, cur.grad)


def test_token_logprobs_alignment():
    """out[:, t] is the log-prob of token t given tokens < t, i.e. from the logits at t - 1."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    out = token_logprobs(logits, ids)
    assert out.shape == (2, 5) and torch.all(out[:, 0] == 0)
    for b in range(2):
        for t in range(1, 5):
            assert out[b, t].item() == pytest.approx(
                torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item(), abs=1e-5
            )
    ent = token_entropy(logits)
    p = torch.softmax(logits[1, 2], -1)
    assert ent[1, 3].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
