"""The vLLM-backed generator on the tiny model: real engine, real interpreter pool, real Ray actor."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from cir_actors.data.loaders import make_task
from cir_actors.generation.rollout import run_rollout
from cir_actors.learning.weight_sync import fingerprint
from cir_actors.types import FinishReason, GroupRequest, PolicyUpdate, Task

pytestmark = pytest.mark.slow


def clean_token_ids(tokenizer) -> list[int]:
    """Ids that decode on their own to plain ASCII words (no fences, no partial UTF-8 bytes)."""
    ids = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if text and text.isascii() and text.isprintable() and "`" not in text and i not in tokenizer.all_special_ids:
            ids.append(i)
    return ids


def with_suffix(task: Task, tokenizer, suffix: str) -> Task:
    ids = list(task.prompt_token_ids) + tokenizer.encode(suffix, add_special_tokens=False)
    return Task(task.task_id, task.problem, task.gold, task.prompt_text + suffix, tuple(ids))


class Recorder:
    """Wraps the generator's sampler and records every delta the engine streamed."""

    def __init__(self, gen, **changes):
        self.gen, self.changes = gen, changes
        self.deltas = []
        self.first_tokens = asyncio.Event()

    async def open(self, token_ids, max_tokens):
        inner = await self.gen.open(token_ids, max_tokens, **self.changes)
        return RecordingStream(inner, self)


class RecordingStream:
    def __init__(self, inner, rec):
        self.inner, self.rec, self.version = inner, rec, inner.version

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        async for delta in self.inner:
            self.rec.deltas.append((self.version, delta))
            if delta.token_ids:
                self.rec.first_tokens.set()
            yield delta

    async def aclose(self):
        await self.inner.aclose()


def run_recorded(local, task, budget, **changes):
    gen = local.gen
    rec = Recorder(gen, **changes)
    traj = local.run(
        run_rollout(task, 0, budget, sampler=rec, interpreter=gen._interpreter, codec=gen._codec,
                    format_output=gen._format_output, limits=gen._limits),
        timeout=120,
    )
    return traj, rec


@pytest.fixture(scope="module")
def task(tiny_generator):
    return make_task("mul", "What is 6 times 7?", "42", tiny_generator.gen.tokenizer, use_chat_template=True)


def check_arrays(traj):
    n = len(traj.token_ids_T)
    assert len(traj.loss_mask_T) == len(traj.logprobs_T) == len(traj.versions_T) == n
    sampled = traj.loss_mask_T.astype(bool)
    assert not sampled[: traj.prompt_len].any()
    assert (traj.versions_T[~sampled] == -1).all() and (traj.logprobs_T[~sampled] == 0).all()
    assert (traj.versions_T[sampled] >= 0).all() and (traj.logprobs_T[sampled] <= 0).all()


def test_prompt_block_is_executed_and_the_model_continues(tiny_generator, task):
    gen = tiny_generator.gen
    tok = gen.tokenizer
    clean = clean_token_ids(tok)
    t = with_suffix(task, tok, "```python\nprint(6*7)\n```")
    traj, rec = run_recorded(tiny_generator, t, budget=2, allowed_token_ids=clean + [tok.eos_token_id])
    check_arrays(traj)
    assert traj.num_executed == 1 and traj.tool_calls[0]["ok"] and traj.tool_calls[0]["output"] == "\n```output\n42\n```\n"
    out_ids = tok.encode(traj.tool_calls[0]["output"], add_special_tokens=False)
    resp = traj.token_ids_T[traj.prompt_len :].tolist()
    mask = traj.loss_mask_T[traj.prompt_len :].tolist()
    assert resp[: len(out_ids)] == out_ids and mask[: len(out_ids)] == [0] * len(out_ids)
    assert mask[len(out_ids) :] == [1] * (len(resp) - len(out_ids)) and traj.num_sampled > 0
    # Token-in, token-out: the sampled ids are exactly the engine's, and their decode is the engine's text.
    engine_ids = [i for _, d in rec.deltas for i in d.token_ids]
    assert resp[len(out_ids) :] == engine_ids
    engine_text = "".join(d.text for _, d in rec.deltas)
    assert traj.response_text == traj.tool_calls[0]["output"] + engine_text
    assert tok.decode(resp, skip_special_tokens=True) == traj.response_text
    assert traj.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def test_model_closed_block_stops_the_stream_and_runs(tiny_generator, task):
    gen = tiny_generator.gen
    tok = gen.tokenizer
    fence = tok.convert_tokens_to_ids("```")
    t = with_suffix(task, tok, "```python\nprint(6*7)\n")
    # Bias the random model toward the closing fence so that it closes the block the prompt opened.
    traj, _ = run_recorded(tiny_generator, t, budget=1, logit_bias={fence: 30.0})
    check_arrays(traj)
    assert traj.num_code_blocks >= 1 and traj.num_executed == 1
    assert traj.tool_calls[0]["code"] == "print(6*7)" and "42" in traj.tool_calls[0]["output"]
    first_resp = traj.token_ids_T[traj.prompt_len]
    assert first_resp == fence and traj.loss_mask_T[traj.prompt_len + 1] == 0  # output right after the fence
    assert traj.response_text.startswith("```\n```output\n42\n```\n")
    assert tok.decode(traj.token_ids_T[traj.prompt_len :].tolist(), skip_special_tokens=True) == traj.response_text


def test_group_rollouts_run_concurrently(tiny_generator, task):
    trajs = tiny_generator.run(tiny_generator.gen.generate_group(GroupRequest(7, task, 4, 2, 0)), timeout=120)
    assert [t.sample_index for t in trajs] == [0, 1, 2, 3]
    for traj in trajs:
        check_arrays(traj)
        assert traj.prompt_len == len(task.prompt_token_ids) and traj.finish_reason != FinishReason.ABORTED
    # Four random samples of a 512-token vocabulary do not coincide.
    assert len({tuple(t.token_ids_T.tolist()) for t in trajs}) == 4


def perturbed_state_dict(model_dir, seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_greedy(model, prompt, n):
    ids = list(prompt)
    lps = []
    with torch.no_grad():
        for _ in range(n):
            logp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            nxt = int(logp.argmax())
            lps.append(float(logp[nxt]))
            ids.append(nxt)
    return ids[len(prompt) :], lps


def test_update_weights_matches_transformers(tiny_generator, tiny_model_dir, task):
    gen = tiny_generator.gen
    before = gen.served_version()
    model, sd = perturbed_state_dict(tiny_model_dir, seed=before + 1)
    served = tiny_generator.run(gen.update_weights(PolicyUpdate(before + 1, 3, sd, fingerprint(sd.items()))))
    assert served.version == before + 1 == gen.served_version() and served.budget == 3
    assert served.checksum == fingerprint(sd.items())

    prompt = list(task.prompt_token_ids)
    ids, lps = tiny_generator.run(gen.sample(prompt, 24, ignore_eos=True))
    hf_ids, hf_lps = hf_greedy(model, prompt, 24)
    assert ids == hf_ids
    sample_diff = float(np.max(np.abs(np.array(lps) - np.array(hf_lps))))
    (vllm_lp,) = tiny_generator.run(gen.compute_logprobs([prompt + ids]))
    with torch.no_grad():
        ref = model(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
    full = prompt + ids
    ref_lp = np.array([0.0] + [float(ref[t - 1, full[t]]) for t in range(1, len(full))])
    prompt_diff = float(np.max(np.abs(vllm_lp - ref_lp)))
    print(f"\nmax |logprob diff| vLLM vs transformers after update (fp32): sampled {sample_diff:.2e}, "
          f"prompt {prompt_diff:.2e}")
    assert sample_diff < 1e-4 and prompt_diff < 1e-4


def test_checksum_mismatch_is_refused(tiny_generator, tiny_model_dir, task):
    gen = tiny_generator.gen
    before = gen.served_policy()
    prompt = list(task.prompt_token_ids)
    (lp_before,) = tiny_generator.run(gen.compute_logprobs([prompt]))
    _, sd = perturbed_state_dict(tiny_model_dir, seed=99)
    with pytest.raises(Exception, match="fingerprint"):
        tiny_generator.run(gen.update_weights(PolicyUpdate(before.version + 1, 2, sd, "0000000000000000")))
    assert gen.served_policy() == before
    (lp_after,) = tiny_generator.run(gen.compute_logprobs([prompt]))
    np.testing.assert_array_equal(lp_before, lp_after)  # nothing was loaded


def test_an_older_version_never_replaces_a_newer_one(tiny_generator, tiny_model_dir):
    """Updates race: a generator restarted with a resume gets its initial update from its own run
    loop and newer versions from the scheduler. The one that gets the lock after a newer version
    was loaded is not loaded: the newer weights stay, and it answers what is served."""
    gen = tiny_generator.gen
    v = gen.served_version()
    _, new = perturbed_state_dict(tiny_model_dir, seed=v + 11)
    _, old = perturbed_state_dict(tiny_model_dir, seed=v + 12)

    async def both():
        newer = asyncio.create_task(gen.update_weights(PolicyUpdate(v + 2, 2, new, fingerprint(new.items()))))
        await asyncio.sleep(0)  # the newer one takes the lock first
        older = asyncio.create_task(gen.update_weights(PolicyUpdate(v + 1, 2, old, fingerprint(old.items()))))
        return await newer, await older

    first, second = tiny_generator.run(both(), timeout=120)
    assert first.version == second.version == gen.served_version() == v + 2
    assert second.checksum == gen.served_policy().checksum == fingerprint(new.items())


def test_a_retired_engine_loads_nothing_of_its_old_incarnation(tiny_generator, tiny_model_dir):
    """A resume keeps the engine (RolloutWorker.detach retires it): it serves version -1, so it is
    admitted to no work, until the next incarnation's first update loads, whatever that version's
    number. An update of the old incarnation under way at the retirement leaves it at -1, and one
    its dead scheduler sent late is not loaded, before or after the new incarnation's."""
    gen = tiny_generator.gen
    before = gen.served_version()
    gen.forget_version()  # incarnation 0, whatever other tests loaded
    v = 7
    _, old = perturbed_state_dict(tiny_model_dir, seed=31)
    _, late = perturbed_state_dict(tiny_model_dir, seed=32)
    _, new = perturbed_state_dict(tiny_model_dir, seed=33)
    try:
        async def retired_while_loading():
            loading = asyncio.create_task(gen.update_weights(PolicyUpdate(v, 2, old, fingerprint(old.items()))))
            while not gen._update_lock.locked():  # it holds the update lock, loading
                await asyncio.sleep(0)
            gen.retire()
            return await loading

        under_way = tiny_generator.run(retired_while_loading(), timeout=120)
        assert under_way.version == gen.served_version() == -1
        assert under_way.checksum == fingerprint(old.items())  # loaded, but not served as any version
        sent_late = tiny_generator.run(gen.update_weights(PolicyUpdate(v + 1, 2, late, fingerprint(late.items()))),
                                       timeout=120)
        assert sent_late.version == -1 and sent_late.checksum == fingerprint(old.items())
        resumed = PolicyUpdate(v - 3, 2, new, fingerprint(new.items()), incarnation=1)  # a lower number
        first = tiny_generator.run(gen.update_weights(resumed), timeout=120)
        assert first.version == v - 3 and first.checksum == fingerprint(new.items())
        after = tiny_generator.run(gen.update_weights(PolicyUpdate(v + 2, 2, late, fingerprint(late.items()))),
                                   timeout=120)
        assert after.version == v - 3 and after.checksum == fingerprint(new.items())
    finally:  # the version the next tests expect (weights change in every test: they load their own)
        gen.forget_version()
        tiny_generator.run(gen.update_weights(PolicyUpdate(max(before, 0), 2)), timeout=60)


def test_interrupted_trajectory_carries_both_versions(tiny_generator, tiny_model_dir, task):
    gen = tiny_generator.gen
    policy = gen.cfg.generator.update_policy
    gen.cfg.generator.update_policy = "interrupt"
    try:
        v = gen.served_version()
        _, sd = perturbed_state_dict(tiny_model_dir, seed=v + 7)
        rec = Recorder(gen, ignore_eos=True)

        async def scenario():
            roll = asyncio.create_task(
                run_rollout(task, 0, 0, sampler=rec, interpreter=gen._interpreter, codec=gen._codec,
                            format_output=gen._format_output, limits=gen._limits)
            )
            await rec.first_tokens.wait()
            served = await gen.update_weights(PolicyUpdate(v + 1, 2, sd, fingerprint(sd.items())))
            return await roll, served

        interrupted = gen.stats["interrupted_requests"]
        traj, served = tiny_generator.run(scenario(), timeout=120)
    finally:
        gen.cfg.generator.update_policy = policy
    check_arrays(traj)
    assert served.version == v + 1
    sampled_versions = traj.versions_T[traj.prompt_len :]
    assert set(sampled_versions.tolist()) == {v, v + 1}
    assert (np.diff(sampled_versions) >= 0).all()  # old weights first, then new
    assert traj.finish_reason == FinishReason.LENGTH and traj.response_len == gen.cfg.generator.max_response_tokens
    assert gen.stats["interrupted_requests"] == interrupted + 1
    # The continuation re-submitted exactly the tokens so far.
    assert [i for _, d in rec.deltas for i in d.token_ids] == traj.token_ids_T[traj.prompt_len :].tolist()


def test_finish_policy_waits_for_trajectories_in_flight(tiny_generator, tiny_model_dir, task):
    gen = tiny_generator.gen
    assert gen.cfg.generator.update_policy == "finish"
    v = gen.served_version()
    _, sd = perturbed_state_dict(tiny_model_dir, seed=v + 11)

    async def scenario():
        requests = gen.stats["requests"]
        roll = asyncio.create_task(gen.rollout(task, 0, 0, sampling={"ignore_eos": True}))
        while gen.stats["requests"] == requests:
            await asyncio.sleep(0.01)
        served = await gen.update_weights(PolicyUpdate(v + 1, 2, sd, fingerprint(sd.items())))
        assert roll.done()  # the update waited for the trajectory
        after = await gen.rollout(task, 1, 0)
        return roll.result(), served, after

    traj, served, after = tiny_generator.run(scenario(), timeout=120)
    assert served.version == v + 1
    assert set(traj.versions_T[traj.prompt_len :].tolist()) == {v}
    assert set(after.versions_T[after.prompt_len :].tolist()) == {v + 1}


def test_generator_as_ray_actor(ray_session, tiny_model_dir, task):
    ray = ray_session
    from transformers import AutoTokenizer

    from cir_actors.config import load_config
    from cir_actors.generation.generator import Generator
    from cir_actors.sandbox.pool import InterpreterPool, RayInterpreter

    cfg = load_config(None, ["generator.max_response_tokens=48", "generator.max_inflight_trajectories=8"])
    pool = ray.remote(InterpreterPool).options(num_cpus=0.5, max_concurrency=16).remote(cfg.interpreter)
    actor = ray.remote(Generator).options(num_cpus=1, max_concurrency=32).remote(
        cfg, str(tiny_model_dir), RayInterpreter(pool), name="generator-7"
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        t = with_suffix(task, tokenizer, "```python\nprint(2**10)\n```")
        trajs = ray.get(actor.generate_group.remote(GroupRequest(1, t, 3, 1, 0)), timeout=180)
        assert len(trajs) == 3
        for traj in trajs:
            check_arrays(traj)
            assert traj.tool_calls[0]["output"] == "\n```output\n1024\n```\n"
        _, sd = perturbed_state_dict(tiny_model_dir, seed=5)
        ref = ray.put(sd)
        served = ray.get(actor.update_weights.remote(PolicyUpdate(4, 3, ref, fingerprint(sd.items()))), timeout=120)
        assert (served.generator, served.version, served.budget) == ("generator-7", 4, 3)
        assert ray.get(actor.served_version.remote()) == 4
    finally:
        ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor)
        ray.kill(pool)


def test_update_by_collective_broadcast(tiny_generator, tiny_model_dir, task):
    """The learner's broadcast path: a BroadcastSender here, the receiver inside the engine process."""
    import threading

    from cir_actors.learning.weight_sync import BroadcastSender, TensorSpec

    gen = tiny_generator.gen
    v = gen.served_version()
    model, sd = perturbed_state_dict(tiny_model_dir, seed=v + 23)
    sender = BroadcastSender(num_receivers=1, backend="gloo", bucket_bytes=1 << 16)
    specs = [TensorSpec(k, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in sd.items()]
    sent: dict[str, str] = {}
    thread = threading.Thread(target=lambda: sent.setdefault("fp", sender.send(v + 1, specs, sd.values())))
    thread.start()
    try:
        update = PolicyUpdate(v + 1, 2, None, fingerprint(sd.items()), broadcast_group=sender.address)
        served = tiny_generator.run(gen.update_weights(update), timeout=120)
    finally:
        thread.join(timeout=60)
        sender.close()
    assert sent["fp"] == served.checksum == fingerprint(sd.items()) and served.version == v + 1
    prompt = list(task.prompt_token_ids)
    (lp,) = tiny_generator.run(gen.compute_logprobs([prompt]))
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    ref_lp = np.array([0.0] + [float(ref[t - 1, prompt[t]]) for t in range(1, len(prompt))])
    assert float(np.max(np.abs(lp - ref_lp))) < 1e-4


def test_update_through_shared_memory(tiny_generator, tiny_model_dir, task):
    """The shared-memory path through the real engine: version v+1 is loaded while v+2 is half
    written into the other slot; fingerprints verified, log-probs those of transformers; a late
    reader (its slot rewritten) and a wrong checksum are refused with the old weights still served;
    nothing is left under /dev/shm once the writer is closed."""
    import threading
    from pathlib import Path

    from cir_actors.generation.engine_weights import WeightMismatchError
    from cir_actors.learning.shared_weights import SHM_DIR, SharedWeightsWriter, region_prefix
    from cir_actors.learning.weight_sync import TensorSpec

    gen = tiny_generator.gen
    v = gen.served_version()
    _, sd1 = perturbed_state_dict(tiny_model_dir, seed=v + 31)
    model2, sd2 = perturbed_state_dict(tiny_model_dir, seed=v + 32)
    writer = SharedWeightsWriter([TensorSpec(k, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                                  for k, t in sd1.items()])  # fmt: skip
    prompt = list(task.prompt_token_ids)
    try:
        where1, fp1 = writer.write(v + 1, sd1.values(), checksum=True)
        loaded = threading.Event()

        def half_then_wait():
            for i, t in enumerate(sd2.values()):
                if i == len(sd2) // 2:
                    assert loaded.wait(120)
                yield t

        out: dict = {}
        thread = threading.Thread(target=lambda: out.setdefault("v2", writer.write(v + 2, half_then_wait(), checksum=True)))
        thread.start()
        try:
            served = tiny_generator.run(gen.update_weights(PolicyUpdate(v + 1, 2, None, fp1, shared_memory=where1)),
                                        timeout=120)  # fmt: skip
        finally:
            loaded.set()
            thread.join(60)
        assert served.version == v + 1 and served.checksum == fp1 == fingerprint(sd1.items())
        where2, fp2 = out["v2"]
        assert where2.slot != where1.slot
        served = tiny_generator.run(gen.update_weights(PolicyUpdate(v + 2, 2, None, fp2, shared_memory=where2)),
                                    timeout=120)  # fmt: skip
        assert served.checksum == fp2 == fingerprint(sd2.items())
        (lp_before,) = tiny_generator.run(gen.compute_logprobs([prompt]))

        where3, _ = writer.write(v + 3, sd1.values(), checksum=True)  # into v+1's slot
        with pytest.raises(WeightMismatchError, match="holds version"):
            tiny_generator.run(gen.update_weights(PolicyUpdate(v + 4, 2, None, fp1, shared_memory=where1)), timeout=120)
        with pytest.raises(WeightMismatchError, match="fingerprint"):
            tiny_generator.run(gen.update_weights(PolicyUpdate(v + 3, 2, None, fp2, shared_memory=where3)), timeout=120)
        assert gen.served_policy().checksum == fp2 and gen.served_version() == v + 2
        (lp_after,) = tiny_generator.run(gen.compute_logprobs([prompt]))
        np.testing.assert_array_equal(lp_before, lp_after)  # nothing was loaded
    finally:
        writer.close()
    assert not Path(writer.path).exists() and not list(SHM_DIR.glob(f"{region_prefix()}*"))
    with torch.no_grad():
        ref = model2(torch.tensor([prompt])).logits[0].log_softmax(-1)
    ref_lp = np.array([0.0] + [float(ref[t - 1, prompt[t]]) for t in range(1, len(prompt))])
    assert float(np.max(np.abs(lp_after - ref_lp))) < 1e-4
