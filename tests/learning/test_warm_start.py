"""The SFT warm start and the direction of learning on the real task format.

Covers: the warm start's accuracy estimate (equal to plain transformers' probability of reproducing
each demonstration), its stopping rule (stops at the first check where the estimate reaches the
target and every task kind's reaches the floor, else runs every step) and its summary, and that
one GRPO update on real demonstrations raises the log-probability of the rewarded responses, and
their margin over the punished ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cir_actors.types import ScoredTrajectory, Trajectory, Verdict, VerdictReason


def _cfg(*overrides: str):
    from cir_actors.config import load_config

    return load_config(None, ["data.num_train=300", "learner.lr=1e-3", *overrides])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def demos(tokenizer):
    from cir_actors.data.loaders import load_tasks
    from cir_actors.data.tasks import demonstration_trajectory

    return [demonstration_trajectory(t, tokenizer) for t in load_tasks(_cfg(), tokenizer, "eval")[:12]]


@pytest.fixture(scope="module")
def learner(ray_session, tiny_model_dir):
    from cir_actors.learning.learner import Learner

    learner = Learner(_cfg(), tiny_model_dir, name="test-warm-learner")
    yield learner
    learner.shutdown()


def _sequence_logprob(lp: np.ndarray, traj: Trajectory) -> float:
    return float((np.asarray(lp, np.float64) * traj.loss_mask_T)[1:].sum())


def test_estimate_is_the_probability_of_reproducing_each_demonstration(learner, demos, tiny_model_dir):
    import ray
    from transformers import AutoModelForCausalLM

    from cir_actors.learning.loss import token_logprobs
    from cir_actors.learning.warm_start import reproduction_probabilities

    learner.sft_step(demos)  # away from the uniform init, so the probabilities differ per demo
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    model.load_state_dict(ray.get(learner.publish().weights), strict=False)
    probs = []
    with torch.no_grad():
        for d in demos:
            ids = torch.from_numpy(d.token_ids_T.astype(np.int64))[None]
            probs.append(np.exp(_sequence_logprob(token_logprobs(model(ids).logits, ids)[0].numpy(), d)))
    assert 0 < np.mean(probs) < 1 and np.ptp(np.log(probs)) > 1  # the demos differ, so the match is per demo
    np.testing.assert_allclose(reproduction_probabilities(learner, demos), probs, rtol=1e-4)


def _corrupt_answer(traj: Trajectory, tokenizer) -> Trajectory:
    """The same trajectory with the digits of its final answer changed (a wrong response)."""
    ids = traj.token_ids_T.copy()
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    last_segment = np.where(traj.loss_mask_T == 1)[0]
    answer = [i for i in last_segment[-8:] if ids[i] in digits]
    for i in answer:
        ids[i] = digits[(digits.index(int(ids[i])) + 3) % 10]
    return Trajectory(traj.task_id, 1, ids, traj.loss_mask_T, traj.logprobs_T, traj.versions_T, traj.prompt_len,
                      traj.finish_reason, traj.budget)


def test_grpo_update_raises_rewarded_and_lowers_punished_responses(learner, demos, tokenizer):
    """Groups of (correct demonstration, +1) and (the same with a wrong answer, -1), behaviour
    log-probs from the learner itself (on-policy): after one update every correct response is more
    likely, and more likely relative to its wrong twin."""
    good = demos[:6]
    bad = [_corrupt_answer(d, tokenizer) for d in good]
    before = learner.compute_logprobs([t.token_ids_T for t in good + bad])
    groups = []
    for g, (pos, neg) in enumerate(zip(good, bad)):
        group = []
        for i, (traj, reward) in enumerate(((pos, 1.0), (neg, -1.0))):
            lp = (before[g + i * len(good)] * traj.loss_mask_T).astype(np.float32)
            traj = Trajectory(traj.task_id, i, traj.token_ids_T, traj.loss_mask_T, lp, traj.versions_T,
                              traj.prompt_len, traj.finish_reason, traj.budget)
            verdict = Verdict(reward > 0, None, VerdictReason.CORRECT if reward > 0 else VerdictReason.WRONG)
            group.append(ScoredTrajectory(traj, verdict, reward))
        groups.append(group)
    metrics = learner.train_step(groups)
    assert metrics["trained_trajectories"] == 12
    after = learner.compute_logprobs([t.token_ids_T for t in good + bad])
    delta = [_sequence_logprob(a, t) - _sequence_logprob(b, t) for a, b, t in zip(after, before, good + bad)]
    assert all(d > 0 for d in delta[:6]), delta
    # the margin of each correct response over its wrong twin grows. (The wrong ones need not lose
    # probability in absolute terms: gradients on their shared tokens cancel, and Adam's first step
    # moves every parameter by ~lr whatever its gradient's size.)
    assert all(delta[i] > delta[i + 6] for i in range(6)), delta


def test_warm_start_stops_at_the_target_and_reports_its_checks(ray_session, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from cir_actors.learning.warm_start import warm_start

    cfg = _cfg()
    # a target the random model already meets: stop at the first check
    hf, summary = warm_start(cfg, tiny_model_dir, tmp_path / "early", steps=6, batch_size=4, target_accuracy=1e-300,
                             kind_floor=1e-300, check_every=2, check_size=16)
    assert summary["steps"] == 2 and [c["step"] for c in summary["checks"]] == [2]
    assert AutoModelForCausalLM.from_pretrained(str(hf)) is not None
    # the target is met but the floor is not, for some kind: every step runs, a check every 2 and at the end
    _, summary = warm_start(cfg, tiny_model_dir, tmp_path / "floor", steps=5, batch_size=4, target_accuracy=1e-300,
                            kind_floor=1.0, check_every=2, check_size=16)
    assert summary["steps"] == 5 and [c["step"] for c in summary["checks"]] == [2, 4, 5]
    assert all(0 <= c["accuracy"] < 1 for c in summary["checks"]) and summary["last_loss"] < summary["first_loss"]
    check = summary["checks"][-1]
    kinds = check["by_kind"]
    assert len(kinds) > 1 and min(kinds.values()) <= check["accuracy"] <= max(kinds.values())


def test_stopping_rule_needs_the_target_and_every_kinds_floor():
    from cir_actors.learning.warm_start import reached_target

    check = {"accuracy": 0.6, "by_kind": {"add": 0.9, "mul": 0.3}}
    assert reached_target(check, 0.5, 0.0) and reached_target(check, 0.6, 0.3)
    assert not reached_target(check, 0.61, 0.0)  # below the target
    assert not reached_target(check, 0.5, 0.31)  # one kind below the floor
    assert not reached_target(check, 1.0, 0.0)  # an unreachable target


def test_warm_start_needs_enough_problems_for_its_check(ray_session, tiny_model_dir, tmp_path):
    from cir_actors.learning.warm_start import warm_start

    with pytest.raises(ValueError, match="needs data.num_train >= 256 .it estimates accuracy on 128 of them., got 100"):
        warm_start(_cfg("data.num_train=100"), tiny_model_dir, tmp_path, steps=1, target_accuracy=0.5)
    with pytest.raises(ValueError, match="kind_floor is a condition of the stop at target_accuracy"):
        warm_start(_cfg(), tiny_model_dir, tmp_path, steps=1, kind_floor=0.25)
