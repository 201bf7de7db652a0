"""The Serve reward backend: fans one batch out to every configured reward at once through Serve
deployment handles, with a timeout and bounded retries per call (``rewards.scoring.score_batch``,
the same path as the in-process backend)."""

from __future__ import annotations

import numpy as np

from rewards.base import ScoredBatch
from rewards.scoring import RetryPolicy, RewardServiceError, score_batch

__all__ = ["RewardClient", "RewardServiceError"]


class RewardClient:
    """Scores batches through deployment handles (``{reward name: DeploymentHandle}``)."""

    def __init__(self, *, handles: dict, weights: dict[str, float], volume_modalities=("text", "image"),
                 timeout_s: float = 120.0, max_retries: int = 2, retry_backoff_s: float = 1.0,
                 down_timeout_s: float = 0.0):
        if set(handles) != set(weights):
            raise ValueError(f"handles {sorted(handles)} and weights {sorted(weights)} must name the same rewards")
        self.handles = dict(handles)
        self.weights = dict(weights)
        self.volume_modalities = tuple(volume_modalities)
        self.retry = RetryPolicy(timeout_s=timeout_s, max_retries=max_retries, retry_backoff_s=retry_backoff_s,
                                 down_timeout_s=down_timeout_s)
        self.retries_total: dict[str, int] = dict.fromkeys(handles, 0)

    def _count_retry(self, name: str) -> None:
        self.retries_total[name] += 1

    def score(self, *, images: np.ndarray, prompts: list[str], gamma: float = 0.0) -> ScoredBatch:
        """All rewards at once; a transient failure is retried (counted), a persistent one raises
        RewardServiceError naming the reward."""
        import ray

        images_ref = ray.put(images)  # one copy in the object store, shared by every reward call
        # Every deployment answers embed_texts; caption_embedding_source picks one that returned text embeddings.
        return score_batch(
            images=images, prompts=prompts, names=list(self.handles),
            submit=lambda name: self.handles[name].score.remote(images=images_ref, prompts=prompts, reward=name),
            embed_texts=lambda name, texts: self.handles[name].embed_texts.remote(texts=texts, reward=name).result(
                timeout_s=self.retry.timeout_s),
            embedders=set(self.handles), weights=self.weights, gamma=gamma,
            volume_modalities=self.volume_modalities, retry=self.retry, on_retry=self._count_retry)
