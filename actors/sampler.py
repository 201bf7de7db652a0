"""The Sampler actor: DDIM trajectories with log-probs under the current adapter version.

A plain class; ``cluster/`` wraps it with ``ray.remote(...)`` where it builds the actors, and tests
run it in-process (the RLlib EnvRunner pattern).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from actors.ddim import ddim_step_with_logprob
from actors.policy import Policy, PolicySpec
from actors.trajectory import ImageBatch, Trajectory
from actors.weights import WeightsPacket, unpack_adapter_into


class Sampler:
    """Samples trajectories for batches of prompts; stamps each with the adapter version used."""

    def __init__(self, *, spec: PolicySpec, worker_index: int = 0, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.worker_index = worker_index
        self.policy = Policy(spec)
        self.policy_version = 0
        self._named_params = self.policy.named_trainable_parameters()

    def set_weights(self, *, packet: WeightsPacket) -> dict:
        """Verifies and applies a published adapter; an older version than the one in use is ignored.

        Returns ``{"version": in use, "apply_s": seconds}``. Raises ChecksumError /
        AdapterMismatchError on a bad packet, leaving the current adapter untouched.
        """
        start = time.perf_counter()
        if packet.version >= self.policy_version:
            unpack_adapter_into(self._named_params, packet)
            self.policy_version = packet.version
        return {"version": self.policy_version, "apply_s": time.perf_counter() - start}

    @torch.no_grad()
    def sample_branches(self, *, prompts: list[str], seed: int, n_branch: int, branch_step: int,
                        share_start: bool = True) -> tuple[Trajectory, ImageBatch]:
        """B²-DiffuRL branch rollouts (``actors.branch``): one shared prefix per prompt to
        ``branch_step``, then ``n_branch`` leaves each; returns len(prompts) * n_branch samples.
        ``share_start=False`` (branch_step 0): the leaves of a prompt start from their own x_T."""
        from actors.branch import sample_branches

        branches = sample_branches(self.policy, prompts=list(prompts), n_branch=n_branch, branch_step=branch_step,
                                   seed=int(seed), eta=self.policy.spec.eta, policy_version=self.policy_version,
                                   share_start=bool(share_start))
        return branches.to_trajectory(), branches.to_image_batch()

    @torch.no_grad()
    def dfusion(self, *, sources: list, poor: list[tuple[int, int]], good: list[tuple[int, int]],
                spec) -> tuple:
        """D-Fusion pairs (``actors.dfusion``): for each p, fuses the well aligned sample ``good[p]`` into
        the poorly aligned ``poor[p]`` (same prompt) by mask-guided self-attention fusion.

        sources: the epoch's Trajectory batches the pairs index (values; ``cluster.remote.RemoteSampler``
        resolves the driver's references); poor / good: (source index, row) per pair; spec: an
        ``actors.dfusion.DFusionSpec``.
        Returns ``(TrajectoryPairs(chosen=fused, rejected=poor rows), ImageBatch of the fused images
        (uint8), stats {"mask_fraction": [P] floats, "unet_calls", "dfusion_s"})``. No randomness.
        """
        from actors.dfusion import dfusion
        from actors.trajectory import TrajectoryPairs, gather_rows

        if len(poor) != len(good) or not poor:
            raise ValueError(f"dfusion() needs as many poor as good indices (>= 1), got {len(poor)} and {len(good)}")
        start = time.perf_counter()
        parts = dict(enumerate(sources))
        poor_rows = gather_rows(parts, [(s, r) for s, r in poor])
        good_rows = gather_rows(parts, [(s, r) for s, r in good])
        result = dfusion(self.policy, poor=poor_rows, good=good_rows, spec=spec, policy_version=self.policy_version)
        seconds = time.perf_counter() - start
        images = ImageBatch(images=result.images, prompts=list(result.trajectory.prompts),
                            policy_version=self.policy_version, sample_s=seconds)
        stats = {"mask_fraction": result.mask_fraction.tolist(), "unet_calls": result.unet_calls, "dfusion_s": seconds}
        return TrajectoryPairs(chosen=result.trajectory, rejected=poor_rows), images, stats

    @torch.no_grad()
    def sample(self, *, prompts: list[str], seed: int) -> tuple[Trajectory, ImageBatch]:
        """One batch: x_T ~ N(0, I) from ``seed``, T stochastic DDIM steps, decoded images.

        The generator draws x_T and then each step's noise, in the order of diffusers'
        StableDiffusionPipeline, so the same seed reproduces ``pipe(..., eta, generator)``.
        """
        if not prompts:
            raise ValueError("sample() needs at least one prompt")
        start = time.perf_counter()
        policy = self.policy
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        embeds = policy.encode_prompts(list(prompts))
        negative = policy.negative_embeds(len(prompts))  # once per batch, not once per step
        latents = policy.initial_latents(len(prompts), generator)
        timesteps = policy.scheduler.timesteps
        states = [latents.float().cpu()]
        log_probs = []
        for t in timesteps:
            model_output = policy.guided_output(latents, t, embeds, negative)
            latents, log_prob = ddim_step_with_logprob(
                policy.scheduler, model_output, t, latents, eta=policy.spec.eta, generator=generator
            )
            states.append(latents.float().cpu())
            log_probs.append(log_prob.cpu())
        images = policy.decode(latents)
        trajectory = Trajectory(
            latents=torch.stack(states, dim=1).numpy(),
            log_probs=torch.stack(log_probs, dim=1).numpy().astype(np.float32),
            timesteps=timesteps.cpu().numpy().astype(np.int64),
            prompts=list(prompts),
            policy_version=self.policy_version,
            seed=int(seed),
        )
        batch = ImageBatch(
            images=images,
            prompts=list(prompts),
            policy_version=self.policy_version,
            sample_s=time.perf_counter() - start,
        )
        return trajectory, batch
