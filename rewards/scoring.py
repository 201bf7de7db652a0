"""One reward path for every backend: fan a batch out to each reward, collect its scores (retrying
transient failures), embed captions for the k = 3 GARD volume, combine with the weights and the volume
(``rewards.combine``) and assemble one ``ScoredBatch``.

The backends differ only in how a reward is called: in this process (``RewardWorker``: a call that
completes at once, not retried) or through Ray Serve deployment handles (``RewardClient``: calls run
concurrently, each with a timeout and bounded retries).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rewards.base import RewardOutput, ScoredBatch, check_batch
from rewards.combine import CAPTION, caption_embedding_source, combine_rewards


class RewardServiceError(RuntimeError):
    """A reward kept failing (or timing out) after its retries; names the reward."""


class Pending(Protocol):
    """A reward call in flight (a Serve ``DeploymentResponse``, or a ``Completed`` local call)."""

    def result(self, *, timeout_s: float | None = None): ...


@dataclass
class Completed:
    """A local reward call that already ran: its output or its error, and how long it took."""

    value: RewardOutput | None
    error: BaseException | None
    latency_s: float

    def result(self, *, timeout_s: float | None = None) -> RewardOutput:
        if self.error is not None:
            raise self.error
        return self.value


def run_locally(call: Callable[[], RewardOutput]) -> Completed:
    start = time.perf_counter()
    try:
        return Completed(call(), None, time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - reported by score_batch like a remote failure
        return Completed(None, err, time.perf_counter() - start)


@dataclass(frozen=True)
class RetryPolicy:
    """timeout_s per call; a reward that keeps failing is retried at least max_retries times and for at
    least down_timeout_s after its first failure (a replica restart or a redeploy can take a while)."""

    timeout_s: float | None = 120.0  # None: calls that already completed (in-process rewards)
    max_retries: int = 2
    retry_backoff_s: float = 1.0
    down_timeout_s: float = 0.0


def _describe(err: BaseException) -> str:
    """The original error inside Ray's wrappers (RayTaskError.cause), in one line."""
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


def score_batch(*, images: np.ndarray, prompts: list[str], names: list[str], submit: Callable[[str], Pending],
                embed_texts: Callable[[str, list[str]], np.ndarray], embedders: set[str], weights: dict[str, float],
                gamma: float, volume_modalities: tuple[str, ...], retry: RetryPolicy,
                on_retry: Callable[[str], None] = lambda name: None) -> ScoredBatch:
    """Scores B images with every reward in ``names``; never a partial result.

    submit(name) starts reward ``name`` on the batch; embed_texts(name, texts) embeds captions with a
    reward in ``embedders``. Either every reward answers for every image, or RewardServiceError names
    the reward that stayed down.
    """
    check_batch(images, prompts)
    start = time.perf_counter()
    pending = {name: submit(name) for name in names}
    outputs: dict[str, RewardOutput] = {}
    latency: dict[str, float] = {}
    retries = dict.fromkeys(names, 0)
    first_failure: dict[str, float] = {}
    while pending:
        name, response = next(iter(pending.items()))
        try:
            outputs[name] = response.result(timeout_s=retry.timeout_s)
            latency[name] = response.latency_s if isinstance(response, Completed) else time.perf_counter() - start
            del pending[name]
        except Exception as err:  # noqa: BLE001 - replica death, timeout or a raised error: retry
            down_s = time.monotonic() - first_failure.setdefault(name, time.monotonic())
            if retries[name] >= retry.max_retries and down_s >= retry.down_timeout_s:
                limits = (f" over {down_s:.0f}s (timeout {retry.timeout_s}s per call, reward_service.down_timeout_s "
                          f"{retry.down_timeout_s}s)" if retry.timeout_s is not None else " (in-process reward)")
                raise RewardServiceError(f"reward {name!r} failed {retries[name] + 1} time(s) in a row{limits}; "
                                         f"last error: {_describe(err)[:500]}") from err
            retries[name] += 1
            on_retry(name)
            time.sleep(retry.retry_backoff_s * retries[name])
            pending[name] = submit(name)
    if CAPTION in volume_modalities:
        # k = 3 volume: the captioner's captions embedded by a text-embedding reward (CLIP).
        source = caption_embedding_source(outputs, embedders)
        if source is not None:
            target, captions = source
            outputs[target].embeddings[CAPTION] = embed_texts(target, captions)
    combined = combine_rewards(outputs, weights=weights, gamma=gamma, volume_modalities=volume_modalities)
    combined.latency_s = latency
    combined.captions = next((o.captions for o in outputs.values() if o.captions is not None), None)
    combined.errors = {n: o.errors for n, o in outputs.items()
                       if o.errors is not None and any(e is not None for e in o.errors)}
    combined.retries = retries
    return combined
