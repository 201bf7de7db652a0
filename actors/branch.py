"""Branch rollouts of B²-DiffuRL (Hu et al., CVPR 2025, §3.3 "Branch-based Sampling", Fig. 3b).

For a batch of B prompts (one group per prompt), the shared prefix x_T -> x_{τ} is denoised once
for the whole batch; at the branch step every group's state is copied into ``n_branch``
continuations that finish x_{τ} -> x_0 with independent noise, as one batched continuation of
B · n_branch rows. Leaves of one group therefore share their states and actions up to the start of
the trained interval, so comparing their rewards isolates the actions inside it (§3.3).

Step indices follow ``actors.trajectory.Trajectory``: transition i is latents[:, i] -> latents[:, i+1],
i = 0..T-1; ``branch_step`` = T - τ (``learner.bpt.BptSchedule.branch_step``). With classifier-free
guidance each step is one batched UNet call, so a rollout costs ``branch_step + (T - branch_step) =
T`` UNet calls (each continuation call n_branch times wider), not ``n_branch · T``.

Randomness (explicit generators): group g (prompt g of the batch) gets
``torch.Generator`` seeded from ``SeedSequence(seed, spawn_key=(g,))``; it draws x_T and the prefix
noise. Leaf j of group g gets its own generator seeded from ``SeedSequence(seed, spawn_key=(g, j))``
for the continuation noise. A group's leaves thus depend on (seed, g) only, not on the other prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from actors.ddim import ddim_step_with_logprob
from actors.seeding import spawned_generator
from actors.trajectory import ImageBatch, Trajectory


@dataclass
class BranchTrajectory:
    """B prompt groups x n_branch leaves = N = B · n_branch DDIM trajectories, group-major.

    latents:    float32 [N, T+1, C, h, w]  x_T, ..., x_0; rows of one group are bit-identical in
                                           latents[:, :branch_step + 1] (the shared prefix), unless
                                           they were sampled with independent starts
    log_probs:  float32 [N, T]             log p(latents[:, i+1] | latents[:, i]) when sampled;
                                           bit-identical within a group for i < branch_step
    timesteps:  int64   [T]                the training timestep t of each transition
    prompts:    N strings                  prompt g repeated n_branch times (row g · n_branch + j)
    group_ids:  int64   [N]                g for every leaf of group g
    images:     uint8   [N, H, W, 3]       decoded leaves x_0
    branch_step: step index where the leaves split (0 = they share only x_T)
    n_branch:   leaves per group
    seed:       the base seed the group / leaf generators derive from
    policy_version: the adapter version that sampled every transition
    unet_calls: UNet forward calls made (one per denoising step: T)
    sample_s:   sampler compute time (rollout + decode)
    """

    latents: np.ndarray
    log_probs: np.ndarray
    timesteps: np.ndarray
    prompts: list[str]
    group_ids: np.ndarray
    images: np.ndarray
    branch_step: int
    n_branch: int
    seed: int
    policy_version: int
    unet_calls: int
    sample_s: float

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_groups(self) -> int:
        return len(self.prompts) // self.n_branch

    def to_trajectory(self) -> Trajectory:
        """The leaves as a ``Trajectory`` (rows keep their order, with their ``group_ids``)."""
        return Trajectory(
            latents=self.latents,
            log_probs=self.log_probs,
            timesteps=self.timesteps,
            prompts=list(self.prompts),
            policy_version=self.policy_version,
            seed=self.seed,
            group_ids=self.group_ids,
        )

    def to_image_batch(self) -> ImageBatch:
        """What the rewards see: the N leaf images and their prompts."""
        return ImageBatch(
            images=self.images,
            prompts=list(self.prompts),
            policy_version=self.policy_version,
            sample_s=self.sample_s,
        )


def branch_generators(
    seed: int, *, num_groups: int, n_branch: int
) -> tuple[list[torch.Generator], list[torch.Generator]]:
    """(group generators [B], leaf generators [B · n_branch], group-major) derived from ``seed``."""
    groups = [spawned_generator(seed, (g,)) for g in range(num_groups)]
    leaves = [spawned_generator(seed, (g, j)) for g in range(num_groups) for j in range(n_branch)]
    return groups, leaves


@torch.no_grad()
def sample_branches(
    policy,
    *,
    prompts: list[str],
    n_branch: int,
    branch_step: int,
    seed: int,
    eta: float,
    policy_version: int = 0,
    share_start: bool = True,
) -> BranchTrajectory:
    """Branch rollouts: a shared prefix to ``branch_step``, then ``n_branch`` continuations per prompt.

    Args:
        policy: an ``actors.policy.Policy`` (its scheduler's timesteps set the T steps).
        prompts: B prompts, one branch group each (repeat a prompt to get several groups of it).
        n_branch: leaves per group (>= 1; the paper's release uses 5).
        branch_step: the step index where the leaves split, 0 <= branch_step < T
            (``BptSchedule.branch_step(stage)`` = T - τ_k).
        seed: base seed (>= 0) of the group and leaf generators (module docstring).
        eta: DDIM η > 0 for every step (the log-probs need a stochastic step).
        policy_version: the adapter version stamped on the result.
        share_start: True: a group's leaves start from one x_T. False (only with ``branch_step`` 0): each
            leaf draws its own x_T from its leaf generator, before its step noise, so a group is
            ``n_branch`` independent samples of its prompt (the groups of GRPO-style methods).

    Returns:
        A ``BranchTrajectory`` of B · n_branch leaves (shapes in its docstring).
    """
    if not prompts:
        raise ValueError("sample_branches() needs at least one prompt")
    if isinstance(n_branch, bool) or not isinstance(n_branch, int) or n_branch < 1:
        raise ValueError(f"n_branch={n_branch!r} is invalid: expected an int >= 1")
    timesteps = policy.scheduler.timesteps
    num_steps = len(timesteps)
    if isinstance(branch_step, bool) or not isinstance(branch_step, int) or not 0 <= branch_step < num_steps:
        raise ValueError(
            f"branch_step={branch_step!r} is invalid: expected an int in [0, {num_steps}) "
            f"(the scheduler runs {num_steps} steps; branch_step = T - tau)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid: expected an int >= 0")
    if not eta > 0:
        raise ValueError(f"eta={eta!r} is invalid: branch rollouts record log-probs, which need eta > 0")
    if not share_start and branch_step != 0:
        raise ValueError(f"share_start=False with branch_step={branch_step}: leaves that share a prefix share its "
                         f"x_T; independent starts need branch_step 0")

    start = time.perf_counter()
    num_groups = len(prompts)
    group_gens, leaf_gens = branch_generators(seed, num_groups=num_groups, n_branch=n_branch)
    scheduler = policy.scheduler
    unet_calls = 0

    # Shared prefix x_T -> x_{branch_step}: B rows, one batched (CFG) UNet call per step.
    embeds = policy.encode_prompts(list(prompts))
    negative = policy.negative_embeds(num_groups)  # once per call, not once per step
    if share_start:
        latents = policy.initial_latents(num_groups, group_gens)
    else:  # branch_step is 0, so no prefix: each leaf draws its own x_T (before its step noise)
        latents = policy.initial_latents(num_groups * n_branch, leaf_gens)
    prefix_states = [latents.float().cpu()]
    prefix_log_probs = []
    for i in range(branch_step):
        t = timesteps[i]
        model_output = policy.guided_output(latents, t, embeds, negative)
        unet_calls += 1
        latents, log_prob = ddim_step_with_logprob(
            scheduler, model_output, t, latents, eta=eta, generator=group_gens
        )
        prefix_states.append(latents.float().cpu())
        prefix_log_probs.append(log_prob.float().cpu())

    # Continuations x_{branch_step} -> x_0: B · n_branch rows (group-major), independent noise per leaf.
    if share_start:
        latents = latents.repeat_interleave(n_branch, dim=0)
    leaf_embeds = embeds.repeat_interleave(n_branch, dim=0)
    leaf_negative = negative.repeat_interleave(n_branch, dim=0)
    leaf_states = []
    leaf_log_probs = []
    for i in range(branch_step, num_steps):
        t = timesteps[i]
        model_output = policy.guided_output(latents, t, leaf_embeds, leaf_negative)
        unet_calls += 1
        latents, log_prob = ddim_step_with_logprob(
            scheduler, model_output, t, latents, eta=eta, generator=leaf_gens
        )
        leaf_states.append(latents.float().cpu())
        leaf_log_probs.append(log_prob.float().cpu())
    images = policy.decode(latents)

    # Copies of the prefix (repeat_interleave copies values exactly: bit-identical within a group).
    states = torch.cat(
        [
            torch.stack(prefix_states, dim=1).repeat_interleave(n_branch if share_start else 1, dim=0),
            torch.stack(leaf_states, dim=1),
        ],
        dim=1,
    )
    n_leaves = num_groups * n_branch
    prefix_lp = (
        torch.stack(prefix_log_probs, dim=1).repeat_interleave(n_branch, dim=0)
        if prefix_log_probs
        else torch.zeros(n_leaves, 0)
    )
    log_probs = torch.cat([prefix_lp, torch.stack(leaf_log_probs, dim=1)], dim=1)
    return BranchTrajectory(
        latents=states.numpy().astype(np.float32, copy=False),
        log_probs=log_probs.numpy().astype(np.float32, copy=False),
        timesteps=timesteps.cpu().numpy().astype(np.int64),
        prompts=[p for p in prompts for _ in range(n_branch)],
        group_ids=np.repeat(np.arange(num_groups, dtype=np.int64), n_branch),
        images=images,
        branch_step=int(branch_step),
        n_branch=int(n_branch),
        seed=int(seed),
        policy_version=int(policy_version),
        unet_calls=unet_calls,
        sample_s=time.perf_counter() - start,
    )
