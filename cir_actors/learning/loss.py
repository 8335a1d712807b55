"""The off-policy-tolerant clipped GRPO loss (decoupled PPO, as AReaL), and token log-prob helpers.

Per sampled token t: current log-prob c (with grad), proximal log-prob p (the learner's weights at
the start of this step, no grad), behaviour log-prob b (what the generator sampled with).
- ratio r = exp(c - p), clipped to [1 - clip_low, 1 + clip_high] (clip-higher);
- off-policy weight w from rho = exp(p - b), detached (b = None: w = 1, on-policy); how rho becomes
  w is the `correction` (`correction_weights`): truncated IS by default, w = min(rho, is_cap);
- objective w * min(r A, clip(r) A); with dual_clip=k a negative-advantage token's objective is
  floored at k A (the clipped objective is otherwise unbounded below as r grows);
- loss = -(sum of objectives over masked tokens) / (masked tokens in the batch): the token mean.
With b = p this is exactly clipped GRPO/PPO. A token whose correction weight is 0 (masked IS,
IcePop, geometric mask) contributes nothing but stays in the token-mean denominator, as in IcePop's
objective (Ring-1T, arXiv:2510.18855, eq. for J_IcePop: 1/sum|y_i| over all tokens). What this module does not do: KL and entropy terms
(the learner adds them when configured) and advantages (`learning/advantages.py`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Correction = Literal["tis", "mis", "icepop", "seq_tis", "geo_mask"]
CORRECTIONS: tuple[str, ...] = ("tis", "mis", "icepop", "seq_tis", "geo_mask")


def correction_weights(
    log_rho: torch.Tensor,
    mask: torch.Tensor,
    correction: str = "tis",
    *,
    is_cap: float = 5.0,
    band: tuple[float, float] = (0.5, 5.0),
    geo_band: tuple[float, float] = (0.999, 1.001),
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Off-policy correction weights from per-token log-ratios log_rho = log pi_prox - log mu
    (proximal learner over behaviour generator), [B, T] with `mask` [B, T] marking sampled tokens.

    Returns (weight [B, T], truncated [B, T] bool, masked [B, T] bool); no gradient flows. Modes,
    with rho_t = exp(log_rho_t) and a sequence's tokens T_i:
    - `tis` (token truncated IS; Yao et al. "Your efficient RL framework secretly brings you
      off-policy RL training", fengyao.notion.site/off-policy-rl): w_t = min(rho_t, is_cap);
      truncated where rho_t > is_cap.
    - `mis` (token masked IS, one-sided; TRL's/ms-swift's `token_mask` mode): w_t = rho_t if
      rho_t <= is_cap else 0; masked where rho_t > is_cap.
    - `icepop` (Ring-1T, arXiv:2510.18855, M(k; a, b) = k if a <= k <= b else 0; paper band
      [0.5, 5]): w_t = rho_t inside `band`, 0 outside (two-sided mask).
    - `seq_tis` (sequence truncated IS; verl rollout correction, rollout_is="sequence",
      docs/algo/rollout_corr_math.md 3.3.2): w_i = min(prod_{t in T_i} rho_t, is_cap), broadcast
      to the sequence's tokens; truncated where the product exceeds is_cap.
    - `geo_mask` (geometric-mean rejection; verl rollout_rs="geometric", 3.3.3):
      rho_geo_i = exp(mean_{t in T_i} log rho_t); w = 1 on the whole sequence when
      geo_band[0] <= rho_geo_i <= geo_band[1], else 0 (no IS weighting, rejection only). The band
      is tight (verl: 0.999-1.001) because a mean per-token deviation is small.
    A sequence is a row, or with `segments` [B, T] (packed rows: the sequence index of each token)
    the tokens sharing a segment id.
    """
    with torch.no_grad():
        m = mask.bool()
        log_rho = torch.where(m, log_rho, torch.zeros_like(log_rho))
        rho = torch.exp(log_rho)
        none = torch.zeros_like(m)
        if correction == "tis":
            return rho.clamp(max=is_cap), (rho > is_cap) & m, none
        if correction == "mis":
            out = rho > is_cap
            return torch.where(out, torch.zeros_like(rho), rho), none, out & m
        if correction == "icepop":
            out = (rho < band[0]) | (rho > band[1])
            return torch.where(out, torch.zeros_like(rho), rho), none, out & m
        if segments is None:
            seq_log = log_rho.sum(-1, keepdim=True).expand_as(log_rho)  # [B, T]: the row's sum
            n = m.sum(-1, keepdim=True).clamp(min=1).expand_as(log_rho)
        else:
            seg = segments.long()
            k = int(seg.max()) + 1 if seg.numel() else 1
            per_seg = torch.zeros(seg.shape[0], k, dtype=log_rho.dtype, device=log_rho.device)
            seq_log = per_seg.scatter_add(1, seg, log_rho).gather(1, seg)
            n = per_seg.scatter_add(1, seg, m.to(log_rho.dtype)).clamp(min=1).gather(1, seg)
        if correction == "seq_tis":
            # exp(min(s, log C)) = min(exp(s), C) without overflowing exp on long sequences
            w_seq = torch.exp(seq_log.clamp(max=math.log(is_cap)))
            return w_seq, (seq_log > math.log(is_cap)) & m, none
        if correction == "geo_mask":
            geo = torch.exp(seq_log / n)
            keep = (geo >= geo_band[0]) & (geo <= geo_band[1])
            return keep.to(rho.dtype), none, ~keep & m
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")


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
    correction: str = "tis",
    is_band: tuple[float, float] = (0.5, 5.0),
    geo_band: tuple[float, float] = (0.999, 1.001),
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss (a scalar with grad through `logprobs`) and diagnostics over the masked tokens.

    Shapes: [B, T] tensors; advantages [B] or [B, T]; `segments` [B, T] for packed rows
    (`correction_weights`). `num_tokens` is the token-mean denominator;
    None uses this call's masked tokens. The learner passes the masked-token count of the whole
    optimizer batch (all micro-batches, all ranks) so that micro-batching and sharding do not
    change the loss. `correction`, `is_cap`, `is_band` and `geo_band` select the off-policy weight
(`correction_weights`). Diagnostics (python floats; means over masked tokens): `clip_frac_low`,
    `clip_frac_high`, `dual_clip_frac`, `ratio_mean`, `ratio_max`, `is_weight_mean`,
    `is_weight_max`, `is_weight_sq_mean` (with is_weight_mean, the effective sample size
ESS = mean(w)^2 / mean(w^2)), `is_cap_frac` (tokens whose weight was truncated), `is_masked_frac`
(tokens the correction masked to weight 0), `kl_prox_behav` (k3 estimate of KL(behaviour || proximal)),
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
    weight, truncated, masked = correction_weights(
        log_w.detach(), mask, correction, is_cap=is_cap, band=is_band, geo_band=geo_band, segments=segments
    )
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
            "is_weight_sq_mean": float((weight.square() * mask).sum().item()) / n,
            "is_cap_frac": frac(truncated),
            "is_masked_frac": frac(masked),
            "kl_prox_behav": float(((torch.exp(log_w) - 1.0 - log_w) * mask).sum().item()) / n,
            "logprob_abs_diff": float((log_w.abs() * mask).sum().item()) / n,
            "num_tokens": float(n_here.item()),
        }
    return loss, diag


def forward_logprobs(
    model: torch.nn.Module,
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
    entropy: str = "none",
    loss_mask_B_T: torch.Tensor | None = None,
    entropy_sample_tokens: int = 256,
    position_ids_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(log-probs [B, T] of `logits / temperature` aligned as `token_logprobs`, entropy [B, T] or
    None, the mask of positions where that entropy is valid or None).

    `chunk_tokens` > 0: the transformer body runs once, then the LM head, log-softmax and entropy run
    on chunks of that many positions, each under activation checkpointing, so neither the full
    [B, T, V] logits nor an fp32 copy of them is ever held (at 32k tokens x 152k vocabulary each is
    ~10-20 GB); the backward recomputes one chunk's logits at a time. 0: the model's full logits.
    `entropy`: "none"; "full" (every position, with grad: an entropy bonus); "sample" (a diagnostic
    without grad on at most `entropy_sample_tokens` evenly spaced positions of `loss_mask_B_T`).
    The body is `model.base_model` and the head `model.get_output_embeddings()` (HF causal LMs).
    `position_ids_B_T`: packed rows (positions restarting per sequence); the attention mask is then
    left to the model, which derives a block-causal one from them.
    """
    from torch.utils.checkpoint import checkpoint

    B, T = input_ids_B_T.shape
    ids = input_ids_B_T.long()
    if position_ids_B_T is None:
        inputs = {"input_ids": input_ids_B_T, "attention_mask": attention_mask_B_T, "use_cache": False}
    else:  # no attention mask: transformers then reads the sequence boundaries from the positions
        inputs = {"input_ids": input_ids_B_T, "position_ids": position_ids_B_T, "use_cache": False}
    if chunk_tokens <= 0:
        logits = model(**inputs).logits
        if temperature != 1.0:
            logits = logits / temperature
        lp = token_logprobs(logits, ids)
        if entropy == "none":
            return lp, None, None
        if entropy == "full":
            return lp, token_entropy(logits), torch.ones_like(lp, dtype=torch.bool)
        with torch.no_grad():
            ent = token_entropy(logits.detach())
        sample = _sample_positions(loss_mask_B_T, entropy_sample_tokens, lp.shape)
        return lp, ent * sample, sample

    hidden = model.base_model(**inputs).last_hidden_state
    head = model.get_output_embeddings()
    h = hidden[:, :-1].reshape(B * (T - 1), -1)
    targets = ids[:, 1:].reshape(-1)
    with_entropy = entropy == "full"

    def chunk_fn(h_c: torch.Tensor, t_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h_c).float()
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(-1, t_c.unsqueeze(-1)).squeeze(-1) - lse
        if with_entropy:  # H = lse - sum p * logit
            ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        else:
            ent = torch.zeros_like(picked)
        return picked, ent

    lps, ents = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and h.requires_grad:
            picked, ent = checkpoint(chunk_fn, h[sl], targets[sl], use_reentrant=False)
        else:
            picked, ent = chunk_fn(h[sl], targets[sl])
        lps.append(picked)
        ents.append(ent)
    lp = torch.nn.functional.pad(torch.cat(lps).view(B, T - 1), (1, 0))
    if entropy == "none":
        return lp, None, None
    if with_entropy:
        return lp, torch.nn.functional.pad(torch.cat(ents).view(B, T - 1), (1, 0)), torch.ones_like(
            lp, dtype=torch.bool
        )
    sample = _sample_positions(loss_mask_B_T, entropy_sample_tokens, lp.shape)
    ent = torch.zeros(B, T, device=lp.device)
    with torch.no_grad():
        b_idx, t_idx = sample.nonzero(as_tuple=True)
        if len(b_idx):
            logits = head(hidden[b_idx, t_idx - 1].detach()).float()
            if temperature != 1.0:
                logits = logits / temperature
            logp = torch.log_softmax(logits, dim=-1)
            ent[b_idx, t_idx] = -(logp.exp() * logp).sum(-1)
    return lp, ent, sample


def _sample_positions(mask_B_T: torch.Tensor | None, k: int, shape: torch.Size) -> torch.Tensor:
    """At most k evenly spaced positions where mask_B_T > 0 (position 0 never); deterministic, so
    it uses no random state (a resumed run stays exact)."""
    out = torch.zeros(shape, dtype=torch.bool, device=mask_B_T.device if mask_B_T is not None else None)
    if mask_B_T is None or k <= 0:
        return out
    m = mask_B_T > 0
    m[:, 0] = False
    flat = m.reshape(-1).nonzero().squeeze(-1)
    if len(flat) > k:
        flat = flat[torch.linspace(0, len(flat) - 1, k, device=flat.device).round().long()]
    out.view(-1)[flat] = True
    return out
