"""The reward stage actor: scores the samplers' image batches, in-process (``RewardWorker``) or through
the reward services (``RewardClient`` over Serve deployment handles).

A plain class (the driver applies ``ray.remote``). It receives each ImageBatch by reference (Ray
resolves it in this process), so images travel sampler -> reward stage directly and never through
the driver, and returns a small ``ScoredBatch`` stamped with where the images came from.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from rewards.base import ScoredBatch

if TYPE_CHECKING:  # the rewards layer does not import the policy side; only the type is named
    from actors.trajectory import ImageBatch


class RewardStage:
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

    def score(self, *, batch: ImageBatch, gamma: float) -> ScoredBatch:
        start = time.perf_counter()
        scored = self.worker.score(images=batch.images, prompts=batch.prompts, gamma=gamma)
        return dataclasses.replace(scored, sample_s=batch.sample_s, policy_version=batch.policy_version,
                                   reward_wall_s=time.perf_counter() - start)
