"""The off-policy-tolerant clipped GRPO loss (decoupled PPO, as AReaL), and token log-prob helpers.

Per sampled token t: current log-prob c (with grad), proximal log-prob p (the learner's weights at
the start of this step, no grad), behaviour log-prob b (what the generator sampled with).
- ratio r = exp(c - p), clipped to [1 - clip_low, 1 + clip_high] (clip-higher);
- off-policy weight w = min(exp(p - b), is_cap), detached (b = None: w = 1, on-policy);
- objective w * min(r A, clip(r) A); with dual_clip=k a negative-advantage token's objective is
  floored at k A (the clipped objective is otherwise unbounded below as r grows);
- loss = -(sum of objectives over masked tokens) / (masked tokens in the batch): the token mean.
With b = p this is exactly clipped GRPO/PPO. What this module does not do: KL and entropy terms
(the learner adds them when configured) and advantages (`advantages.py`).
"""

from __future__ import annotations

import torch


def token_logprobs(logits_B_T_V: torch.Tensor, token_ids_B_T: torch.Tensor) -> torch.Tensor:
    """Log-probs aligned with the tokens: out[:, t] = log p(token t | tokens < t), out[:, 0] = 0.

    The model's logits at position t predict token t+1, so the logits are shifted by one; the
    result lines up with a trajectory's `logprobs_T` (the behaviour log-prob of `token_ids_T[t]`).
    Computed in float32 via logsumexp, without materialising the full log-softmax twice.
    """
    logits = logits_B_T_V[:, :-1].float()
    targets = token_ids_B_T[:, 1:].long()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(picked, (1, 0))


def token_entropy(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution, aligned like `token_logprobs` (out[:, 0] = 0)."""
    logits = logits_B_T_V[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.nn.functional.pad(ent, (1, 0))


def policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    is_cap: float,
    dual_clip: float | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss (a scalar with grad through `logprobs`) and diagnostics over the masked tokens.

    Shapes: [B, T] tensors; advantages [B] or [B, T]. `num_tokens` is the token-mean denominator;
    None uses this call's masked tokens. The learner passes the masked-token count of the whole
    optimizer batch (all micro-batches, all ranks) so that micro-batching and sharding do not
    change the loss. Diagnostics (python floats; means over masked tokens): `clip_frac_low`,
    `clip_frac_high`, `dual_clip_frac`, `ratio_mean`, `ratio_max`, `is_weight_mean`,
    `is_weight_max`, `is_cap_frac`, `kl_prox_behav` (k3 estimate of KL(behaviour || proximal)),
    `logprob_abs_diff` (mean |p - b|), and `num_tokens` (masked tokens here).
    """
    mask = loss_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    adv = adv.expand_as(logprobs)
    proximal = proximal_logprobs.detach().to(logprobs.dtype)

    ratio = torch.exp(logprobs - proximal)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    obj = torch.minimum(ratio * adv, clipped * adv)
    if dual_clip is not None:
        floored = torch.where(adv < 0, torch.maximum(obj, dual_clip * adv), obj)
    else:
        floored = obj
    if behavior_logprobs is None:
        log_w = torch.zeros_like(proximal)
    else:
        log_w = proximal - behavior_logprobs.detach().to(logprobs.dtype)
    weight = torch.exp(log_w).clamp(max=is_cap).detach()
    token_obj = weight * floored

    n_here = mask.sum()
    denom = n_here.clamp(min=1.0) if num_tokens is None else torch.as_tensor(float(num_tokens))
    loss = -(token_obj * mask).sum() / denom

    with torch.no_grad():
        m = mask.bool()
        n = max(int(n_here.item()), 1)

        def frac(cond: torch.Tensor) -> float:
            return float((cond & m).sum().item()) / n

        def masked_max(x: torch.Tensor) -> float:
            return float(x[m].max().item()) if m.any() else 0.0

        r = ratio.detach()
        diag = {
            "clip_frac_low": frac((adv < 0) & (r < 1.0 - clip_low)),
            "clip_frac_high": frac((adv > 0) & (r > 1.0 + clip_high)),
            "dual_clip_frac": frac((adv < 0) & (obj.detach() < dual_clip * adv)) if dual_clip else 0.0,
            "ratio_mean": float((r * mask).sum().item()) / n,
            "ratio_max": masked_max(r),
            "is_weight_mean": float((weight * mask).sum().item()) / n,
            "is_weight_max": masked_max(weight),
            "is_cap_frac": frac(torch.exp(log_w) >= is_cap),
            "kl_prox_behav": float(((torch.exp(log_w) - 1.0 - log_w) * mask).sum().item()) / n,
            "logprob_abs_diff": float((log_w.abs() * mask).sum().item()) / n,
            "num_tokens": float(n_here.item()),
        }
    return loss, diag
