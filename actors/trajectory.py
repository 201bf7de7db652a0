"""Typed batch containers that cross actor boundaries (numpy inside: Ray moves numpy zero-copy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Trajectory:
    """B DDIM trajectories of T steps, sampled by one sampler call with one policy version.

    latents:   float32 [B, T+1, C, h, w]  x_T, ..., x_0 (the states; transition i is latents[:, i] -> [:, i+1])
    log_probs: float32 [B, T]             log p(latents[:, i+1] | latents[:, i]) when sampled
    timesteps: int64   [T]                the training timestep t of each transition
    prompts:   B strings
    policy_version: the adapter version that sampled every transition
    seed:      the generator seed of this batch (derived from (seed, epoch, worker, batch))
    group_ids: int64   [B] or None        branch group of each sample (B²-DiffuRL branch rollouts:
                                          the leaves of one shared prefix); None for plain sampling
    """

    latents: np.ndarray
    log_probs: np.ndarray
    timesteps: np.ndarray
    prompts: list[str]
    policy_version: int
    seed: int
    group_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def finite_rows(self) -> np.ndarray:
        """bool [B]: the samples whose latents and log-probs are all finite (the others are never trained
        on: a NaN latent still decodes to a finite image with a finite reward)."""
        n = len(self)
        return (np.isfinite(self.latents.reshape(n, -1)).all(axis=1)
                & np.isfinite(self.log_probs.reshape(n, -1)).all(axis=1))


@dataclass
class ImageBatch:
    """What the rewards see: decoded images uint8 [B, H, W, 3] and their prompts."""

    images: np.ndarray
    prompts: list[str]
    policy_version: int
    sample_s: float  # sampler compute time for the batch (trajectory + decode)


def concat_trajectories(parts: list[Trajectory]) -> Trajectory:
    """Joins sampler batches into one; they must share the timestep schedule."""
    if not parts:
        raise ValueError("no trajectories to concatenate")
    for part in parts[1:]:
        if not np.array_equal(part.timesteps, parts[0].timesteps):
            raise ValueError("trajectories with different timestep schedules cannot be trained together")
    group_ids = None
    if all(p.group_ids is not None for p in parts):
        # Offset each batch's ids so groups of different batches stay distinct.
        offsets = np.cumsum([0] + [int(p.group_ids.max()) + 1 for p in parts[:-1]])
        group_ids = np.concatenate([p.group_ids + off for p, off in zip(parts, offsets, strict=True)])
    return Trajectory(
        group_ids=group_ids,
        latents=np.concatenate([p.latents for p in parts]),
        log_probs=np.concatenate([p.log_probs for p in parts]),
        timesteps=parts[0].timesteps,
        prompts=[prompt for p in parts for prompt in p.prompts],
        policy_version=min(p.policy_version for p in parts),
        seed=parts[0].seed,
    )


def gather_rows(parts, index: list[tuple[int, int]]) -> Trajectory:
    """The rows ``(part, row)`` of several trajectory batches as one Trajectory (in ``index`` order).

    parts: Trajectories indexable by part index (a list, or a dict holding at least the parts used).
    """
    if not index:
        raise ValueError("gather_rows needs at least one (part, row) index")
    used = sorted({p for p, _ in index})
    for p in used[1:]:
        if not np.array_equal(parts[p].timesteps, parts[used[0]].timesteps):
            raise ValueError("trajectories with different timestep schedules cannot be gathered")
    return Trajectory(
        latents=np.stack([parts[p].latents[r] for p, r in index]),
        log_probs=np.stack([parts[p].log_probs[r] for p, r in index]),
        timesteps=np.asarray(parts[used[0]].timesteps),
        prompts=[parts[p].prompts[r] for p, r in index],
        policy_version=min(parts[p].policy_version for p in used),
        seed=parts[used[0]].seed,
    )


@dataclass
class TrajectoryPairs:
    """P explicit preference pairs: row p of ``chosen`` is preferred over row p of ``rejected``.

    Built by the samplers when the pair source is not the reward ranking itself, e.g. D-Fusion
    (``actors.dfusion``): chosen = the fused samples, rejected = the poorly aligned samples they were
    built from (same prompts, same x_T). Both share one timestep schedule.
    """

    chosen: Trajectory
    rejected: Trajectory

    def __post_init__(self):
        if len(self.chosen) != len(self.rejected):
            raise ValueError(f"{len(self.chosen)} chosen but {len(self.rejected)} rejected trajectories")

    def __len__(self) -> int:
        return len(self.chosen)
