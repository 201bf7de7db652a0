"""The in-process reward backend: builds the configured rewards once and scores batches with them.

A plain class (the reward stage runs it inside its Ray actor); the fan-out, the caption embedding,
the combination and the result are ``rewards.scoring.score_batch``'s, as for the Serve backend. A local
reward that raises is not retried (it would fail the same way): the error names the reward.
"""

from __future__ import annotations

import numpy as np
import torch

from rewards.base import ScoredBatch, TextEmbedder
from rewards.clip_encoder import EncoderCache
from rewards.registry import build_reward
from rewards.scoring import RetryPolicy, run_locally, score_batch

_NO_RETRIES = RetryPolicy(timeout_s=None, max_retries=0, retry_backoff_s=0.0, down_timeout_s=0.0)


class RewardWorker:
    """Holds the rewards named in ``specs`` (name -> options for ``build_reward``) and their weights;
    ``encoders``: a CLIP encoder cache shared with other rewards of the process."""

    def __init__(
        self,
        *,
        specs: dict[str, dict],
        weights: dict[str, float],
        volume_modalities: tuple[str, ...] = ("text", "image"),
        encoders: EncoderCache | None = None,
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
        # clip_score and aesthetic on the same CLIP model share one encoder (and with ``encoders``, the
        # gold rewards of the same process too)
        encoders = encoders if encoders is not None else EncoderCache()
        self.rewards = {name: build_reward(name, encoders=encoders, **(options or {})) for name, options in specs.items()}

    def score(self, *, images: np.ndarray, prompts: list[str], gamma: float = 0.0) -> ScoredBatch:
        """Runs every reward on uint8 images [B, H, W, 3] and B prompts, then combines them."""
        return score_batch(
            images=images, prompts=prompts, names=list(self.rewards),
            submit=lambda name: run_locally(lambda: self.rewards[name](images, prompts)),
            embed_texts=lambda name, texts: self.rewards[name].embed_texts(texts),
            embedders={name for name, r in self.rewards.items() if isinstance(r, TextEmbedder)},
            weights=self.weights, gamma=gamma, volume_modalities=self.volume_modalities, retry=_NO_RETRIES)
