"""PPO / policy-gradient / KL losses, advantages and schedules on hand-derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner.advantages import PerPromptStatTracker, batch_advantages, clip_advantages, group_advantages
from learner.losses import gaussian_kl, policy_gradient_loss, ppo_clip_loss
from learner.schedules import linear_ramp


def test_ppo_clip_loss_hand_values_and_gradient():
    log_prob = torch.tensor([0.0, math.log(1.5), math.log(0.5)], requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, stats = ppo_clip_loss(log_prob, old, adv, clip_range=0.2)
    # ratios 1, 1.5, 0.5 -> terms max(-1,-1) = -1; max(-1.5,-1.2) = -1.2; max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx((-1.0 - 1.2 + 0.8) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3, rel=1e-6)
    loss.backward()
    # Only the unclipped pair carries gradient: d/dlogp (-A ρ)/3 = -1/3 at ρ = 1.
    torch.testing.assert_close(log_prob.grad, torch.tensor([-1 / 3, 0.0, 0.0]))


def test_ppo_rejects_non_positive_clip_range():
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), clip_range=0.0)


def test_policy_gradient_loss_hand_values_and_sign():
    log_prob = torch.tensor([0.1, 0.2, -0.3], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = policy_gradient_loss(log_prob, torch.zeros(3), adv)
    assert loss.item() == pytest.approx(-(0.1 - 0.4 - 0.15) / 3)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -adv / 3)  # descent raises log-probs of positive advantages
    assert stats["clipfrac"].item() == 0.0


def test_gaussian_kl_hand_values():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.zeros(2, 2)
    kl = gaussian_kl(mean, ref, torch.tensor(2.0))
    torch.testing.assert_close(kl, torch.tensor([(1 / 8 + 4 / 8) / 2, 0.0]))
    # Per-sample std [B, 1] broadcasts: sample 0 with std 1 -> (1/2 + 4/2)/2.
    kl = gaussian_kl(mean, ref, torch.tensor([[1.0], [3.0]]))
    torch.testing.assert_close(kl, torch.tensor([1.25, 0.0]))
    # Equals the KL of two diagonal Gaussians with equal variance (torch.distributions), per dim mean.
    p = torch.distributions.Normal(mean, 2.0)
    q = torch.distributions.Normal(ref, 2.0)
    torch.testing.assert_close(gaussian_kl(mean, ref, torch.tensor(2.0)),
                               torch.distributions.kl_divergence(p, q).mean(dim=1))


def test_per_prompt_stat_tracker_hand_values():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    adv = tracker.update(["a", "a", "b"], np.array([1.0, 3.0, 10.0]))
    glob_mean, glob_std = 14 / 3, math.sqrt(((1 - 14 / 3) ** 2 + (3 - 14 / 3) ** 2 + (10 - 14 / 3) ** 2) / 3)
    np.testing.assert_allclose(adv, [-1.0, 1.0, (10 - glob_mean) / glob_std], rtol=1e-5)
    # "a" now has [1, 3, 5] (mean 3, std sqrt(8/3)); the deque keeps only the last 3.
    adv = tracker.update(["a"], np.array([5.0]))
    np.testing.assert_allclose(adv, [2 / math.sqrt(8 / 3)], rtol=1e-5)
    adv = tracker.update(["a"], np.array([7.0]))  # history [3, 5, 7]
    np.testing.assert_allclose(adv, [2 / math.sqrt(8 / 3)], rtol=1e-5)
    restored = PerPromptStatTracker(buffer_size=1, min_count=1)
    restored.load_state_dict(tracker.state_dict())
    np.testing.assert_allclose(restored.update(["a"], np.array([9.0])), tracker.update(["a"], np.array([9.0])))


def test_batch_advantages_and_clipping():
    adv = batch_advantages(np.array([0.0, 2.0]))
    np.testing.assert_allclose(adv, [-1.0, 1.0], rtol=1e-5)
    np.testing.assert_array_equal(clip_advantages(np.array([-9.0, 0.5, 9.0]), max_abs=5.0), [-5.0, 0.5, 5.0])


def test_group_advantages_hand_values():
    """Groups 7: [1, 3] (mean 2, std 1); 2: [0, 1, 2] (mean 1, std sqrt(2/3)); 5: one sample; 9: a tie."""
    groups = np.array([7, 2, 7, 2, 2, 5, 9, 9])
    rewards = np.array([1.0, 0.0, 3.0, 1.0, 2.0, 4.0, 0.5, 0.5])
    s = math.sqrt(2 / 3)
    np.testing.assert_allclose(group_advantages(groups, rewards), [-1, -1 / s, 1, 0, 1 / s, 0, 0, 0], rtol=1e-5)
    assert group_advantages(groups, rewards).dtype == np.float32
    # No history: the same rewards shifted by +100 give the same advantages (a stat tracker's would not).
    np.testing.assert_allclose(group_advantages(groups, rewards + 100.0), group_advantages(groups, rewards),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="same 1-D shape"):
        group_advantages(groups[:3], rewards)


def test_linear_ramp():
    assert linear_ramp(0, start=0.0, end=1.0, ramp_epochs=4) == 0.0
    assert linear_ramp(2, start=0.0, end=1.0, ramp_epochs=4) == 0.5
    assert linear_ramp(10, start=0.0, end=1.0, ramp_epochs=4) == 1.0
    assert linear_ramp(3, start=0.2, end=None, ramp_epochs=4) == 0.2
