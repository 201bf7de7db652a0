"""Client of the reward services: fans one batch out to every configured reward at once through
Serve deployment handles, with a timeout and bounded retries per call, and combines the scores
(weights + the GARD volume term, ``rewards.combine``)."""

from __future__ import annotations

import time

import numpy as np

from rewards.base import RewardOutput, check_batch
from rewards.combine import CAPTION, caption_embedding_source, combine_rewards
from rewards.worker import ScoredBatch


def _describe(err: BaseException) -> str:
    """The original error inside Ray's wrappers (RayTaskError.cause), in one line."""
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


class RewardServiceError(RuntimeError):
    """A reward kept failing (or timing out) after its retries; names the reward."""


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
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        # A reward that keeps failing is retried at least max_retries times and for at least
        # down_timeout_s after its first failure (a replica restart or a redeploy can take a while).
        self.down_timeout_s = down_timeout_s
        self.retries_total: dict[str, int] = dict.fromkeys(handles, 0)

    def _submit(self, name: str, images, prompts):
        return self.handles[name].score.remote(images=images, prompts=prompts, reward=name)

    def score(self, *, images: np.ndarray, prompts: list[str], gamma: float = 0.0) -> ScoredBatch:
        """All rewards at once; a transient failure is retried (counted), a persistent one raises.

        Never returns a partial result: either every reward answered for every image, or
        RewardServiceError names the reward that stayed down.
        """
        import ray

        check_batch(images, prompts)
        images_ref = ray.put(images)  # one copy in the object store, shared by every reward call
        start = time.perf_counter()
        pending = {name: self._submit(name, images_ref, prompts) for name in self.handles}
        outputs: dict[str, RewardOutput] = {}
        latency: dict[str, float] = {}
        retries = dict.fromkeys(self.handles, 0)
        errors: dict[str, str] = {}
        first_failure: dict[str, float] = {}
        while pending:
            name, response = next(iter(pending.items()))
            try:
                outputs[name] = response.result(timeout_s=self.timeout_s)
                latency[name] = time.perf_counter() - start
                del pending[name]
            except Exception as err:  # noqa: BLE001 - replica death, timeout or a raised error: retry
                errors[name] = _describe(err)
                down_s = time.monotonic() - first_failure.setdefault(name, time.monotonic())
                if retries[name] >= self.max_retries and down_s >= self.down_timeout_s:
                    raise RewardServiceError(
                        f"reward {name!r} failed {retries[name] + 1} time(s) in a row over {down_s:.0f}s (timeout "
                        f"{self.timeout_s}s per call, reward_service.down_timeout_s {self.down_timeout_s}s); "
                        f"last error: {errors[name][:500]}"
                    ) from err
                retries[name] += 1
                self.retries_total[name] += 1
                time.sleep(self.retry_backoff_s * retries[name])
                pending[name] = self._submit(name, images_ref, prompts)
        if CAPTION in self.volume_modalities:
            # k = 3 volume: the captioner's captions embedded by a text-embedding reward (CLIP).
            source = caption_embedding_source(outputs, set(self.handles))
            if source is not None:
                target, captions = source
                outputs[target].embeddings[CAPTION] = self.handles[target].embed_texts.remote(
                    texts=captions, reward=target).result(timeout_s=self.timeout_s)
        combined = combine_rewards(outputs, weights=self.weights, gamma=gamma,
                                   volume_modalities=self.volume_modalities)
        captions = next((o.captions for o in outputs.values() if o.captions is not None), None)
        return ScoredBatch(
            total=combined.total,
            components=combined.components,
            volume=combined.volume,
            latency_s=latency,
            captions=captions,
            errors={n: o.errors for n, o in outputs.items() if o.errors is not None},
            retries=retries,
        )
