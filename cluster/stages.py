"""Small actor classes the driver builds on Ray (plain classes; ray.remote is applied in driver.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from actors.trajectory import ImageBatch


@dataclass
class ScoredImages:
    """One sampler batch's rewards plus the sampler timing, small enough for the driver to read.

    total float32 [B] (what the learner trains on; NaN = unscorable), components name -> [B].
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    volume: np.ndarray | None
    reward_latency_s: dict[str, float]
    sample_s: float
    policy_version: int
    captions: list[str] | None = None
    retries: dict[str, int] | None = None
    reward_wall_s: float = 0.0  # wall time of the whole scoring call (rewards may run concurrently)


class RewardStage:
    """Scores ImageBatches from the samplers, in-process (``rewards.RewardWorker``) or through the
    reward services (``rewards.client.RewardClient`` over Serve deployment handles).

    Receives the ImageBatch by reference (Ray resolves it in this process), so images travel
    sampler -> reward stage directly and never through the driver.
    """

    def __init__(self, *, specs: dict[str, dict], weights: dict[str, float], volume_modalities: tuple[str, ...],
                 service: dict | None = None):
        if service is None:
            from rewards.worker import RewardWorker

            self.worker = RewardWorker(specs=specs, weights=weights, volume_modalities=volume_modalities)
        else:
            from ray import serve

            from rewards.client import RewardClient

            service = dict(service)
            apps = service.pop("apps")  # reward -> the Serve app that scores it
            handles = {name: serve.get_app_handle(apps[name]) for name in specs}
            self.worker = RewardClient(handles=handles, weights=weights, volume_modalities=volume_modalities,
                                       **service)

    def score(self, *, batch: ImageBatch, gamma: float) -> ScoredImages:
        start = time.perf_counter()
        scored = self.worker.score(images=batch.images, prompts=batch.prompts, gamma=gamma)
        return ScoredImages(
            total=scored.total,
            components=scored.components,
            volume=scored.volume,
            reward_latency_s=scored.latency_s,
            sample_s=batch.sample_s,
            policy_version=batch.policy_version,
            captions=scored.captions,
            retries=scored.retries,
            reward_wall_s=time.perf_counter() - start,
        )
