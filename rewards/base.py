"""The reward contract shared by every reward model, the Serve wrappers and the learner.

A reward is a plain class with a ``name`` and ``__call__(images, prompts) -> RewardOutput``.
Images are uint8 ``[B, H, W, 3]`` numpy arrays (what samplers decode); scores are
float32 ``[B]``. Rewards that embed images and prompts (CLIP) also return unit-norm embeddings,
keyed by modality, for the GARD volume term (GARD eq. 12-13).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class RewardOutput:
    """What one reward returns for a batch of B images.

    scores:     float32 [B]; NaN marks an item the reward could not score (see ``errors``).
    embeddings: modality -> float32 [B, n], unit-norm rows ("image", "text", "caption").
    captions:   B strings, for rewards that caption images (LLaVA).
    errors:     B entries, None where the item was scored, else why it was not.
    checks:     check name -> float32 [B], the parts of a score for rewards that have them (the shapes
                judge's binding, count, relation, overlap); NaN where a check does not apply to an item.
    """

    scores: np.ndarray
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    captions: list[str] | None = None
    errors: list[str | None] | None = None
    checks: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32)
        if self.scores.ndim != 1:
            raise ValueError(f"RewardOutput.scores must have shape [B], got {self.scores.shape}")
        batch = self.scores.shape[0]
        for modality, emb in self.embeddings.items():
            if emb.ndim != 2 or emb.shape[0] != batch:
                raise ValueError(
                    f"RewardOutput.embeddings[{modality!r}] must have shape [{batch}, n], got {emb.shape}"
                )
        self.checks = {name: np.asarray(values, dtype=np.float32) for name, values in self.checks.items()}
        for name, values in self.checks.items():
            if values.shape != (batch,):
                raise ValueError(f"RewardOutput.checks[{name!r}] must have shape [{batch}], got {values.shape}")


@dataclass
class ScoredBatch:
    """The combined rewards of B images (the one result type after ``RewardOutput``).

    total:      float32 [B], Σ_j w_j r_j − γ · Vol (GARD eq. 13); NaN where any reward failed.
    components: reward name -> raw (unweighted) scores float32 [B]. volume: float32 [B] or None.
    latency_s:  reward name -> wall seconds until its scores arrived. captions: B strings from a
                captioning reward. errors: reward name -> per-item errors (rewards that reported some).
    retries:    reward name -> transient failures retried.
    The reward stage adds where the images came from: sample_s (the sampler's compute time),
    policy_version (the adapter that sampled them) and reward_wall_s (the whole scoring call).
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    volume: np.ndarray | None = None
    latency_s: dict[str, float] = field(default_factory=dict)
    captions: list[str] | None = None
    errors: dict[str, list[str | None]] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    sample_s: float = 0.0
    policy_version: int = -1
    reward_wall_s: float = 0.0


@runtime_checkable
class TextEmbedder(Protocol):
    """A reward that can embed texts in its own text space (CLIP): used to embed captions for the
    k = 3 GARD volume."""

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


@runtime_checkable
class Reward(Protocol):
    """``name`` plus a call on uint8 images [B, H, W, 3] and B prompts."""

    name: str

    def __call__(self, images: np.ndarray, prompts: list[str]) -> RewardOutput: ...


def check_batch(images: np.ndarray, prompts: list[str]) -> None:
    """Validates the common input contract; raises ValueError naming what was wrong."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array [B, H, W, 3], got {type(images).__name__}"
                         f" of dtype {getattr(images, 'dtype', None)}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [B, H, W, 3], got {images.shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; they must match")
