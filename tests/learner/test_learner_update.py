"""The Learner in-process: update direction, staleness, NaN rewards, KL to the reference, publishing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from actors.ddim import ddim_mean_std, gaussian_log_prob
from actors.policy import PolicySpec
from actors.sampler import Sampler
from cluster.specs import default_learner_spec, default_policy_spec
from learner.learner import Learner
from learner.spec import LearnerSpec

PROMPTS = ["a cat", "a cat", "a dog", "a dog"]


@pytest.fixture(scope="module")
def policy_spec(tiny_sd) -> PolicySpec:
    return default_policy_spec(pretrained=tiny_sd, num_steps=4, resolution=64, guidance_scale=3.0)


@pytest.fixture(scope="module")
def batch(policy_spec):
    sampler = Sampler(spec=policy_spec)
    traj, images = sampler.sample(prompts=PROMPTS, seed=0)
    return traj, images


def _log_probs(learner: Learner, traj) -> torch.Tensor:
    """Current log-probs [B, T] of the stored transitions."""
    policy = learner.policy
    embeds = policy.encode_prompts(traj.prompts)
    latents = torch.from_numpy(traj.latents)
    out = []
    with torch.no_grad():
        for j, t in enumerate(traj.timesteps):
            model_output = policy.guided_output(latents[:, j], torch.tensor(int(t)), embeds)
            mean, std = ddim_mean_std(policy.scheduler, model_output, int(t), latents[:, j])
            out.append(gaussian_log_prob(latents[:, j + 1], mean, std))
    return torch.stack(out, dim=1)


def _spec(**kw) -> LearnerSpec:
    base = dict(algorithm="pg", learning_rate=1e-2, advantage="batch", updates_per_epoch=1, micro_batch_size=7,
                adam_weight_decay=0.0)
    return default_learner_spec(**{**base, **kw})


@pytest.mark.parametrize("algorithm", ["pg", "ppo"])
def test_update_raises_log_prob_of_positive_advantage_samples(policy_spec, batch, algorithm):
    traj, _ = batch
    learner = Learner(policy_spec=policy_spec, spec=_spec(algorithm=algorithm, clip_range=0.5))
    before = _log_probs(learner, traj)
    np.testing.assert_allclose(before.numpy(), traj.log_probs, rtol=1e-5, atol=1e-4)
    rewards = np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32)
    stats = learner.update(trajectories=[traj], rewards=[rewards], epoch=0)
    after = _log_probs(learner, traj)
    delta = (after - before).sum(dim=1)
    assert delta[0] > 0 and delta[2] > 0 and delta[1] < 0 and delta[3] < 0
    assert learner.version == 1 and stats["train/n_pairs"] == 16 and stats["train/n_samples"] == 4
    for key in ("train/loss", "train/kl", "train/approx_kl", "train/clipfrac", "train/grad_norm", "time/train_s"):
        assert np.isfinite(stats[key]), key
    assert stats["train/kl"] >= 0


def test_nonfinite_rewards_are_dropped_and_counted(policy_spec, batch):
    traj, _ = batch
    learner = Learner(policy_spec=policy_spec, spec=_spec())
    stats = learner.update(trajectories=[traj], rewards=[np.array([1.0, np.nan, np.inf, 0.0], np.float32)], epoch=0)
    assert stats["reward/nonfinite"] == 2 and stats["train/n_samples"] == 2 and stats["train/n_pairs"] == 8
    current = dataclasses.replace(traj, policy_version=learner.version)
    all_nan = learner.update(trajectories=[current], rewards=[np.full(4, np.nan, np.float32)], epoch=1)
    assert all_nan["train/n_pairs"] == 0 and all_nan["reward/nonfinite"] == 4


def test_stale_trajectories_are_refused_and_counted(policy_spec, batch):
    traj, _ = batch
    learner = Learner(policy_spec=policy_spec, spec=_spec(max_staleness=1))
    learner.version = 2
    stale = dataclasses.replace(traj, policy_version=0)
    fresh = dataclasses.replace(traj, policy_version=1)
    params = [p.clone() for _, p in learner.policy.named_trainable_parameters()]
    stats = learner.update(trajectories=[stale], rewards=[np.arange(4, dtype=np.float32)], epoch=0)
    assert stats["train/stale_refused"] == 4 and stats["train/n_pairs"] == 0
    for before, (_, p) in zip(params, learner.policy.named_trainable_parameters(), strict=True):
        torch.testing.assert_close(before, p)  # nothing trained on stale data
    stats = learner.update(trajectories=[stale, fresh], rewards=[np.arange(4.0), np.arange(4.0)], epoch=0)
    assert stats["train/stale_refused"] == 4 and stats["train/n_samples"] == 4


def test_timestep_fraction_and_updates_per_epoch(policy_spec, batch):
    traj, _ = batch
    learner = Learner(policy_spec=policy_spec, spec=_spec(timestep_fraction=0.5, updates_per_epoch=3, inner_epochs=2))
    stats = learner.update(trajectories=[traj], rewards=[np.arange(4, dtype=np.float32)], epoch=0)
    assert stats["train/n_pairs"] == 2 * 4 * 2  # inner epochs x samples x kept steps
    assert learner.optimizer.state[learner.optimizer.param_groups[0]["params"][0]]["step"] == 6


def test_step_range_trains_only_its_steps(policy_spec, batch):
    """With step_range (2, 4) the transitions of steps 0-1 never enter the update: scrambling their latents
    and log-probs leaves the trained adapter bit-identical. Without a range the same scrambling changes it."""
    traj, _ = batch
    latents, log_probs = traj.latents.copy(), traj.log_probs.copy()
    rng = np.random.default_rng(0)
    latents[:, :2] = rng.standard_normal(latents[:, :2].shape).astype(latents.dtype)  # x_T and x_{T-1}
    log_probs[:, :2] -= 3.0
    scrambled = dataclasses.replace(traj, latents=latents, log_probs=log_probs)
    rewards = [np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32)]

    def adapter(trajectory, **kw) -> tuple[list[torch.Tensor], dict]:
        learner = Learner(policy_spec=policy_spec, spec=_spec(algorithm="ppo", clip_range=0.5, **kw))
        stats = learner.update(trajectories=[trajectory], rewards=rewards, epoch=0)
        return [p.detach().clone() for _, p in learner.policy.named_trainable_parameters()], stats

    late, stats = adapter(traj, step_range=(2, 4))
    assert stats["train/n_pairs"] == 4 * 2
    for a, b in zip(late, adapter(scrambled, step_range=(2, 4))[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    everything = adapter(traj)[0]
    assert any(not torch.equal(a, b) for a, b in zip(everything, adapter(scrambled)[0], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(everything, late, strict=True))


def test_target_kl_drops_the_first_step_that_exceeds_it_and_the_rest_of_the_epoch(policy_spec, batch):
    traj, _ = batch
    rewards = [np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32)]
    spec = dict(algorithm="ppo", clip_range=0.5, updates_per_epoch=4, micro_batch_size=4)
    free = Learner(policy_spec=policy_spec, spec=_spec(**spec))
    free_stats = free.update(trajectories=[traj], rewards=rewards, epoch=0)
    assert free_stats["train/optimizer_steps"] == 4 and "train/target_kl_stopped" not in free_stats
    # Step 1 is on-policy (approx_kl 0) and applied; step 2's pairs, after a step at lr 1e-2, are above
    # 1e-9, so it and steps 3-4 are dropped: one Adam step, and only step 1's stats in the averages.
    stopped = Learner(policy_spec=policy_spec, spec=_spec(**spec, target_kl=1e-9))
    stats = stopped.update(trajectories=[traj], rewards=rewards, epoch=0)
    assert stats["train/optimizer_steps"] == 1 and stopped.version == 1
    assert stats["train/target_kl_stopped"] == 1.0 and stats["train/approx_kl_at_stop"] > 1e-9
    assert stats["train/approx_kl"] < 1e-9 and stats["train/n_pairs"] == 4
    assert stopped.optimizer.state[stopped.optimizer.param_groups[0]["params"][0]]["step"] == 1
    # A target above every step's approx_kl changes nothing: the same adapter as without one.
    loose = Learner(policy_spec=policy_spec, spec=_spec(**spec, target_kl=10.0))
    loose_stats = loose.update(trajectories=[traj], rewards=rewards, epoch=0)
    assert loose_stats["train/optimizer_steps"] == 4 and loose_stats["train/target_kl_stopped"] == 0.0
    for (_, a), (_, b) in zip(free.policy.named_trainable_parameters(), loose.policy.named_trainable_parameters(),
                              strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_learning_rate_ramps_linearly_by_epoch_and_is_set_again_after_a_resume(policy_spec, batch):
    traj, _ = batch
    spec = _spec(learning_rate=1e-2, learning_rate_end=1e-3, lr_ramp_epochs=4)
    learner = Learner(policy_spec=policy_spec, spec=spec)
    rates = []
    for epoch in (0, 2, 4, 9):
        current = dataclasses.replace(traj, policy_version=learner.version)
        stats = learner.update(trajectories=[current], rewards=[np.arange(4, dtype=np.float32)], epoch=epoch)
        rates.append(stats["train/learning_rate"])
        assert learner.optimizer.param_groups[0]["lr"] == stats["train/learning_rate"]
    assert rates == pytest.approx([1e-2, 5.5e-3, 1e-3, 1e-3], rel=1e-12)  # 1e-2 + (1e-3 - 1e-2) * epoch / 4
    # A learner restored from this state (which holds the last epoch's rate) trains epoch 1 at epoch 1's rate.
    resumed = Learner(policy_spec=policy_spec, spec=spec)
    resumed.load_state_dict(state=learner.state_dict())
    current = dataclasses.replace(traj, policy_version=resumed.version)
    stats = resumed.update(trajectories=[current], rewards=[np.arange(4, dtype=np.float32)], epoch=1)
    assert stats["train/learning_rate"] == pytest.approx(7.75e-3, rel=1e-12)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(7.75e-3, rel=1e-12)


def test_kl_term_pulls_toward_the_reference(policy_spec, batch):
    """With zero advantages, the β·KL loss alone moves a perturbed adapter back toward the base model."""
    traj, _ = batch
    learner = Learner(policy_spec=policy_spec, spec=_spec(kl_beta=1.0, learning_rate=3e-3))
    with torch.no_grad():
        for _, p in learner.policy.named_trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    flat = np.zeros(4, dtype=np.float32)  # constant rewards -> zero advantages
    first = learner.update(trajectories=[traj], rewards=[flat], epoch=0)
    for epoch in range(1, 6):
        current = dataclasses.replace(traj, policy_version=learner.version)
        last = learner.update(trajectories=[current], rewards=[flat], epoch=epoch)
    assert first["train/kl"] > 0 and last["train/kl"] < first["train/kl"]
    assert first["train/kl_beta"] == 1.0


def test_publish_packs_the_current_adapter_with_version(policy_spec, batch):
    traj, _ = batch
    learner = Learner(policy_spec=policy_spec, spec=_spec())
    learner.update(trajectories=[traj], rewards=[np.arange(4, dtype=np.float32)], epoch=0)
    packet = learner.publish()
    assert packet.version == 1
    sampler = Sampler(spec=policy_spec)
    sampler.set_weights(packet=packet)
    for (_, a), (_, b) in zip(learner.policy.named_trainable_parameters(),
                              sampler.policy.named_trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mismatched_reward_batches_are_rejected(policy_spec, batch):
    traj, _ = batch
    learner = Learner(policy_spec=policy_spec, spec=_spec())
    with pytest.raises(ValueError, match="came with 3 rewards"):
        learner.update(trajectories=[traj], rewards=[np.zeros(3, np.float32)], epoch=0)
