"""Trajectory dumps and turn-indexed diagnostics: the dump round trip (every field survives), the
stratified choice, the clip states against `loss.policy_loss`'s own counts, the turn buckets on a
hand-built batch with known answers, and the real learner's per-token values on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cir_actors.config import load_config
from cir_actors.learning import dumps
from cir_actors.learning.loss import policy_loss
from cir_actors.types import FinishReason, ScoredTrajectory, Trajectory, Verdict, VerdictReason


def _traj(mask, prompt_len=3, finish=FinishReason.STOP, errors=0, tool_calls=()):
    T = len(mask)
    mask = np.asarray(mask, np.int8)
    rng = np.random.default_rng(T)
    lp = np.where(mask > 0, -rng.random(T), 0.0).astype(np.float32)
    versions = np.where(mask > 0, 2, -1).astype(np.int32)
    return Trajectory("task-7", 1, np.arange(10, 10 + T, dtype=np.int32), mask, lp, versions, prompt_len, finish, 2,
                      num_code_blocks=len(tool_calls), num_executed=len(tool_calls), num_interp_errors=errors,
                      response_text="x = 1\n```output\n1\n```", tool_calls=tuple(tool_calls))  # fmt: skip


def test_dump_round_trip_keeps_every_field(tmp_path):
    calls = ({"code": "print(1/0)", "ok": False, "error": "ZeroDivisionError: division by zero", "output": "",
              "duration_s": 0.012},)  # fmt: skip
    t = _traj([0, 0, 0, 1, 1, 0, 0, 1, 1, 1], errors=1, tool_calls=calls)
    s = ScoredTrajectory(t, Verdict(False, "5", VerdictReason.WRONG, 0.003), -1.0)
    lcfg = load_config(None, []).learner
    prox = t.logprobs_T + 0.05
    cur = prox + 0.3
    rec = dumps.build_record(s, prox, cur, -0.7, pieces=[f"p{i}" for i in range(10)], trained=True, group=4,
                             lcfg=lcfg)  # fmt: skip
    figures = dumps.write_step(tmp_path, 12, [rec], max_bytes=1 << 20)
    path = tmp_path / "trajectories" / "step_000012.msgpack"
    assert figures == {"dump/trajectories": 1, "dump/omitted": 0, "dump/bytes": path.stat().st_size}
    header, (back,) = dumps.read_step(path)
    assert header["step"] == 12 and header["records"] == 1
    assert back.keys() == rec.keys()
    for k, v in rec.items():
        if isinstance(v, np.ndarray):
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
        else:
            assert back[k] == v, k
    assert list(back["provenance"]) == [0, 0, 0, 1, 1, 2, 2, 1, 1, 1]
    assert list(back["turn"]) == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert list(back["since_tool"]) == [-1] * 7 + [0, 1, 2]
    assert back["kind"] == "tool_error" and back["extracted_answer"] == "5"
    assert back["tool_calls"][0]["duration_s"] == 0.012
    # ratio exp(0.3) = 1.35 > 1 + clip_high, but the advantage is negative: no clip; weight exp(0.05)
    assert np.allclose(back["ratio"][back["loss_mask"] > 0], np.exp(0.3), rtol=1e-5)
    assert (back["clip"] == dumps.CLIP_NONE).all()
    assert np.allclose(back["is_weight"][back["loss_mask"] > 0], np.exp(0.05), rtol=1e-5)


def test_size_bound_leaves_records_out_and_counts_them(tmp_path):
    t = _traj([0, 0, 0] + [1] * 500)
    s = ScoredTrajectory(t, Verdict(True, "1", VerdictReason.CORRECT), 1.0)
    rec = dumps.build_record(s, t.logprobs_T, None, 0.0, pieces=["a"] * 503, trained=False, group=0,
                             lcfg=load_config(None, []).learner)  # fmt: skip
    one = dumps.write_step(tmp_path, 1, [rec], max_bytes=1 << 20)["dump/bytes"]
    figures = dumps.write_step(tmp_path, 2, [rec] * 5, max_bytes=int(2.5 * one))
    assert figures["dump/trajectories"] == 2 and figures["dump/omitted"] == 3
    assert figures["dump/bytes"] <= 2.5 * one
    assert dumps.write_step(tmp_path, 3, [], max_bytes=100) == {"dump/trajectories": 0, "dump/omitted": 0,
                                                               "dump/bytes": 0}  # fmt: skip
    assert not dumps.dump_path(tmp_path, 3).exists()


def test_stratified_choice_takes_every_kind_first():
    kinds = ["correct"] * 5 + ["wrong"] * 3 + ["tool_error", "truncated"]
    picked = dumps.select_stratified(kinds, 6)
    assert [kinds[i] for i in picked] == ["correct", "wrong", "tool_error", "truncated", "correct", "wrong"]
    assert dumps.select_stratified(kinds, 0) == []
    assert sorted(dumps.select_stratified(kinds, 50)) == list(range(10))


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_clip_states_agree_with_the_loss(adv_sign):
    rng = np.random.default_rng(0)
    T = 400
    mask = (rng.random(T) > 0.3).astype(np.int8)
    b = -rng.random(T).astype(np.float32)
    p = b + 0.4 * rng.standard_normal(T).astype(np.float32)
    c = p + 0.4 * rng.standard_normal(T).astype(np.float32)
    adv = adv_sign * 0.8
    kw = {"clip_low": 0.2, "clip_high": 0.28, "is_cap": 2.0, "dual_clip": 3.0}
    vals = dumps.token_values(b, p, c, adv, mask, **kw)
    _, diag = policy_loss(*(torch.from_numpy(x)[None] for x in (c, p, b)), torch.tensor([adv]),
                          torch.from_numpy(mask.astype(np.float32))[None], **kw)  # fmt: skip
    n = mask.sum()
    assert (vals["clip"] == dumps.CLIP_LOW).sum() / n == pytest.approx(diag["clip_frac_low"])
    assert (vals["clip"] == dumps.CLIP_HIGH).sum() / n == pytest.approx(diag["clip_frac_high"])
    assert (vals["clip"] == dumps.CLIP_DUAL).sum() / n == pytest.approx(diag["dual_clip_frac"])
    assert vals["is_weight"].sum() / n == pytest.approx(diag["is_weight_mean"], rel=1e-5)
    assert vals["is_weight"].max() == pytest.approx(diag["is_weight_max"], rel=1e-5)
    assert (vals["clip"] != 0).sum() > 0


def test_turn_sums_on_a_hand_built_batch():
    lcfg = load_config(None, []).learner
    # prompt 2 | turn 0: 3 sampled | output 2 (an error) | turn 1: 2 sampled | output 1 | turn 2: 4 sampled
    mask = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1], np.int8)
    b = np.where(mask > 0, -1.0, 0.0)
    p = b.copy()
    p[7:9] = -1.0 + np.log(2.0)  # turn 1: weight exp(p - b) = 2, kl = 2 - 1 - ln 2
    p[10] = np.log(0.001)  # low-probability token, first after the second output
    calls = [{"ok": False}, {"ok": True}]
    sums = dumps.turn_sums(b, p, p, 1.0, mask, 2, calls, lcfg=lcfg)
    m = dumps.turn_metrics(sums)
    assert m["turn/turn0/tokens"] == 3 and m["turn/turn1/tokens"] == 2 and m["turn/turn2/tokens"] == 4
    assert m["turn/turn1/is_weight_mean"] == pytest.approx(2.0)
    assert m["turn/turn1/mismatch_kl"] == pytest.approx(1 - np.log(2.0))
    assert m["turn/turn0/mismatch_kl"] == 0.0 and m["turn/turn0/is_weight_max"] == 1.0
    assert m["turn/turn1/tool_errors"] == 1 and m["turn/turn2/tool_errors"] == 0
    assert m["turn/turn2/low_prob_rate"] == pytest.approx(0.25)
    # distance from the last output: 0-7 covers every token after an output, none before the first
    assert m["turn/dist0-7/tokens"] == 6 and "turn/dist8-31/tokens" not in m
    merged = dumps.merge_turn_sums([sums, sums])
    assert dumps.turn_metrics(merged)["turn/turn1/tokens"] == 4
    assert dumps.turn_metrics(merged)["turn/turn1/is_weight_max"] == pytest.approx(2.0)


def test_learner_records_carry_its_own_logprobs(ray_session, tiny_model_dir):
    """Two optimizer updates in the step: the proximal log-probs are the initial model's (checked
    against a plain transformers forward), the current ones of the second mini-batch are not."""
    from test_learner import OVERRIDES, _hf_model, _model_logprobs, make_groups

    from cir_actors.learning.learner import Learner

    hf = _hf_model(tiny_model_dir)
    groups = make_groups(hf, seed=3, noise=0.3)
    learner = Learner(load_config(None, OVERRIDES), tiny_model_dir, name="test-dumps-learner")
    try:
        out = learner.train_step(groups, record=16)
    finally:
        learner.shutdown()
    recs = out["records"]
    assert len(recs) == sum(len(g) for g in groups) == 14  # fewer than asked: all of them
    assert any(not r["trained"] for r in recs)  # zero-advantage groups are dumped too (proximal only)
    assert any(k.startswith("turn/turn1/") for k in out)
    by_key = {(g[0].trajectory.task_id, s.trajectory.sample_index): s for g in groups for s in g}
    moved = 0
    for r in recs:
        s = by_key[(r["task_id"], r["sample_index"])]
        m = r["loss_mask"] > 0
        ref = _model_logprobs(hf, s.trajectory.token_ids_T)
        assert np.abs(r["proximal_logprob"][m] - ref[m]).max() < 1e-4
        assert np.array_equal(r["behaviour_logprob"], s.trajectory.logprobs_T)
        assert len(r["pieces"]) == len(r["token_ids"])
        gap = np.abs(r["current_logprob"][m] - r["proximal_logprob"][m]).max()
        if r["group"] < 4 or not r["trained"]:
            assert gap < 1e-4  # first mini-batch: the loss forward ran on the step-start weights
        else:
            moved += gap > 1e-3
    assert moved > 0


def test_samples_table_in_offline_wandb(tmp_path, monkeypatch):
    """dump_step logs the records as a W&B table when a run is active (offline: files on disk)."""
    wandb = pytest.importorskip("wandb", reason="wandb is a dependency of the project; install it")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls = ({"code": "print(2+3)", "ok": True, "error": None, "output": "5", "duration_s": 0.01},)
    t = _traj([0, 0, 0, 1, 1, 0, 0, 1, 1, 1], tool_calls=calls)
    s = ScoredTrajectory(t, Verdict(True, "5", VerdictReason.CORRECT), 1.0)
    cfg = load_config(None, [])
    rec = dumps.build_record(s, t.logprobs_T, None, 0.0, pieces=[f"<{i}>" for i in range(10)], trained=False,
                             group=0, lcfg=cfg.learner)  # fmt: skip
    run = wandb.init(project="cir-actors-test", dir=str(tmp_path), mode="offline")
    try:
        figures = dumps.dump_step(tmp_path, 3, [rec], cfg)
    finally:
        run.finish()
    assert figures["dump/trajectories"] == 1
    (table_file,) = list(tmp_path.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    import json

    table = json.loads(table_file.read_text())
    assert table["columns"] == list(dumps.TABLE_COLUMNS)
    (row,) = table["data"]
    assert row[4] == "<0><1><2>" and row[5] == "<3><4><5><6><7><8><9>"  # problem, response
    assert row[6] == 1.0 and row[7] == "correct" and row[8] == "5" and json.loads(row[10])[0]["output"] == "5"
