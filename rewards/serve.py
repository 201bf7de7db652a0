"""Any registered reward as its own autoscaled Ray Serve application.

One application per reward (``reward-<name>``, HTTP route ``/<name>``), so each scales on its own.
Each replica builds the reward once. Requests, from deployment handles (samplers' reward stage) or
over HTTP, are split into single images that a ``@serve.batch`` queue merges across concurrent
requests into batches of up to ``max_batch_size`` images, so small requests still fill a batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from ray import serve

from rewards.base import RewardOutput, TextEmbedder, check_batch
from rewards.http_codec import HttpLimits, RequestError, decode_images, encode_response, parse_request
from rewards.http_io import error_response, json_response, read_body
from rewards.serve_batch import Item, ItemScoringError, score_batch
from rewards.serve_bind import bind_replica_grpc_to_node_ip
from rewards.serve_options import ServeOptions

APP_PREFIX = "reward-"


def app_name(reward: str) -> str:
    return f"{APP_PREFIX}{reward}"


class RewardDeployment:
    """A Serve replica holding one or more rewards (``score`` for handles, ``__call__`` for HTTP).

    Rewards hosted together (a ``serve.group``) are built with one ``EncoderCache``, so clip_score and
    aesthetic on the same CLIP model share one image encoder per replica. With ``forward_to`` the
    replica holds no model: it is the HTTP route ``/<reward>`` of a reward hosted in that group app.
    """

    def __init__(self, *, reward: str, rewards: dict[str, dict], max_batch_size: int, batch_wait_timeout_s: float,
                 limits: dict, forward_to: str | None = None, pad_batches: bool = False):
        import torch

        from rewards.clip_encoder import EncoderCache
        from rewards.registry import build_reward

        # Before Serve starts this replica's gRPC server, which it does once this constructor returns.
        self.grpc_host = bind_replica_grpc_to_node_ip()
        torch.set_num_threads(1)
        self.reward_name = reward
        self.limits = HttpLimits(**limits)
        self.backend = serve.get_app_handle(forward_to) if forward_to else None
        encoders = EncoderCache()
        self.rewards = {} if forward_to else {name: build_reward(name, encoders=encoders, **(options or {}))
                                              for name, options in rewards.items()}
        self.encoders = encoders
        self._score_items.set_max_batch_size(max_batch_size)
        self._score_items.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.pad_to = max_batch_size if pad_batches else None  # fixed-shape model calls (ServeOptions)
        self.batches_run = 0
        self.items_failed = 0
        self.inflight_images = 0  # images of requests being decoded or scored here (HTTP and handle)
        self.last_batch_s = 0.0

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_items(self, items: list[Item]) -> list[dict | ItemScoringError]:
        """Scores single items merged from concurrent requests (rewards/serve_batch.py); an item that fails
        gets its error as its result, so the other requests of the batch still get theirs."""
        start = time.perf_counter()
        # The model runs in a thread so the replica keeps accepting (and validating) requests.
        results, failed = await asyncio.to_thread(score_batch, self.rewards, items, pad_to=self.pad_to)
        self.batches_run += 1
        self.items_failed += failed
        self.last_batch_s = time.perf_counter() - start
        return results

    def stats(self) -> dict:
        """What this replica hosts and has done: rewards, distinct CLIP encoders, batches run, items that
        failed alone, images in flight, encoder cache hits, the host its gRPC server is bound to."""
        encoders = self.encoders.values()
        return {"rewards": sorted(self.rewards), "clip_encoders": len(encoders), "batches_run": self.batches_run,
                "items_failed": self.items_failed, "inflight_images": self.inflight_images,
                "encoder_cache_hits": sum(e.cache_hits for e in encoders), "grpc_host": self.grpc_host}

    def _which(self, reward: str | None) -> str:
        reward = reward or self.reward_name
        if self.backend is None and reward not in self.rewards:
            raise ValueError(f"this deployment serves {sorted(self.rewards)}, not {reward!r}")
        return reward

    async def _score(self, images, prompts: list[str], reward: str) -> RewardOutput:
        if self.backend is not None:
            return await self.backend.score.remote(images=np.stack(images), prompts=list(prompts), reward=reward)
        items = await asyncio.gather(*(self._score_items((reward, image, prompt))
                                       for image, prompt in zip(images, prompts, strict=True)))
        for i, item in enumerate(items):
            if isinstance(item, ItemScoringError):
                raise ItemScoringError(f"images[{i}]: {item.message}")
        modalities = items[0]["embeddings"].keys() if items else ()
        return RewardOutput(
            scores=np.array([it["score"] for it in items], dtype=np.float32),
            embeddings={m: np.stack([it["embeddings"][m] for it in items]) for m in modalities},
            captions=[it["caption"] for it in items] if items and items[0]["caption"] is not None else None,
            errors=[it["error"] for it in items] if any(it["error"] for it in items) else None,
        )

    async def score(self, *, images: np.ndarray, prompts: list[str], reward: str | None = None) -> RewardOutput:
        """Handle API: uint8 images [B, H, W, 3] and B prompts -> RewardOutput (inside the Ray cluster).

        Handle callers are counted in flight but never refused: Serve's ``max_ongoing_requests`` already
        holds them back in their router, and a refusal would only turn into a retry."""
        check_batch(images, prompts)
        reward = self._which(reward)
        self.inflight_images += len(images)
        try:
            return await self._score(list(images), list(prompts), reward)
        finally:
            self.inflight_images -= len(images)

    async def embed_texts(self, *, texts: list[str], reward: str | None = None) -> np.ndarray:
        """Unit-norm text embeddings [B, n] from a reward with a text encoder (CLIP)."""
        reward = self._which(reward)
        if self.backend is not None:
            return await self.backend.embed_texts.remote(texts=list(texts), reward=reward)
        if not isinstance(self.rewards[reward], TextEmbedder):
            raise TypeError(f"reward {reward!r} has no text encoder (embed_texts)")
        return await asyncio.to_thread(self.rewards[reward].embed_texts, list(texts))

    def _admit(self, count: int) -> None:
        """Claims ``count`` images in flight or refuses with 429 (no await: check and claim are atomic)."""
        limit = self.limits.max_inflight_images
        if self.inflight_images + count > limit:
            retry_s = max(1, math.ceil(self.last_batch_s))  # about one batch from now, room has been made
            raise RequestError(429, f"this replica has {self.inflight_images} images in flight; {count} more would "
                                    f"exceed the limit of {limit} (max_inflight_images); retry after {retry_s} s",
                               limit="max_inflight_images", value=self.inflight_images + count, maximum=limit,
                               retry_after_s=retry_s)
        self.inflight_images += count

    async def __call__(self, request):
        """HTTP API: POST JSON (see rewards/http_codec.py); a 4xx with a message for every bad input.

        The body is read up to max_body_bytes, parsed and checked up to the images' headers; only a
        request within every bound and admitted under max_inflight_images is decoded and scored."""
        start = time.perf_counter()
        try:
            if request.method != "POST":
                raise RequestError(405, f"use POST with a JSON body, not {request.method}")
            body = await read_body(request, self.limits.max_body_bytes)
            parsed = await asyncio.to_thread(parse_request, body, self.limits)
            del body
            self._admit(len(parsed.images))
            try:
                images = await asyncio.to_thread(decode_images, parsed)
                output = await self._score(images, parsed.prompts, self.reward_name)
            except ItemScoringError as err:
                raise RequestError(422, f"{err.message}; no scores are returned for this request") from None
            finally:
                self.inflight_images -= len(parsed.images)
        except RequestError as err:
            return error_response(err, reward=self.reward_name)
        response = encode_response(output, return_embeddings=parsed.return_embeddings)
        response["reward"] = self.reward_name
        response["latency_s"] = time.perf_counter() - start
        return json_response(response)


def build_reward_app(reward: str, options: dict, serve_options: ServeOptions, limits: HttpLimits | None = None, *,
                     colocated: dict[str, dict] | None = None, forward_to: str | None = None):
    """The Serve application of one reward, ready for ``serve.run(app, name=app_name(reward))``.

    colocated: name -> options of all rewards hosted together (a group app; ``reward`` is one of them).
    forward_to: make a model-less route app that forwards to that group app.
    """
    s = serve_options
    max_ongoing = s.max_ongoing_requests or max(2 * s.max_batch_size, 8)
    if forward_to:  # a thin async router: one replica holds many requests in flight
        autoscaling = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
        actor_options = {"num_cpus": 0.05}
        max_ongoing = max(max_ongoing, 64)
    else:
        autoscaling = {
            "min_replicas": s.min_replicas,
            "initial_replicas": s.initial_replicas if s.initial_replicas is not None else max(1, s.min_replicas),
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "metrics_interval_s": s.metrics_interval_s,
            "look_back_period_s": s.look_back_period_s,
        }
        actor_options = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    deployment = serve.deployment(
        RewardDeployment,
        name=f"{reward}",
        max_ongoing_requests=max_ongoing,
        autoscaling_config=autoscaling,
        ray_actor_options=actor_options,
        health_check_period_s=s.health_check_period_s,
    )
    return deployment.bind(
        reward=reward,
        rewards=colocated or {reward: options},
        max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s,
        pad_batches=s.pad_batches,
        limits=asdict(limits or HttpLimits()),
        forward_to=forward_to,
    )


def app_builder(args: dict):
    """``serve deploy`` entry point (deploy/serve_rewards.yaml): args = {reward, options, serve, limits}."""
    return build_reward_app(
        args["reward"], dict(args.get("options") or {}), ServeOptions(**(args.get("serve") or {})),
        HttpLimits(**(args.get("limits") or {})),
    )


@dataclass
class DeployedRewards:
    """Handles per reward, the app each reward is scored by, and the apps this call started."""

    handles: dict = field(default_factory=dict)
    apps: dict[str, str] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)


def group_app_name(group: str) -> str:
    return f"{APP_PREFIX}group-{group}"


def running_apps() -> set[str]:
    """Names of Serve applications currently RUNNING on the connected cluster."""
    try:
        status = serve.status()
    except Exception:  # noqa: BLE001 - Serve not started yet
        return set()
    return {name for name, app in status.applications.items() if str(app.status).endswith("RUNNING")}


def deploy_rewards(specs: dict[str, dict], serve_options: dict[str, ServeOptions], *, limits: HttpLimits,
                   http_host: str = "127.0.0.1", http_port: int = 8000, reuse_running: bool = True) -> DeployedRewards:
    """Starts (or reuses) one application per reward; returns handles and the apps it started.

    Rewards whose ``serve.group`` is the same are hosted by one group app (one replica holds them all,
    sharing CLIP encoders; it scales with the first member's settings) and keep their own HTTP route
    ``/<reward>`` through a thin forwarding app.
    """
    serve.start(http_options={"host": http_host, "port": http_port})
    deployed = DeployedRewards()
    running = running_apps() if reuse_running else set()

    def run(app, name: str, route: str | None) -> None:
        if name not in running:
            serve.run(app, name=name, route_prefix=route, blocking=False)
            deployed.started.append(name)
            running.add(name)

    groups: dict[str, list[str]] = {}
    for reward in specs:
        if serve_options[reward].group:
            groups.setdefault(serve_options[reward].group, []).append(reward)
    for reward, options in specs.items():
        group = serve_options[reward].group
        if group:
            members = {m: specs[m] for m in groups[group]}
            backend = group_app_name(group)
            first = groups[group][0]
            run(build_reward_app(first, specs[first], serve_options[first], limits, colocated=members), backend, None)
            run(build_reward_app(reward, options, serve_options[reward], limits, forward_to=backend),
                app_name(reward), f"/{reward}")
            deployed.apps[reward] = backend
        else:
            run(build_reward_app(reward, options, serve_options[reward], limits), app_name(reward), f"/{reward}")
            deployed.apps[reward] = app_name(reward)
        deployed.handles[reward] = serve.get_app_handle(deployed.apps[reward])
    return deployed


def remove_rewards(names: list[str]) -> None:
    """Deletes applications, routes before the group apps they forward to."""
    for name in sorted(names, key=lambda n: n.startswith(f"{APP_PREFIX}group-")):
        try:
            serve.delete(name)
        except Exception:  # noqa: BLE001 - best effort at shutdown; a missing app is already gone
            pass
