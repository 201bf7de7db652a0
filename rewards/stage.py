"""The reward stage actor: scores the samplers' image batches, in-process (``RewardWorker``) or through
the reward services (``RewardClient`` over Serve deployment handles), and the evaluation images with
the gold rewards (``GoldScorer``, always in-process).

A plain class (the driver applies ``ray.remote``). It receives each ImageBatch by reference (Ray
resolves it in this process), so images travel sampler -> reward stage directly and never through
the driver, and returns a small ``ScoredBatch`` stamped with where the images came from.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING

from rewards.base import ScoredBatch

if TYPE_CHECKING:  # the rewards layer does not import the policy side; only the type is named
    from actors.trajectory import ImageBatch


class RewardStage:
    def __init__(self, *, specs: dict[str, dict], weights: dict[str, float], volume_modalities: tuple[str, ...],
                 service: dict | None = None, eval_specs: dict[str, dict] | None = None,
                 recall: tuple[str, dict] | None = None):
        # One cache for the training and the gold rewards: a CLIP model configured in both is loaded once.
        self.encoders = None
        if service is None:
            from rewards.clip_encoder import EncoderCache
            from rewards.worker import RewardWorker

            self.encoders = EncoderCache()

            self.worker = RewardWorker(specs=specs, weights=weights, volume_modalities=volume_modalities,
                                       encoders=self.encoders)
        else:
            from ray import serve

            from rewards.client import RewardClient

            service = dict(service)
            apps = service.pop("apps")  # reward -> the Serve app that scores it
            handles = {name: serve.get_app_handle(apps[name]) for name in specs}
            self.worker = RewardClient(handles=handles, weights=weights, volume_modalities=volume_modalities,
                                       **service)
        self._gold_args = {"specs": dict(eval_specs or {}), "recall": recall}
        self._gold = None  # built on the first evaluation: runs without gold rewards load nothing
        self._gold_lock = threading.Lock()  # with services the stage runs several calls at once

    def score(self, *, batch: ImageBatch, gamma: float) -> ScoredBatch:
        start = time.perf_counter()
        scored = self.worker.score(images=batch.images, prompts=batch.prompts, gamma=gamma)
        return dataclasses.replace(scored, sample_s=batch.sample_s, policy_version=batch.policy_version,
                                   reward_wall_s=time.perf_counter() - start)

    def evaluate(self, *, batch: ImageBatch, candidates: list[str]) -> dict:
        """The gold rewards' scores of an evaluation batch's B images and their Recall@1 hits against
        ``candidates`` (``rewards.gold.GoldScorer.evaluate``): {"scores": {reward: float32 [B]},
        "recall_hit": bool [B] or None}."""
        with self._gold_lock:
            if self._gold is None:
                from rewards.gold import GoldScorer

                self._gold = GoldScorer(**self._gold_args, encoders=self.encoders)  # None: a cache of its own
        return self._gold.evaluate(images=batch.images, prompts=batch.prompts, candidates=candidates)
