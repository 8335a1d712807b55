"""The clipped, off-policy-corrected GRPO loss against hand-computed values, term by term."""

from __future__ import annotations

import math

import pytest
import torch

from cir_actors.learning.loss import correction_weights, policy_loss, token_entropy, token_logprobs

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


# ---- off-policy corrections (correction_weights), hand-computed ----------------------------------

def _rhos(rows):
    """log_rho and mask from rows of ratios; None marks an unsampled (masked-out) position."""
    log_rho = torch.tensor([[math.log(r) if r is not None else 5.0 for r in row] for row in rows])
    mask = torch.tensor([[r is not None for r in row] for row in rows])
    return log_rho, mask


def test_tis_truncates_at_the_cap():
    log_rho, mask = _rhos([[0.5, 2.0, 8.0, None]])
    w, trunc, masked = correction_weights(log_rho, mask, "tis", is_cap=5.0)
    assert w[0, :3].tolist() == pytest.approx([0.5, 2.0, 5.0])
    assert trunc.tolist() == [[False, False, True, False]]  # the unsampled position is never counted
    assert not masked.any()


def test_mis_masks_above_the_cap_and_keeps_rho_below():
    log_rho, mask = _rhos([[0.5, 2.0, 8.0, None]])
    w, trunc, masked = correction_weights(log_rho, mask, "mis", is_cap=5.0)
    assert w[0, :3].tolist() == pytest.approx([0.5, 2.0, 0.0])
    assert masked.tolist() == [[False, False, True, False]] and not trunc.any()


def test_icepop_masks_outside_the_band_on_both_sides():
    log_rho, mask = _rhos([[0.4, 0.5, 1.3, 5.0, 6.0]])
    w, _, masked = correction_weights(log_rho, mask, "icepop", band=(0.5, 5.0))
    assert w[0].tolist() == pytest.approx([0.0, 0.5, 1.3, 5.0, 0.0])  # the band's ends are inside
    assert masked.tolist() == [[True, False, False, False, True]]


def test_seq_tis_is_the_truncated_product_per_sequence():
    # row 0: 2 * 1.5 * 0.5 = 1.5 (kept); row 1: 3 * 3 = 9 -> capped at 5 (the masked 5.0 not counted)
    log_rho, mask = _rhos([[2.0, 1.5, 0.5], [3.0, 3.0, None]])
    w, trunc, masked = correction_weights(log_rho, mask, "seq_tis", is_cap=5.0)
    assert w[0].tolist() == pytest.approx([1.5] * 3)
    assert w[1, :2].tolist() == pytest.approx([5.0, 5.0])
    assert trunc.tolist() == [[False] * 3, [True, True, False]] and not masked.any()
    # a very long sequence does not overflow
    w, _, _ = correction_weights(torch.full((1, 4000), 1.0), torch.ones(1, 4000, dtype=torch.bool), "seq_tis")
    assert w[0, 0].item() == pytest.approx(5.0)


def test_geo_mask_rejects_whole_sequences_by_geometric_mean():
    # row 0: geometric mean of (1.0005, 0.9995) ~ 1.0 -> kept; row 1: 1.01 each -> 1.01 > 1.001: masked;
    # row 2: (1.3, 0.8) -> sqrt(1.04) = 1.0198: masked although its product (1.04) is moderate
    log_rho, mask = _rhos([[1.0005, 0.9995], [1.01, 1.01], [1.3, 0.8]])
    w, trunc, masked = correction_weights(log_rho, mask, "geo_mask", geo_band=(0.999, 1.001))
    assert w.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert masked.tolist() == [[False, False], [True, True], [True, True]] and not trunc.any()


def test_unknown_correction_is_one_sentence():
    with pytest.raises(ValueError, match="correction must be one of"):
        correction_weights(torch.zeros(1, 1), torch.ones(1, 1), "vtrace")


def test_masked_tokens_get_no_gradient_but_count_in_the_denominator():
    """IcePop through policy_loss: a token outside the band contributes 0 and has zero gradient;
    the token mean still divides by all sampled tokens (Ring-1T's normalisation)."""
    prox = torch.zeros(1, 3)
    cur = torch.zeros(1, 3, requires_grad=True)  # ratio 1 against the proximal
    behav = -torch.log(torch.tensor([[1.0, 10.0, 2.0]]))  # rho = prox / behav = 1, 10, 2
    loss, diag = policy_loss(cur, prox, behav, torch.tensor([1.0]), torch.ones(1, 3), **CLIP,
                             correction="icepop", is_band=(0.5, 5.0))
    loss.backward()
    assert loss.item() == pytest.approx(-(1.0 + 0.0 + 2.0) / 3)
    assert cur.grad[0].tolist() == pytest.approx([-1 / 3, 0.0, -2 / 3])
    assert diag["is_masked_frac"] == pytest.approx(1 / 3) and diag["is_cap_frac"] == 0.0
    # ESS from the exported moments: mean(w)^2 / mean(w^2) = 1 / (5/3) = 0.6
    assert diag["is_weight_mean"] ** 2 / diag["is_weight_sq_mean"] == pytest.approx(0.6)


def test_default_correction_is_token_tis():
    g = torch.Generator().manual_seed(3)
    cur, prox, beh = (torch.randn(3, 5, generator=g) * 0.5 - 2 for _ in range(3))
    adv, mask = torch.randn(3, generator=g), torch.ones(3, 5)
    a, _ = policy_loss(cur, prox, beh, adv, mask, **CLIP)
    b, _ = policy_loss(cur, prox, beh, adv, mask, **CLIP, correction="tis")
    w = torch.exp(prox - beh).clamp(max=5.0)
    r = torch.exp(cur - prox)
    ref = -(w * torch.min(r * adv[:, None], r.clamp(0.8, 1.28) * adv[:, None])).mean()
    assert a.item() == b.item() == pytest.approx(ref.item(), rel=1e-6)
