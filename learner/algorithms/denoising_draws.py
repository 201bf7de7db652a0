"""The noising draws shared by the denoising-loss rules (``denoising_dpo``, ``rwr``).

Both regress the policy's prediction on the sampled final latents x0 re-noised at fresh timesteps: each
trained item gets its own (t, ε), drawn from one generator seeded from the epoch's rng, so that several
learner ranks draw the same values and each trains its share of them.
"""

from __future__ import annotations

import numpy as np
import torch


class NoiseDraws:
    """x0: the batch's sampled final latents [N, C, h, w] on the policy's device; ``draw(count)`` gives
    ``count`` timesteps in [0, num_train_timesteps) (int64 [count]) and noises ([count, C, h, w])."""

    def __init__(self, policy, latents: torch.Tensor, rng: np.random.Generator):
        self.device = policy.device
        self.x0 = latents[:, -1].to(self.device)  # [N, C, h, w]: the last entry of each trajectory
        self.num_train_timesteps = policy.scheduler.config.num_train_timesteps
        self.generator = torch.Generator().manual_seed(int(rng.integers(2**62)))

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_train_timesteps, (count,), generator=self.generator).to(self.device)
        eps = torch.randn((count, *self.x0.shape[1:]), generator=self.generator).to(self.device)
        return t, eps
