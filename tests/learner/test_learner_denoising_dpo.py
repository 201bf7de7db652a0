"""Online Diffusion-DPO in its denoising form: pairs, the first loss, and the direction of an update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cluster.specs import default_learner_spec
from learner.dpo import per_sample_mse
from learner.learner import Learner
from learner.selection import ranked_pairs

torch.set_num_threads(1)


def test_ranked_pairs_pair_the_kth_best_with_the_kth_worst_of_each_group():
    groups = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    rewards = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 2.0, 2.0, 1.0, np.nan])
    winners, losers = ranked_pairs(groups, rewards)
    # group 0 ranked 1 (0.9), 3 (0.7), 0 (0.5), 4 (0.3), 2 (0.1): (1, 2), (3, 4), 0 left out;
    # group 1 (NaN dropped) ranked 5, 6 (2.0), 7 (1.0): (5, 7) only
    assert winners.tolist() == [1, 3, 5] and losers.tolist() == [2, 4, 7]
    assert ranked_pairs(np.array([0, 0]), np.array([1.0, 1.0]))[0].size == 0  # ties make no pair


def _pair_errors(learner: Learner, trajectory, rows, t: int, seed: int) -> torch.Tensor:
    """The policy's noise-prediction error on the final latents of ``rows`` noised to t with one ε."""
    policy = learner.policy
    x0 = torch.from_numpy(trajectory.latents[rows, -1])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    steps = torch.full((len(rows),), t)
    embeds = policy.encode_prompts([trajectory.prompts[i] for i in rows])
    with torch.no_grad():
        return per_sample_mse(policy.unet(policy.scheduler.add_noise(x0, eps, steps), steps, embeds).sample, eps)


def test_an_update_starts_at_log_2_and_denoises_winners_better_than_losers(cat_dog_policy_spec, cat_dog_trajectory):
    spec = default_learner_spec(algorithm="diffusion_dpo", learning_rate=1e-2, dpo_denoise_beta=500.0,
                                dpo_noise_draws=4, updates_per_epoch=1, micro_batch_size=8, adam_weight_decay=0.0)
    learner = Learner(policy_spec=cat_dog_policy_spec, spec=spec)
    rewards = np.array([4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0], dtype=np.float32)  # winners 0, 1, 7, 6
    winners, losers = [0, 1, 7, 6], [3, 2, 4, 5]
    before = {t: (_pair_errors(learner, cat_dog_trajectory, winners, t, 1) - _pair_errors(learner, cat_dog_trajectory, losers, t, 1))
              for t in (100, 500, 900)}
    stats = learner.update(trajectories=[cat_dog_trajectory], rewards=[rewards], epoch=0)
    assert stats["dpo/n_pairs"] == 4 and stats["train/n_pairs"] == 16 and stats["train/optimizer_steps"] == 1
    assert stats["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    for _ in range(4):
        learner.update(trajectories=[_fresh(cat_dog_trajectory, learner)], rewards=[rewards], epoch=1)
    # on fresh noise, the winners' error fell relative to the losers' at every noise level
    for t, gap in before.items():
        after = _pair_errors(learner, cat_dog_trajectory, winners, t, 1) - _pair_errors(learner, cat_dog_trajectory, losers, t, 1)
        assert float(after.mean()) < float(gap.mean())


def _fresh(trajectory, learner):
    import dataclasses

    return dataclasses.replace(trajectory, policy_version=learner.version)


def test_the_update_is_reproducible_from_the_seed(cat_dog_policy_spec, cat_dog_trajectory):
    spec = default_learner_spec(algorithm="diffusion_dpo", learning_rate=1e-2, updates_per_epoch=2,
                                micro_batch_size=3)
    rewards = np.arange(8, dtype=np.float32)
    adapters = []
    for _ in range(2):
        learner = Learner(policy_spec=cat_dog_policy_spec, spec=spec)
        learner.update(trajectories=[cat_dog_trajectory], rewards=[rewards], epoch=0)
        adapters.append(torch.cat([p.detach().flatten() for _, p in learner.policy.named_trainable_parameters()]))
    assert torch.equal(adapters[0], adapters[1]) and adapters[0].abs().sum() > 0
