"""Every seed of a run, derived from (seed, epoch, worker, batch, ...), never from process history.

A restarted or resumed process therefore samples and trains exactly what the original would have.
Each use has its own stream (the second entry of the SeedSequence), so prompt choice, sampling noise,
evaluation noise and the offline trainer's draws never share a generator.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream ids of the SeedSequence([seed, stream, ...]) derivations.
_PROMPTS, _NOISE, _EVAL, _DPO_BATCH = 1, 2, 3, 4
_LEARNER_EPOCH = 0x1EA2  # the learner's per-epoch stream: SeedSequence([seed, epoch, 0x1EA2])


def _uint63(entropy) -> int:
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def batch_seed(seed: int, *, epoch: int, worker: int, batch: int) -> int:
    """The torch generator seed of one sampler batch (x_T and every step's noise)."""
    return _uint63([seed, _NOISE, epoch, worker, batch])


def batch_prompts(prompts: list[str], *, size: int, seed: int, epoch: int, worker: int, batch: int) -> list[str]:
    """``size`` prompts drawn uniformly with replacement for one sampler batch."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PROMPTS, epoch, worker, batch]))
    return [prompts[i] for i in rng.integers(0, len(prompts), size=size)]


def eval_seed(seed: int, *, chunk: int) -> int:
    """The fixed seed of one evaluation chunk (the same at every evaluation)."""
    return _uint63([seed, _EVAL, chunk])


def learner_epoch_rng(seed: int, *, epoch: int) -> np.random.Generator:
    """The learner's generator for one epoch's update (timestep subsets, shuffling, pair order)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, _LEARNER_EPOCH]))


def dpo_step_generator(seed: int, *, step: int) -> torch.Generator:
    """The offline DPO trainer's CPU generator of one optimizer step (pairs, timesteps, noise)."""
    return torch.Generator().manual_seed(_uint63([seed, _DPO_BATCH, step]))


def spawned_generator(seed: int, spawn_key: tuple[int, ...], device: str = "cpu") -> torch.Generator:
    """A generator of ``SeedSequence(seed, spawn_key=...)`` (B² branch rollouts: (group,) for a shared
    prefix, (group, leaf) for a leaf), independent of every other key."""
    state = np.random.SeedSequence(seed, spawn_key=spawn_key).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))
