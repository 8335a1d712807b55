"""Advantage estimators against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from cir_actors.learning.advantages import compute_advantages


def test_grpo_group_normalised_with_unbiased_std():
    adv, stats = compute_advantages(
        [np.array([1.0, -1.0, 1.0, -1.0]), np.array([1.0, -1.0, -1.0, -1.0])], "grpo"
    )
    # group 1: mean 0, std (ddof=1) = sqrt(4/3); group 2: mean -0.5, deviations (1.5, -.5, -.5, -.5), std = 1
    np.testing.assert_allclose(adv[0], np.array([1, -1, 1, -1]) / np.sqrt(4 / 3), rtol=1e-5)
    np.testing.assert_allclose(adv[1], [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
    assert stats["zero_adv_groups"] == 0 and stats["groups"] == 2 and stats["samples"] == 8
    assert adv[0].dtype == np.float32


def test_mean_only_is_centered_reward():
    adv, _ = compute_advantages([np.array([1.0, 0.0, 0.0, 0.0])], "mean")
    np.testing.assert_allclose(adv[0], [0.75, -0.25, -0.25, -0.25], rtol=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "mean", "reinforce_pp"])
def test_all_equal_groups_contribute_nothing_and_are_counted(kind):
    adv, stats = compute_advantages(
        [
            np.array([1.0, 1.0, 1.0]),
            np.array([-1.0, 1.0, 1.0]),
            np.array([-1.0, -1.0, -1.0]),
            np.array([0.5]),
        ],
        kind,
    )
    assert stats["zero_adv_groups"] == 3
    for i in (0, 2, 3):
        assert np.all(adv[i] == 0.0)
    assert np.abs(adv[1]).sum() > 0


def test_reinforce_pp_baseline_then_batch_whitening():
    # centred: g1 = (1, -1), g2 = (1.5, -0.5, -0.5, -0.5); flat group excluded from the statistics
    groups = [np.array([1.0, -1.0]), np.array([1.0, -1.0, -1.0, -1.0]), np.array([2.0, 2.0])]
    adv, stats = compute_advantages(groups, "reinforce_pp", eps=0.0)
    x = np.array([1.0, -1.0, 1.5, -0.5, -0.5, -0.5])  # mean 0, population std sqrt(5.5/6)
    std = np.sqrt((x**2).mean())
    np.testing.assert_allclose(np.concatenate(adv[:2]), x / std, rtol=1e-6)
    assert np.all(adv[2] == 0) and stats["zero_adv_groups"] == 1


def test_reinforce_pp_token_weighted_whitening():
    groups = [np.array([1.0, -1.0])]
    tokens = [np.array([3.0, 1.0])]
    adv, _ = compute_advantages(groups, "reinforce_pp", eps=0.0, num_tokens_list=tokens)
    # token-level values: 1,1,1,-1 -> mean 0.5, std sqrt(0.75)
    np.testing.assert_allclose(adv[0], (np.array([1.0, -1.0]) - 0.5) / np.sqrt(0.75), rtol=1e-6)


def test_unknown_kind_is_one_clear_error():
    with pytest.raises(ValueError, match="advantage kind 'ppo'"):
        compute_advantages([np.array([1.0, 0.0])], "ppo")
