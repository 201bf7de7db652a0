"""Fixtures for the reward tests: one torch thread, a tiny open_clip config, small image batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.tiny import tiny_aesthetic_options, tiny_clip_score_options

# The machine has 2 cores shared with other work; more torch threads only spin.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def clip_options(tiny_clip_dir) -> dict:
    """``clip_score`` options for the tiny random-weight CLIP (embed_dim 32, 32 px)."""
    return tiny_clip_score_options(tiny_clip_dir)


@pytest.fixture(scope="session")
def aesthetic_options(tiny_clip_dir) -> dict:
    """``aesthetic`` options for the tiny CLIP and a random 32-d head."""
    return tiny_aesthetic_options(tiny_clip_dir)


@pytest.fixture
def images() -> np.ndarray:
    """uint8 [4, 32, 32, 3] noise."""
    return np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def prompts() -> list[str]:
    return ["a photo of a cat", "a red car", "a photo of a cat", "mountains at sunset"]
