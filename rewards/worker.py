"""A reward worker: builds the configured rewards once and scores batches with them.

A plain class; the cluster code wraps it with ``ray.remote`` (or a Serve deployment) itself, so this
module never imports ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rewards.base import RewardOutput, check_batch
from rewards.clip_encoder import EncoderCache
from rewards.combine import CAPTION, caption_embedding_source, combine_rewards
from rewards.registry import build_reward


@dataclass
class ScoredBatch:
    """What a worker returns for B images.

    total: float32 [B], Σ_j w_j r_j - γ · Vol (GARD eq. 13); NaN where any reward failed.
    components: reward name -> raw scores float32 [B]. volume: float32 [B] or None.
    latency_s: reward name -> wall seconds of its call. captions: B strings from a captioning reward.
    errors: reward name -> per-item errors, only for rewards that reported some.
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    volume: np.ndarray | None
    latency_s: dict[str, float]
    captions: list[str] | None = None
    errors: dict[str, list[str | None]] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)  # transient failures retried (service client)


class RewardWorker:
    """Holds the rewards named in ``specs`` (name -> options for ``build_reward``) and their weights."""

    def __init__(
        self,
        *,
        specs: dict[str, dict],
        weights: dict[str, float],
        volume_modalities: tuple[str, ...] = ("text", "image"),
    ) -> None:
        # Several workers share the machine's cores; more than one torch thread each only spins.
        torch.set_num_threads(1)
        if not specs:
            raise ValueError("RewardWorker needs at least one reward in specs, got none")
        if set(specs) != set(weights):
            raise ValueError(
                f"specs and weights must name the same rewards: specs {sorted(specs)}, weights {sorted(weights)}"
            )
        self.weights = dict(weights)
        self.volume_modalities = tuple(volume_modalities)
        encoders = EncoderCache()  # clip_score and aesthetic on the same CLIP model share one encoder
        self.rewards = {name: build_reward(name, encoders=encoders, **(options or {})) for name, options in specs.items()}

    def score(self, *, images: np.ndarray, prompts: list[str], gamma: float = 0.0) -> ScoredBatch:
        """Runs every reward on uint8 images [B, H, W, 3] and B prompts, then ``combine_rewards``."""
        check_batch(images, prompts)
        outputs: dict[str, RewardOutput] = {}
        latency: dict[str, float] = {}
        for name, reward in self.rewards.items():
            start = time.perf_counter()
            outputs[name] = reward(images, prompts)
            latency[name] = time.perf_counter() - start
        if CAPTION in self.volume_modalities:
            embedders = {name for name, r in self.rewards.items() if hasattr(r, "embed_texts")}
            source = caption_embedding_source(outputs, embedders)
            if source is not None:
                target, captions = source
                outputs[target].embeddings[CAPTION] = self.rewards[target].embed_texts(captions)
        combined = combine_rewards(
            outputs, weights=self.weights, gamma=gamma, volume_modalities=self.volume_modalities
        )
        captions = next((out.captions for out in outputs.values() if out.captions is not None), None)
        errors = {
            name: out.errors
            for name, out in outputs.items()
            if out.errors is not None and any(e is not None for e in out.errors)
        }
        return ScoredBatch(
            total=combined.total,
            components=combined.components,
            volume=combined.volume,
            latency_s=latency,
            captions=captions,
            errors=errors,
        )
