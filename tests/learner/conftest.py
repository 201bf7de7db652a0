"""Fixtures shared by the learner's tests: the tiny pipeline's policy spec (four denoising steps at 64 px,
CFG 3) and, for the denoising-loss rules (online Diffusion-DPO, reward-weighted regression), eight samples
of two prompts from it."""

from __future__ import annotations

import pytest

from actors.policy import PolicySpec

CAT_DOG_PROMPTS = ["a cat"] * 4 + ["a dog"] * 4


@pytest.fixture(scope="module")
def cat_dog_policy_spec(tiny_sd) -> PolicySpec:
    from cluster.specs import default_policy_spec

    return default_policy_spec(pretrained=tiny_sd, num_steps=4, resolution=64, guidance_scale=3.0)


@pytest.fixture(scope="module")
def cat_dog_trajectory(cat_dog_policy_spec):
    """One trajectory batch of ``CAT_DOG_PROMPTS`` (seed 0)."""
    from actors.sampler import Sampler

    return Sampler(spec=cat_dog_policy_spec).sample(prompts=CAT_DOG_PROMPTS, seed=0)[0]
