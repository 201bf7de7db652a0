"""Branch rollouts (B²-DiffuRL §3.3) on the tiny pipeline: shared prefixes bit for bit, one prefix
per group, independent leaves, recomputable log-probs, and conversion to the plain containers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.branch import BranchTrajectory, sample_branches
from actors.ddim import ddim_mean_std, gaussian_log_prob
from actors.policy import Policy
from actors.trajectory import ImageBatch, Trajectory
from cluster.specs import default_policy_spec

PROMPTS = ["a cat", "a dog"]
T = 6
N_BRANCH = 3
BRANCH_STEP = 2


@pytest.fixture(scope="module")
def policy(tiny_sd) -> Policy:
    torch.set_num_threads(1)
    policy = Policy(default_policy_spec(pretrained=tiny_sd, num_steps=T, resolution=64))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so the log-probs below depend on it
        for _, p in policy.named_trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return policy


class _UnetCounter:
    """Counts UNet forward calls with a forward pre-hook (independent of the returned counter)."""

    def __init__(self, unet):
        self.calls = 0
        self.batch_sizes: list[int] = []
        self._handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.batch_sizes.append(int(args[0].shape[0]))

    def close(self):
        self._handle.remove()


@pytest.fixture(scope="module")
def rollout(policy):
    counter = _UnetCounter(policy.unet)
    try:
        result = sample_branches(
            policy,
            prompts=PROMPTS,
            n_branch=N_BRANCH,
            branch_step=BRANCH_STEP,
            seed=11,
            eta=1.0,
            policy_version=4,
        )
    finally:
        counter.close()
    return result, counter


def test_shapes_groups_and_images(rollout):
    traj, _ = rollout
    n = len(PROMPTS) * N_BRANCH
    assert isinstance(traj, BranchTrajectory) and len(traj) == n and traj.num_groups == 2
    assert traj.latents.shape == (n, T + 1, 4, 8, 8) and traj.latents.dtype == np.float32
    assert traj.log_probs.shape == (n, T) and traj.log_probs.dtype == np.float32
    assert np.isfinite(traj.log_probs).all()
    assert traj.timesteps.shape == (T,) and traj.timesteps.dtype == np.int64
    np.testing.assert_array_equal(traj.group_ids, [0, 0, 0, 1, 1, 1])
    assert traj.prompts == ["a cat"] * 3 + ["a dog"] * 3
    assert traj.images.shape == (n, 64, 64, 3) and traj.images.dtype == np.uint8
    assert (traj.branch_step, traj.n_branch, traj.seed, traj.policy_version) == (BRANCH_STEP, N_BRANCH, 11, 4)


def test_prefix_is_sampled_once_per_step_for_the_whole_batch(rollout):
    traj, counter = rollout
    # CFG: one batched UNet call per step; the prefix runs on B rows, the continuation on B·n rows.
    assert traj.unet_calls == counter.calls == BRANCH_STEP + (T - BRANCH_STEP) == T
    assert counter.calls < N_BRANCH * T
    b = len(PROMPTS)
    assert counter.batch_sizes == [2 * b] * BRANCH_STEP + [2 * b * N_BRANCH] * (T - BRANCH_STEP)


def test_leaves_share_the_prefix_bit_for_bit_and_differ_after_it(rollout):
    traj, _ = rollout
    for group in range(2):
        rows = np.flatnonzero(traj.group_ids == group)
        first = rows[0]
        for row in rows[1:]:
            np.testing.assert_array_equal(
                traj.latents[row, : BRANCH_STEP + 1], traj.latents[first, : BRANCH_STEP + 1]
            )
            np.testing.assert_array_equal(
                traj.log_probs[row, :BRANCH_STEP], traj.log_probs[first, :BRANCH_STEP]
            )
        for a in rows:
            for c in rows:
                if a < c:  # every later state differs between any two leaves
                    for step in range(BRANCH_STEP + 1, T + 1):
                        assert not np.allclose(traj.latents[a, step], traj.latents[c, step])
                    assert not np.array_equal(
                        traj.log_probs[a, BRANCH_STEP:], traj.log_probs[c, BRANCH_STEP:]
                    )
    # The two groups have different prefixes (own seeds), from x_T on.
    assert not np.allclose(traj.latents[0, 0], traj.latents[N_BRANCH, 0])


def test_recomputed_log_probs_of_stored_transitions_equal_the_stored_ones(policy, rollout):
    traj, _ = rollout
    n = len(traj)
    embeds = policy.encode_prompts(traj.prompts)
    i, j = np.meshgrid(np.arange(n), np.arange(T), indexing="ij")
    i, j = torch.from_numpy(i.ravel()), torch.from_numpy(j.ravel())
    latents = torch.from_numpy(traj.latents)
    t = torch.from_numpy(traj.timesteps)[j]
    with torch.no_grad():
        out = policy.guided_output(latents[i, j], t, embeds[i])
        mean, std = ddim_mean_std(policy.scheduler, out, t, latents[i, j], eta=1.0)
        log_prob = gaussian_log_prob(latents[i, j + 1], mean, std)
    np.testing.assert_allclose(log_prob.numpy(), traj.log_probs[i, j], rtol=1e-5, atol=1e-4)


def test_same_seed_reproduces_and_a_group_does_not_depend_on_the_other_prompts(policy, rollout):
    traj, _ = rollout
    again = sample_branches(
        policy, prompts=PROMPTS, n_branch=N_BRANCH, branch_step=BRANCH_STEP, seed=11, eta=1.0
    )
    np.testing.assert_array_equal(again.latents, traj.latents)
    np.testing.assert_array_equal(again.log_probs, traj.log_probs)
    np.testing.assert_array_equal(again.images, traj.images)
    other = sample_branches(
        policy, prompts=["a cat", "a red car"], n_branch=N_BRANCH, branch_step=BRANCH_STEP, seed=11, eta=1.0
    )
    np.testing.assert_array_equal(other.latents[:N_BRANCH, 0], traj.latents[:N_BRANCH, 0])  # x_T: same draw
    np.testing.assert_allclose(other.latents[:N_BRANCH], traj.latents[:N_BRANCH], rtol=1e-4, atol=1e-4)
    different = sample_branches(
        policy, prompts=PROMPTS, n_branch=N_BRANCH, branch_step=BRANCH_STEP, seed=12, eta=1.0
    )
    assert not np.allclose(different.latents[:, 0], traj.latents[:, 0])


def test_branch_step_zero_shares_only_x_T(policy):
    traj = sample_branches(policy, prompts=["a cat"], n_branch=2, branch_step=0, seed=0, eta=1.0)
    assert traj.unet_calls == T and traj.latents.shape == (2, T + 1, 4, 8, 8)
    np.testing.assert_array_equal(traj.latents[0, 0], traj.latents[1, 0])
    assert not np.allclose(traj.latents[0, 1], traj.latents[1, 1])


def test_independent_starts_give_each_leaf_its_own_x_T_from_its_leaf_generator(policy):
    shared = sample_branches(policy, prompts=["a cat", "a dog"], n_branch=2, branch_step=0, seed=5, eta=1.0)
    own = sample_branches(policy, prompts=["a cat", "a dog"], n_branch=2, branch_step=0, seed=5, eta=1.0,
                          share_start=False)
    assert own.latents.shape == shared.latents.shape and own.unet_calls == T
    np.testing.assert_array_equal(own.group_ids, [0, 0, 1, 1])
    assert own.prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert not np.allclose(own.latents[0, 0], own.latents[1, 0])  # leaves of one prompt: their own x_T
    # Leaf (g, j)'s x_T is the first draw of its own generator, SeedSequence(5, spawn_key=(g, j)).
    for row, key in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        state = np.random.SeedSequence(5, spawn_key=key).generate_state(1, dtype=np.uint64)[0]
        expected = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(int(state)))
        np.testing.assert_allclose(own.latents[row, 0], expected.numpy() * policy.scheduler.init_noise_sigma,
                                   rtol=0, atol=1e-6)
    again = sample_branches(policy, prompts=["a cat", "a dog"], n_branch=2, branch_step=0, seed=5, eta=1.0,
                            share_start=False)
    np.testing.assert_array_equal(again.latents, own.latents)
    with pytest.raises(ValueError, match=r"share_start=False with branch_step=1: .*independent starts need branch_step 0"):
        sample_branches(policy, prompts=["a cat"], n_branch=2, branch_step=1, seed=0, eta=1.0, share_start=False)


def test_conversion_to_trajectory_and_image_batch(rollout):
    traj, _ = rollout
    plain = traj.to_trajectory()
    assert isinstance(plain, Trajectory) and len(plain) == len(traj)
    assert plain.latents is traj.latents and plain.log_probs is traj.log_probs
    assert plain.prompts == traj.prompts and plain.policy_version == 4 and plain.seed == 11
    np.testing.assert_array_equal(plain.timesteps, traj.timesteps)
    images = traj.to_image_batch()
    assert isinstance(images, ImageBatch) and images.images is traj.images and images.prompts == traj.prompts


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"branch_step": T}, rf"branch_step={T} is invalid: expected an int in \[0, {T}\)"),
        ({"branch_step": -1}, r"branch_step=-1 is invalid"),
        ({"n_branch": 0}, r"n_branch=0 is invalid"),
        ({"eta": 0.0}, r"eta=0.0 is invalid"),
        ({"seed": -3}, r"seed=-3 is invalid"),
        ({"prompts": []}, r"at least one prompt"),
    ],
)
def test_invalid_arguments_are_refused(policy, kwargs, match):
    args = {"prompts": PROMPTS, "n_branch": 2, "branch_step": 1, "seed": 0, "eta": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_branches(policy, **args)
