"""The learner's update rules, by ``train.algorithm`` name.

Adding an algorithm: one module here with a function ``(TrainState, UpdateInputs) -> UpdateResult``
(see ``base.py``) and one line in ``ALGORITHMS``.
"""

from __future__ import annotations

from learner.algorithms.base import PairBatch, TrainState, UpdateInputs, UpdateResult, UpdateRule
from learner.algorithms.denoising_dpo import denoising_dpo
from learner.algorithms.online_dpo import online_dpo
from learner.algorithms.policy_gradient import pg, ppo
from learner.algorithms.rwr import rwr

ALGORITHMS: dict[str, UpdateRule] = {
    "ppo": ppo,  # DDPO-IS: PPO-clip on the importance ratio (+ β·KL, DPOK)
    "pg": pg,  # DDPO-SF: REINFORCE (+ β·KL)
    "dpo": online_dpo,  # Diffusion-DPO in trajectory form on best/worst or explicit pairs
    "diffusion_dpo": denoising_dpo,  # Diffusion-DPO's denoising loss on ranked pairs of the epoch's samples
    "rwr": rwr,  # reward-weighted regression: the denoising loss on the epoch's samples, weighted by reward
}


def get_algorithm(name: str) -> UpdateRule:
    """The rule called ``name``; a ValueError lists the valid names."""
    if name not in ALGORITHMS:
        raise ValueError(f"train.algorithm={name!r} is not one of {list(ALGORITHMS)}")
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "PairBatch", "TrainState", "UpdateInputs", "UpdateResult", "UpdateRule", "get_algorithm"]
