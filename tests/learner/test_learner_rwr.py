"""Reward-weighted regression: the weights, which samples an update uses, and the direction of an update."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from cluster.specs import default_learner_spec
from learner.algorithms.rwr import rwr_weights
from learner.dpo import per_sample_mse
from learner.learner import Learner

torch.set_num_threads(1)


def test_sparse_weights_keep_the_samples_above_their_groups_mean():
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 0.2, np.nan, 0.1])
    weights = rwr_weights(groups, rewards, weighting="sparse", temperature=1.0)
    # group 0: mean 0.5, the two 1s kept; group 1: all equal, no preference; group 2: NaN ignored, 0.2 > 0.15
    assert weights.tolist() == [1, 0, 0, 1, 0, 0, 0, 1, 0, 0]


def test_exponential_weights_are_exp_of_the_z_score_over_the_temperature():
    rewards = np.array([1.0, 2.0, 3.0])  # mean 2, population std sqrt(2/3): z = -1.2247, 0, 1.2247
    weights = rwr_weights(np.zeros(3, dtype=int), rewards, weighting="exponential", temperature=0.5)
    z = math.sqrt(1.5)
    assert weights == pytest.approx([math.exp(-z / 0.5), 1.0, math.exp(z / 0.5)], rel=1e-12)
    # a shift and a positive scale of the rewards leave the weights unchanged
    assert rwr_weights(np.zeros(3, dtype=int), 10 * rewards - 7, weighting="exponential",
                       temperature=0.5) == pytest.approx(weights, rel=1e-12)
    with pytest.raises(ValueError, match="weighting='hard'.*sparse"):
        rwr_weights(np.zeros(3, dtype=int), rewards, weighting="hard", temperature=1.0)


def _adapter(learner: Learner) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for _, p in learner.policy.named_trainable_parameters()])


def _errors(learner: Learner, trajectory, rows, t: int) -> torch.Tensor:
    """The policy's noise-prediction error on the final latents of ``rows`` noised to t (a fixed ε)."""
    policy = learner.policy
    x0 = torch.from_numpy(trajectory.latents[rows, -1])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    steps = torch.full((len(rows),), t)
    embeds = policy.encode_prompts([trajectory.prompts[i] for i in rows])
    with torch.no_grad():
        return per_sample_mse(policy.unet(policy.scheduler.add_noise(x0, eps, steps), steps, embeds).sample, eps)


def _spec(**overrides):
    values = {"algorithm": "rwr", "learning_rate": 1e-2, "rwr_weighting": "sparse", "rwr_noise_draws": 2,
              "updates_per_epoch": 1, "micro_batch_size": 8, "adam_weight_decay": 0.0, **overrides}
    return default_learner_spec(**values)


REWARDS = np.array([4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0], dtype=np.float32)  # kept: 0, 1, 6, 7


def test_an_update_trains_only_on_the_weighted_samples(cat_dog_policy_spec, cat_dog_trajectory):
    learner = Learner(policy_spec=cat_dog_policy_spec, spec=_spec())
    stats = learner.update(trajectories=[cat_dog_trajectory], rewards=[REWARDS], epoch=0)
    assert stats["rwr/n_weighted"] == 4 and stats["train/n_pairs"] == 8  # 4 samples x 2 noise draws
    assert stats["train/optimizer_steps"] == 1 and math.isfinite(stats["rwr/loss"])
    # the samples of weight 0 do not enter the update: replacing their latents changes nothing
    latents = cat_dog_trajectory.latents.copy()
    latents[[2, 3, 4, 5]] = np.random.default_rng(0).standard_normal(latents[[2, 3, 4, 5]].shape)
    other = Learner(policy_spec=cat_dog_policy_spec, spec=_spec())
    other.update(trajectories=[dataclasses.replace(cat_dog_trajectory, latents=latents)], rewards=[REWARDS], epoch=0)
    assert torch.equal(_adapter(learner), _adapter(other)) and _adapter(learner).abs().sum() > 0


def test_the_update_does_not_depend_on_the_micro_batch_size(cat_dog_policy_spec, cat_dog_trajectory):
    runs = []
    for micro in (8, 3):  # one pass of 8 (sample, draw) items, or parts of 3, 3 and 2 of the same weighted mean
        learner = Learner(policy_spec=cat_dog_policy_spec, spec=_spec(micro_batch_size=micro, rwr_weighting="exponential"))
        runs.append(learner.update(trajectories=[cat_dog_trajectory], rewards=[REWARDS], epoch=0))
    assert runs[1]["rwr/loss"] == pytest.approx(runs[0]["rwr/loss"], rel=1e-5)
    assert runs[1]["train/grad_norm"] == pytest.approx(runs[0]["train/grad_norm"], rel=1e-4)


def test_updates_lower_the_kept_samples_denoising_error_on_fresh_noise(cat_dog_policy_spec, cat_dog_trajectory):
    learner = Learner(policy_spec=cat_dog_policy_spec, spec=_spec())
    kept, dropped = [0, 1, 6, 7], [2, 3, 4, 5]
    before = {t: (_errors(learner, cat_dog_trajectory, kept, t).mean(), _errors(learner, cat_dog_trajectory, dropped, t).mean())
              for t in (100, 500)}
    for epoch in range(4):
        learner.update(trajectories=[dataclasses.replace(cat_dog_trajectory, policy_version=learner.version)],
                       rewards=[REWARDS], epoch=epoch)
    for t, (kept_before, dropped_before) in before.items():
        kept_after, dropped_after = _errors(learner, cat_dog_trajectory, kept, t).mean(), _errors(learner, cat_dog_trajectory,
                                                                                          dropped, t).mean()
        assert kept_after < kept_before  # the trained samples are denoised better
        assert kept_after - kept_before < dropped_after - dropped_before  # more so than the others


def test_no_preference_means_no_update(cat_dog_policy_spec, cat_dog_trajectory):
    learner = Learner(policy_spec=cat_dog_policy_spec, spec=_spec())
    stats = learner.update(trajectories=[cat_dog_trajectory], rewards=[np.ones(8, dtype=np.float32)], epoch=0)
    assert stats["train/n_pairs"] == 0 and stats["train/optimizer_steps"] == 0
    assert learner.version == 0
