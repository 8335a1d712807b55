"""The DeepSpeed learner on CPU: real DeepSpeed ranks as Ray actors, the tiny model, synthetic groups.

Covers: token alignment and on-policy equivalence at the learner level, two-rank ZeRO-2 == one rank,
ZeRO-3 gathering full weights (object store, broadcast, shared memory), the broadcast to a receiver
in another process, the shared-memory region and its cross-node fallback, checkpoint round trip
(exact resume, HF directory loads in transformers), SFT mode.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time

import numpy as np
import pytest
import torch

from cir_actors.learning.learner import plan_micro_batches
from cir_actors.types import (
    FinishReason,
    LearnerHung,
    PolicyUpdate,
    ScoredTrajectory,
    Trajectory,
    Verdict,
    VerdictReason,
)

# mini-batches of 4 groups (two optimizer updates for 6 groups: a separate proximal pass), micro-
# batches of <= 64 padded tokens (several per rank, unequal counts between ranks), dual clip on.
OVERRIDES = [
    "learner.prompts_per_step=8",
    "learner.mini_batch_prompts=4",
    "learner.micro_batch_tokens=64",
    "learner.dual_clip=3.0",
    "learner.lr=1e-3",
]
# rewards per group: group 2 and 5 are all-equal (zero advantage, skipped and counted)
REWARDS = [[1, -1], [1, 1, -1], [-1, -1], [-1, 1], [1, -1, -1], [1, 1]]


def _cfg(**over):
    from cir_actors.config import load_config

    return load_config(None, OVERRIDES + [f"{k}={v}" for k, v in over.items()])


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _model_logprobs(model, ids: np.ndarray) -> np.ndarray:
    """log p(token t | < t) from a plain transformers forward; [0] = 0."""
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0]
    lp = torch.log_softmax(logits[:-1].float(), -1).gather(
        -1, torch.from_numpy(ids[1:].astype(np.int64))[:, None]
    )
    return np.concatenate([[0.0], lp[:, 0].numpy()]).astype(np.float32)


def make_groups(
    model, seed: int, noise: float = 0.0, rewards_list=REWARDS, lengths=None
) -> list[list[ScoredTrajectory]]:
    """Groups of trajectories: prompt, a sampled segment, an interpreter segment (mask 0), a sampled
    segment. Behaviour log-probs are the model's own (on-policy), plus `noise` (off-policy).
    `lengths`: per group, the (low, high) range of sequence lengths (default 18-50)."""
    rng = np.random.default_rng(seed)
    groups = []
    for g, rewards in enumerate(rewards_list):
        group = []
        low, high = lengths[g] if lengths else (18, 50)
        for i, r in enumerate(rewards):
            T, p = int(rng.integers(low, high)), int(rng.integers(4, 9))
            ids = rng.integers(3, 400, T).astype(np.int32)
            mask = np.zeros(T, np.int8)
            mask[p:] = 1
            a = p + (T - p) // 3
            mask[a : a + 5] = 0  # interpreter output: never trained on
            lp = _model_logprobs(model, ids) + noise * rng.standard_normal(T).astype(np.float32)
            lp = (lp * mask).astype(np.float32)
            versions = np.where(mask > 0, 0, -1).astype(np.int32)
            traj = Trajectory(f"t{g}", i, ids, mask, lp, versions, p, FinishReason.STOP, 2)
            verdict = Verdict(r > 0, None, VerdictReason.CORRECT if r > 0 else VerdictReason.WRONG)
            group.append(ScoredTrajectory(traj, verdict, float(r)))
        groups.append(group)
    return groups


def test_plan_micro_batches_respects_token_budget():
    lengths = [10, 50, 30, 31, 5, 70, 20]
    plan = plan_micro_batches(lengths, 64)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    for mb in plan:
        assert len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= 64
    assert [5] in plan  # longer than the budget: alone


@pytest.fixture(scope="module")
def hf_init(tiny_model_dir):
    return _hf_model(tiny_model_dir)


@pytest.fixture(scope="module")
def batches(hf_init):
    return {"a": make_groups(hf_init, seed=0), "b": make_groups(hf_init, seed=1, noise=0.3)}


@pytest.fixture(scope="module")
def learner1(ray_session, tiny_model_dir):
    from cir_actors.learning.learner import Learner

    learner = Learner(_cfg(), tiny_model_dir, name="test-learner1")
    yield learner
    learner.shutdown()


@pytest.fixture(scope="module")
def reference_step(learner1, batches):
    """The one-rank learner's first step on batch a, from the initial weights."""
    import ray

    metrics = learner1.train_step(batches["a"])
    update = learner1.publish()
    return metrics, update, ray.get(update.weights)


def _assert_state_close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"max weight difference {worst:.3g} > {atol}"
    return worst


def test_on_policy_first_update_is_plain_clipped_grpo(reference_step, batches):
    """Behaviour = the model's own log-probs: the learner's recomputed log-probs line up token for
    token (an off-by-one would show as a large mismatch), every off-policy weight is 1, and the
    first update's loss is -(sum of A over masked tokens) / (masked tokens of its mini-batch)."""
    from cir_actors.learning.advantages import compute_advantages

    metrics, update, _ = reference_step
    assert metrics["logprob_abs_diff"] < 1e-5
    assert metrics["is_weight_max"] == pytest.approx(1.0, abs=1e-5)
    # proximal log-probs are taken once, before the first update: the second update's ratios moved
    assert metrics["ratio_max"] > 1.0
    assert metrics["zero_adv_groups"] == 2 and metrics["groups"] == 6
    assert metrics["trained_trajectories"] == sum(len(r) for r in REWARDS) - 4
    assert metrics["updates"] == 2 and update.version == 1 == metrics["version"]
    assert metrics["grad_norm"] > 0

    advs, _ = compute_advantages([np.array(r, float) for r in REWARDS], "grpo")
    first = [
        (a, st.trajectory.loss_mask_T[1:].sum()) for g in range(4) for a, st in zip(advs[g], batches["a"][g])
    ]
    expected = -sum(a * n for a, n in first if a != 0) / sum(n for a, n in first if a != 0)
    assert metrics["update_losses"][0] == pytest.approx(expected, rel=1e-5)


def test_two_rank_zero2_packed_equals_one_rank_padded(ray_session, tiny_model_dir, reference_step, batches):
    """Same global batch, same initial weights: two ZeRO-2 ranks (groups sharded, unequal numbers of
    micro-batches, an empty micro-batch on one rank) with sequence packing give the one-rank
    learner's loss and weights, which it computed on padded rows. (ZeRO-3 over two padded ranks is
    compared with the same reference in test_zero3_publishes_full_weights.)"""
    import ray

    from cir_actors.learning.learner import Learner

    metrics1, _, state1 = reference_step
    learner = Learner(_cfg(**{"learner.num_ranks": 2, "learner.packing": "true"}), tiny_model_dir, name="test-learner2")
    try:
        metrics2 = learner.train_step(batches["a"])
        state2 = ray.get(learner.publish().weights)
    finally:
        learner.shutdown()
    assert metrics2["update_losses"] == pytest.approx(metrics1["update_losses"], rel=1e-5)
    assert metrics2["tokens"] == metrics1["tokens"]
    worst = _assert_state_close(state1, state2, atol=1e-5)
    print(f"two ranks vs one: max weight difference {worst:.2e}")


@pytest.fixture(scope="module")
def learner3(ray_session, tiny_model_dir):
    from cir_actors.learning.learner import Learner

    learner = Learner(
        # threshold 0: every parameter is partitioned (the tiny model's would all stay whole otherwise)
        _cfg(**{"learner.num_ranks": 2, "learner.zero_stage": 3, "learner.zero3_persistence_threshold": 0}),
        tiny_model_dir,
        name="test-learner3",
        num_receivers=1,
    )
    yield learner
    learner.shutdown()


@pytest.mark.timeout(600, method="thread")  # a rank stuck in a collective never returns
def test_zero3_publishes_full_weights(learner3, hf_init, reference_step, batches):
    """ZeRO-3 partitions every parameter over the two ranks; publishing gathers them whole, under
    their HF names, and a ZeRO-3 step matches the ZeRO-2 one."""
    import ray

    from cir_actors.learning.weight_sync import fingerprint

    held = ray.get([r.partition_numel.remote() for r in learner3.ranks])
    assert max(held) < 0.55 * learner3.num_params  # really partitioned over the two ranks
    update0 = learner3.publish()
    state0 = ray.get(update0.weights)
    init = dict(hf_init.named_parameters())
    assert state0.keys() == init.keys()
    for name, t in state0.items():
        assert t.shape == init[name].shape and torch.equal(t, init[name].detach()), name
    assert update0.version == 0 and update0.checksum == fingerprint(init.items())

    metrics = learner3.train_step(batches["a"])
    update1 = learner3.publish()
    assert update1.version == 1
    assert metrics["update_losses"] == pytest.approx(reference_step[0]["update_losses"], rel=1e-5)
    _assert_state_close(reference_step[2], ray.get(update1.weights), atol=1e-5)

    # Very unequal shards (rank 0: 8 long sequences, one per micro-batch; rank 1: 4 short ones) and
    # two updates, so a separate proximal pass: every rank must still run as many forwards.
    rewards = [[1, -1, 1, -1], [1, -1], [1, -1, -1, 1], [-1, 1]] * 2
    lengths = [(45, 60), (10, 14), (45, 60), (10, 14)] * 2
    lopsided = learner3.train_step(make_groups(hf_init, seed=3, rewards_list=rewards, lengths=lengths))
    assert lopsided["updates"] == 2 and lopsided["trained_trajectories"] == 24


def test_broadcast_reaches_a_receiver_in_another_process(ray_session, learner3, batches):
    """Learner rank 0 -> a receiver actor over an independent gloo group (ZeRO-3: gathered while
    streamed); the receiver's fingerprint matches the publication's checksum, twice (group reuse)."""
    import ray

    class Receiver:  # defined here so that Ray ships it by value (tests/ is not importable in workers)
        """Stands in for a generator process: joins the broadcast group and returns what arrived."""

        def receive(self, update, rank: int):
            from cir_actors.learning.weight_sync import _RECEIVER_GROUPS, fingerprint, receive_broadcast

            got = {name: t.clone() for name, t in receive_broadcast(update, rank=rank)}
            return fingerprint(got.items()), got, [address for address, _ in _RECEIVER_GROUPS]

    receiver = ray.remote(Receiver).options(num_cpus=0.1).remote()
    try:
        for _ in range(2):
            by_store = learner3.publish(via="object_store")
            update = learner3.publish(via="broadcast")
            assert update.weights is None and update.broadcast_group.startswith("gloo://")
            assert update.version == by_store.version and update.checksum == by_store.checksum
            fp, got, groups = ray.get(receiver.receive.remote(update, 1), timeout=120)
            learner3.wait_published()
            assert fp == update.checksum and groups == [update.broadcast_group]
            expected = ray.get(by_store.weights)
            assert all(torch.equal(got[k], expected[k]) for k in expected) and got.keys() == expected.keys()
            learner3.train_step(batches["b"])
        first_group = update.broadcast_group
        learner3.reset_broadcast()  # the receiver leaves: the next publication forms a new group
        assert learner3.publish(via="object_store").broadcast_group is None
        update = learner3.publish(via="broadcast")
        fp, _, groups = ray.get(receiver.receive.remote(update, 1), timeout=120)
        learner3.wait_published()
        # ... which the receiver joins, dropping the old one (a kept engine after a resume does so)
        assert fp == update.checksum and groups == [update.broadcast_group] != [first_group]
        learner3.reset_broadcast()
    finally:
        ray.kill(receiver)
    _STATE["first_group"] = first_group


def test_shared_memory_publication_and_the_cross_node_fallback(ray_session, learner3, caplog):
    """Rank 0 (ZeRO-3: gathered while written) puts the weights into its shared-memory region; this
    process reads them bit-identical to the object store's, fingerprint included. A generator on
    another node makes the learner put them into the object store too (and says so); the region
    is gone once released."""
    import logging
    from pathlib import Path

    import ray

    from cir_actors.learning.shared_weights import local_node_id, read_slot
    from cir_actors.learning.weight_sync import fingerprint

    by_store = learner3.publish(via="object_store")
    expected = ray.get(by_store.weights)
    first = learner3.publish(via="shared_memory")
    second = learner3.publish(via="shared_memory")
    try:
        assert first.weights is None and first.checksum == by_store.checksum
        assert first.shared_memory.node_id == local_node_id() and first.shared_memory.slot != second.shared_memory.slot
        for update in (first, second):
            with read_slot(update.shared_memory) as views:
                got = {name: t.clone() for name, t in views}
            assert fingerprint(got.items()) == update.checksum and got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in expected)

        learner3.receiver_nodes = [local_node_id(), "another-node"]
        with caplog.at_level(logging.INFO, logger="cir_actors.learning.learner"):
            both = learner3.publish(via="shared_memory")
        assert both.shared_memory is not None and both.weights is not None
        assert "another-node" in caplog.text and "object store" in caplog.text
        learner3.receiver_nodes = ["another-node"]
        remote_only = learner3.publish(via="shared_memory")
        assert remote_only.shared_memory is None and remote_only.checksum == by_store.checksum
        assert all(torch.equal(t, expected[k]) for k, t in ray.get(remote_only.weights).items())
    finally:
        learner3.receiver_nodes = None
        learner3.release_shared_memory()
    assert not Path(first.shared_memory.path).exists()


_STATE: dict = {}


def test_checkpoint_round_trip_resumes_exactly(learner1, learner3, reference_step, batches, tmp_path):
    """Save after step 1, take step 2; load, take step 2 again: same loss, same weights. The HF
    directory loads in transformers with the step-1 weights; a mismatched learner is refused."""
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tmp_path / "ckpt"
    learner1.save_checkpoint(ckpt)
    m2 = learner1.train_step(batches["b"])
    s2 = ray.get(learner1.publish().weights)
    learner1.load_checkpoint(ckpt)
    assert learner1.version == 1
    m2b = learner1.train_step(batches["b"])
    s2b = ray.get(learner1.publish().weights)
    assert m2b["update_losses"] == m2["update_losses"] and m2b["is_weight_mean"] == m2["is_weight_mean"]
    assert all(torch.equal(s2[k], s2b[k]) for k in s2)
    assert not torch.equal(s2["lm_head.weight"], reference_step[2]["lm_head.weight"])  # step 2 did move

    hf = AutoModelForCausalLM.from_pretrained(ckpt / "hf", dtype=torch.float32)
    for name, t in hf.named_parameters():
        assert torch.equal(t.detach(), reference_step[2][name]), name
    assert AutoTokenizer.from_pretrained(ckpt / "hf").encode("12")  # the tokenizer came along

    with pytest.raises(ValueError, match="saved with 1 ranks and ZeRO 2"):
        learner3.load_checkpoint(ckpt)


def test_sft_step_is_cross_entropy_on_masked_tokens(learner1, batches):
    """The reported SFT loss equals the masked-token cross-entropy of the current weights computed
    with plain transformers; interpreter and prompt tokens do not count; a second step lowers it."""
    import ray
    from transformers import AutoModelForCausalLM

    trajs = [st.trajectory for group in batches["a"] + batches["b"] for st in group]
    state = ray.get(learner1.publish().weights)
    model = AutoModelForCausalLM.from_pretrained(learner1.model_path, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False)
    total, count = 0.0, 0
    for t in trajs:
        lp = _model_logprobs(model, t.token_ids_T)
        m = t.loss_mask_T.astype(bool)
        m[0] = False
        total -= float(lp[m].astype(np.float64).sum())
        count += int(m.sum())
    first = learner1.sft_step(trajs)
    assert first["tokens"] == count
    assert first["loss"] == pytest.approx(total / count, rel=1e-5)
    second = learner1.sft_step(trajs)
    assert second["loss"] < first["loss"]


def test_bad_model_path_is_one_sentence(tmp_path):
    from cir_actors.learning.learner import Learner

    with pytest.raises(ValueError, match="has no config.json"):
        Learner(_cfg(), tmp_path)


def test_published_weights_in_vllm_reproduce_learner_logprobs(
    tiny_generator, learner1, learner3, hf_init, batches
):
    """Both publication paths end to end into the real vLLM generator: it echoes the checksum, and
    its log-probs of the batch's sequences match the learner's own forward pass (fp32)."""

    from cir_actors.learning.weight_sync import fingerprint

    gen = tiny_generator.gen
    seqs = [st.trajectory.token_ids_T for group in batches["b"][:3] for st in group]
    before = gen.served_version()
    init_lp = [_model_logprobs(hf_init, ids) for ids in seqs]
    try:
        for learner, via in ((learner1, "object_store"), (learner3, "broadcast")):
            learner.train_step(batches["b"])  # weights away from the initial ones, whatever ran before
            update = learner.publish(via=via)
            assert update.broadcast_group != _STATE.get("first_group")  # a new group after reset_broadcast
            gen.forget_version()  # the shared engine may serve a later version of another learner's
            served = tiny_generator.run(gen.update_weights(update), timeout=180)
            learner.wait_published()
            assert served.checksum == update.checksum and served.version == update.version
            ours = learner.compute_logprobs(seqs)
            theirs = tiny_generator.run(gen.compute_logprobs([s.tolist() for s in seqs]), timeout=120)
            diff = max(float(np.abs(a[1:] - b[1:]).max()) for a, b in zip(ours, theirs))
            moved = max(float(np.abs(a[1:] - b[1:]).max()) for a, b in zip(ours, init_lp))
            print(
                f"{via}: max |learner - vLLM| log-prob {diff:.2e} (weights moved the log-probs by {moved:.2e})"
            )
            assert diff < 1e-4 < moved
    finally:  # leave the shared engine serving the initial weights
        init = {k: v.detach().clone() for k, v in hf_init.named_parameters()}
        restore = PolicyUpdate(max(before, gen.served_version()) + 1, 2, init, fingerprint(init.items()))
        tiny_generator.run(gen.update_weights(restore), timeout=180)


def _advantage_and_entropy_sums(samples, model) -> tuple[float, int, float]:
    """(sum of A x masked tokens, masked tokens, sum of the model's token entropy over them) for
    (advantage, scored trajectory) pairs: the parts of a first update's token-mean loss."""
    num, den, ent = 0.0, 0, 0.0
    for a, st in samples:
        t = st.trajectory
        mask = t.loss_mask_T.astype(bool)
        mask[0] = False
        with torch.no_grad():
            logits = model(torch.from_numpy(t.token_ids_T.astype(np.int64))[None]).logits[0, :-1]
        h = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).numpy()
        num += float(a) * mask.sum()
        den += int(mask.sum())
        ent += float(h[mask[1:]].sum())
    return num, den, ent


def test_entropy_bonus_and_kl_to_reference(ray_session, tiny_model_dir, hf_init, batches):
    """With both optional terms on, every sample is trained (zero-advantage ones included), the
    first update's loss is -(A token mean) - entropy_coef x (token-mean entropy, as transformers
    computes it), the KL to the frozen initial model starts at 0 and grows once the weights move."""
    from cir_actors.learning.advantages import compute_advantages
    from cir_actors.learning.learner import Learner

    over = {"learner.kl_coef": 0.1, "learner.entropy_coef": 0.01, "learner.mini_batch_prompts": 8}
    learner = Learner(_cfg(**over), tiny_model_dir, name="test-learner-terms")
    try:
        first = learner.train_step(batches["a"])
        second = learner.train_step(batches["a"])
    finally:
        learner.shutdown()
    advs, _ = compute_advantages([np.array(r, float) for r in REWARDS], "grpo")
    every = [(a, st) for g, group in enumerate(batches["a"]) for a, st in zip(advs[g], group)]
    num, den, ent = _advantage_and_entropy_sums(every, hf_init)
    assert first["trained_trajectories"] == sum(len(r) for r in REWARDS) and first["tokens"] == den
    assert first["entropy"] == pytest.approx(ent / den, rel=1e-5)
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert first["update_losses"][0] == pytest.approx(-num / den - 0.01 * ent / den, rel=1e-5)
    assert second["kl_ref"] > 1e-4


def test_entropy_bonus_over_informative_groups_skips_zero_advantage(ray_session, tiny_model_dir, hf_init, batches):
    """learner.entropy_groups=informative: the zero-advantage samples are not run (as without a
    bonus), and the first update's loss is -(A token mean) - entropy_coef x (token-mean entropy),
    both over the nonzero-advantage samples' tokens only."""
    from cir_actors.learning.advantages import compute_advantages
    from cir_actors.learning.learner import Learner

    over = {"learner.entropy_coef": 0.01, "learner.entropy_groups": "informative"}
    learner = Learner(_cfg(**over), tiny_model_dir, name="test-learner-entropy-informative")
    try:
        first = learner.train_step(batches["a"])
    finally:
        learner.shutdown()
    advs, _ = compute_advantages([np.array(r, float) for r in REWARDS], "grpo")
    first_minibatch = [(a, st) for g in range(4) for a, st in zip(advs[g], batches["a"][g]) if a != 0]
    num, den, ent = _advantage_and_entropy_sums(first_minibatch, hf_init)
    assert first["zero_adv_groups"] == 2
    assert first["trained_trajectories"] == sum(len(r) for r in REWARDS) - 4
    assert first["update_losses"][0] == pytest.approx(-num / den - 0.01 * ent / den, rel=1e-5)


def test_lr_schedule_values():
    from cir_actors.learning.learner import lr_at

    const = _cfg(**{"scheduler.total_steps": 10, "learner.lr_warmup_steps": 4})
    assert [lr_at(s, const) for s in (1, 2, 4, 10)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3])
    cos = _cfg(**{"scheduler.total_steps": 9, "learner.lr_warmup_steps": 1, "learner.lr_schedule": "cosine",
                  "learner.lr_min_ratio": 0.1})
    # step 1 of 1 warm-up step is already the peak; the cosine runs over steps 1..9 down to 0.1 x lr
    assert [lr_at(s, cos) for s in (1, 5, 9)] == pytest.approx([1e-3, 0.55e-3, 1e-4])
    with pytest.raises(Exception, match="lr_warmup_steps"):
        _cfg(**{"scheduler.total_steps": 4, "learner.lr_warmup_steps": 4})


def test_lr_schedule_reaches_the_optimizer(ray_session, tiny_model_dir, batches):
    """Cosine to 0 over 3 steps: steps 1 and 2 move the weights, step 3 (learning rate 0) takes its
    optimizer updates and leaves them exactly where they were."""
    import ray

    from cir_actors.learning.learner import Learner

    over = {"scheduler.total_steps": 3, "learner.lr_schedule": "cosine"}
    learner = Learner(_cfg(**over), tiny_model_dir, name="test-learner-lr-schedule")
    try:
        states, lrs, updates = [ray.get(learner.publish().weights)], [], []
        for name in ("a", "b", "a"):
            m = learner.train_step(batches[name])
            lrs.append(m["lr"])
            updates.append(m["updates"])
            states.append(ray.get(learner.publish().weights))
    finally:
        learner.shutdown()
    assert lrs == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-12) and updates == [2, 2, 2]
    for before, after in itertools.pairwise(states[:3]):
        assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(states[2][k], states[3][k]) for k in states[2])


def test_step_without_signal_leaves_weights_alone(learner1, hf_init):
    """A batch whose every group is all-right or all-wrong (zero advantages; the demo meets several)
    takes no optimizer update: the weights do not move and no grad norm is reported."""
    import ray

    before = ray.get(learner1.publish().weights)
    metrics = learner1.train_step(make_groups(hf_init, seed=5, rewards_list=[[1, 1, 1, 1], [-1, -1, -1, -1]]))
    after = ray.get(learner1.publish().weights)
    assert metrics["updates"] == 0 and metrics["zero_adv_groups"] == 2 and metrics["grad_norm"] is None
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_icepop_masks_the_tokens_outside_the_band_and_void_turns_are_filtered(
    ray_session, tiny_model_dir, hf_init, batches
):
    """learner.correction=icepop on off-policy data (behaviour = model + noise): the fraction of
    trained tokens masked is exactly the fraction whose ratio pi_init / behaviour leaves the band
    (the proximal pass runs on the initial weights), and the ESS is exported. With
    buffer.void_turn_filter two trajectories without an answer (one cut by the length limit, one
    stopped) are counted by reason and left out of the update; advantages still use them."""
    from cir_actors.learning.learner import Learner
    from cir_actors.types import replace

    band = (0.8, 1.25)
    over = {"learner.correction": "icepop", "learner.is_band": f"[{band[0]},{band[1]}]",
            "buffer.void_turn_filter": "true"}
    groups = [list(g) for g in batches["b"]]
    no_box = Verdict(False, None, VerdictReason.NO_BOX)
    void = {(0, 0): FinishReason.LENGTH, (3, 1): FinishReason.STOP}
    for (g, i), finish in void.items():
        st = groups[g][i]
        groups[g][i] = ScoredTrajectory(replace(st.trajectory, finish_reason=finish), no_box, st.reward)
    learner = Learner(_cfg(**over), tiny_model_dir, name="test-learner-icepop")
    try:
        out = learner.train_step(groups)
    finally:
        learner.shutdown()
    outside = total = trained = 0
    for g, group in enumerate(groups):
        if len(set(REWARDS[g])) == 1:
            continue  # zero advantage: not trained
        for i, st in enumerate(group):
            if (g, i) in void:
                continue
            t = st.trajectory
            mask = t.loss_mask_T.astype(bool)
            mask[0] = False
            rho = np.exp(_model_logprobs(hf_init, t.token_ids_T) - t.logprobs_T)[mask]
            outside += int(((rho < band[0]) | (rho > band[1])).sum())
            total += int(mask.sum())
            trained += 1
    assert out["void_truncated"] == 1 and out["void_no_answer"] == 1 and out["trained_trajectories"] == trained
    assert out["tokens"] == total and 0.2 < outside / total < 0.8
    assert out["is_masked_frac"] == pytest.approx(outside / total, abs=0.5 / total)
    assert out["is_cap_frac"] == 0.0 and 0.0 < out["is_ess"] < 1.0


def test_a_lost_object_is_a_counted_drop_not_a_crash(ray_session, learner1, hf_init):
    """A served group whose objects are gone (their owner died, as when a node leaves) is left out
    by every rank and reported in `lost_groups`; the other groups are trained."""
    import ray

    @ray.remote(num_cpus=0)
    class Owner:
        def put(self, items):
            return [ray.put(x) for x in items]

    groups = make_groups(hf_init, seed=7)
    owner = Owner.remote()
    orphaned = ray.get(owner.put.remote(groups[1]))  # refs owned by `owner`
    ray.kill(owner)
    time.sleep(1.0)
    kept = [ray.put(x) for x in groups[0]]
    metrics = learner1.train_step([kept, orphaned])
    assert metrics["lost_groups"] == [1]
    assert metrics["trajectories"] == len(groups[0])  # the kept group was trained on


def test_the_probe_finds_a_stopped_rank_then_a_dead_one(ray_session, tiny_model_dir):
    """While the driver waits for a batch it calls `probe()` every round: nothing while the ranks
    answer its pings; `LearnerHung` naming `recovery.call_timeout_s` once a rank has answered none
    for that long (SIGSTOPped: alive to Ray); Ray's own error once the rank is dead."""
    import ray

    from cir_actors.learning.learner import Learner

    learner = Learner(_cfg(**{"recovery.call_timeout_s": 2}), tiny_model_dir, name="test-learner-probe")
    pid = ray.get(learner.ranks[0].__ray_call__.remote(lambda _: os.getpid()), timeout=60)

    def rounds(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            learner.probe(every_s=0.2)
            time.sleep(0.1)

    try:
        rounds(1.5)  # pinged several times and answered: nothing raised
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(LearnerHung, match=r"answered no ping for \d+ s between steps \(recovery.call_timeout_s\)"):
            rounds(30)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayActorError):
            rounds(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        learner.shutdown()
