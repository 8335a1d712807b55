"""Sampling temperature != 1: the learner's log-probs (logits / T, as verl) agree with the real vLLM
engine's behaviour log-probs on the same sampled tokens, in compute_logprobs and inside an RL step."""

from __future__ import annotations

import numpy as np
import pytest

from cir_actors.types import FinishReason, ScoredTrajectory, Trajectory, Verdict, VerdictReason

T_SAMPLE = 0.7


@pytest.fixture(scope="module")
def sampled(tiny_generator):
    """4 prompts x 40 tokens sampled at T = 0.7 by the shared engine, with behaviour log-probs."""
    gen = tiny_generator.gen
    prompts = [gen.tokenizer.encode(t) for t in ("Compute 12 * 7.", "What is 3 + 4?", "print(5)", "Let x = 9.")]
    out = []
    for k, p in enumerate(prompts):
        ids, lps = tiny_generator.run(
            gen.sample(p, 40, temperature=T_SAMPLE, ignore_eos=True, seed=k), timeout=120
        )
        out.append((np.asarray(p + ids, np.int32), len(p), np.asarray(lps, np.float32)))
    return out


@pytest.fixture(scope="module")
def learner_t07(ray_session, tiny_model_dir):
    from cir_actors.config import load_config
    from cir_actors.learning.learner import Learner

    cfg = load_config(None, [f"generator.temperature={T_SAMPLE}", "learner.prompts_per_step=2",
                             "learner.mini_batch_prompts=2", "learner.lr=1e-9"])
    learner = Learner(cfg, tiny_model_dir, name="test-learner-t07")
    yield learner
    learner.shutdown()


def test_learner_logprobs_at_sampling_temperature_match_vllm(sampled, learner_t07):
    seqs = [ids for ids, _, _ in sampled]
    at_t = learner_t07.compute_logprobs(seqs, temperature=T_SAMPLE)
    at_1 = learner_t07.compute_logprobs(seqs, temperature=1.0)
    d_t = np.concatenate([np.abs(lp[p:] - b) for lp, (_, p, b) in zip(at_t, sampled)])
    d_1 = np.concatenate([np.abs(lp[p:] - b) for lp, (_, p, b) in zip(at_1, sampled)])
    print(f"mean |learner - vLLM| at T={T_SAMPLE}: {d_t.mean():.2e} (max {d_t.max():.2e}); "
          f"learner at T=1 against the same tokens: {d_1.mean():.2e}")
    assert d_t.max() < 1e-3
    assert d_t.mean() < 0.01 * d_1.mean()


def test_rl_step_uses_the_sampling_temperature(sampled, learner_t07):
    """In train_step the proximal log-probs (learner, at generator.temperature) and the behaviour
    ones differ by rounding only: the step's logprob_abs_diff diagnostic is ~0."""
    groups = []
    for g in range(2):
        group = []
        for i in range(2):
            ids, p, b = sampled[2 * g + i]
            mask = np.zeros(len(ids), np.int8)
            mask[p:] = 1
            lp = np.zeros(len(ids), np.float32)
            lp[p:] = b
            traj = Trajectory(f"t{g}", i, ids, mask, lp, np.where(mask > 0, 0, -1).astype(np.int32), p,
                              FinishReason.LENGTH, 2)
            r = 1.0 if i == 0 else -1.0
            verdict = Verdict(r > 0, None, VerdictReason.CORRECT if r > 0 else VerdictReason.WRONG)
            group.append(ScoredTrajectory(traj, verdict, r))
        groups.append(group)
    out = learner_t07.train_step(groups)
    print(f"RL step at T={T_SAMPLE}: logprob_abs_diff {out['logprob_abs_diff']:.2e}")
    assert out["logprob_abs_diff"] < 1e-3
