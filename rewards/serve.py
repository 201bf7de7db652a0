"""Any registered reward as its own autoscaled Ray Serve application (DESIGN.md §4).

One application per reward (``reward-<name>``, HTTP route ``/<name>``), so each scales on its own.
Each replica builds the reward once. Requests, from deployment handles (samplers' reward stage) or
over HTTP, are split into single images that a ``@serve.batch`` queue merges across concurrent
requests into batches of up to ``max_batch_size`` images, so small requests still fill a batch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from ray import serve

from rewards.base import RewardOutput, check_batch
from rewards.http_codec import HttpLimits, RequestError, encode_response, parse_request

APP_PREFIX = "reward-"


@dataclass(frozen=True)
class ServeOptions:
    """Per-reward deployment settings (config: ``rewards.<name>.serve``)."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    max_ongoing_requests: int | None = None  # default: enough requests in flight to fill a batch
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    health_check_period_s: float = 10.0

    def __post_init__(self):
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"serve replicas must satisfy 0 <= min_replicas <= max_replicas >= 1, got "
                             f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas}")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError(f"serve.max_batch_size must be >= 1 and batch_wait_timeout_s >= 0, got "
                             f"{self.max_batch_size}, {self.batch_wait_timeout_s}")


def app_name(reward: str) -> str:
    return f"{APP_PREFIX}{reward}"


class RewardDeployment:
    """A Serve replica holding one reward. ``score`` for handles, ``__call__`` for HTTP."""

    def __init__(self, *, reward: str, options: dict, max_batch_size: int, batch_wait_timeout_s: float,
                 limits: dict):
        import torch

        from rewards.registry import build_reward

        torch.set_num_threads(1)
        self.reward_name = reward
        self.reward = build_reward(reward, **options)
        self.limits = HttpLimits(**limits)
        self._score_items.set_max_batch_size(max_batch_size)
        self._score_items.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches_run = 0

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_items(self, items: list[tuple[np.ndarray, str]]) -> list[dict]:
        """Scores single images merged from concurrent requests; groups same-sized images per call."""
        results: list[dict | None] = [None] * len(items)
        by_shape: dict[tuple, list[int]] = {}
        for i, (image, _) in enumerate(items):
            by_shape.setdefault(image.shape, []).append(i)
        for indices in by_shape.values():
            images = np.stack([items[i][0] for i in indices])
            prompts = [items[i][1] for i in indices]
            # The model runs in a thread so the replica keeps accepting (and validating) requests.
            output: RewardOutput = await asyncio.to_thread(self.reward, images, prompts)
            for row, i in enumerate(indices):
                results[i] = {
                    "score": float(output.scores[row]),
                    "embeddings": {k: v[row] for k, v in output.embeddings.items()},
                    "caption": output.captions[row] if output.captions is not None else None,
                    "error": output.errors[row] if output.errors is not None else None,
                }
        self.batches_run += 1
        return results

    async def _score(self, images: list[np.ndarray] | np.ndarray, prompts: list[str]) -> RewardOutput:
        items = await asyncio.gather(*(self._score_items((image, prompt)) for image, prompt in zip(images, prompts,
                                                                                                  strict=True)))
        modalities = items[0]["embeddings"].keys() if items else ()
        return RewardOutput(
            scores=np.array([it["score"] for it in items], dtype=np.float32),
            embeddings={m: np.stack([it["embeddings"][m] for it in items]) for m in modalities},
            captions=[it["caption"] for it in items] if items and items[0]["caption"] is not None else None,
            errors=[it["error"] for it in items] if any(it["error"] for it in items) else None,
        )

    async def score(self, *, images: np.ndarray, prompts: list[str]) -> RewardOutput:
        """Handle API: uint8 images [B, H, W, 3] and B prompts -> RewardOutput (inside the Ray cluster)."""
        check_batch(images, prompts)
        return await self._score(list(images), list(prompts))

    async def embed_texts(self, *, texts: list[str]) -> np.ndarray:
        """Unit-norm text embeddings [B, n] from rewards that have a text encoder (CLIP)."""
        if not hasattr(self.reward, "embed_texts"):
            raise TypeError(f"reward {self.reward_name!r} has no text encoder (embed_texts)")
        return await asyncio.to_thread(self.reward.embed_texts, list(texts))

    async def __call__(self, request):
        """HTTP API: POST JSON (see rewards/http_codec.py); 4xx with a message for every bad input."""
        from starlette.responses import JSONResponse

        start = time.perf_counter()
        try:
            if request.method != "POST":
                raise RequestError(405, f"use POST with a JSON body, not {request.method}")
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
                raise RequestError(413, f"request body is {declared} bytes, above the limit of "
                                        f"{self.limits.max_body_bytes}")
            body = await request.body()
            images, prompts, return_embeddings = parse_request(body, self.limits)
        except RequestError as err:
            return JSONResponse({"error": str(err), "reward": self.reward_name}, status_code=err.status)
        output = await self._score(images, prompts)
        response = encode_response(output, return_embeddings=return_embeddings)
        response["reward"] = self.reward_name
        response["latency_s"] = time.perf_counter() - start
        return JSONResponse(response)


def build_reward_app(reward: str, options: dict, serve_options: ServeOptions, limits: HttpLimits | None = None):
    """The Serve application of one reward, ready for ``serve.run(app, name=app_name(reward))``."""
    s = serve_options
    max_ongoing = s.max_ongoing_requests or max(2 * s.max_batch_size, 8)
    deployment = serve.deployment(
        RewardDeployment,
        name=f"{reward}",
        max_ongoing_requests=max_ongoing,
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "initial_replicas": s.initial_replicas if s.initial_replicas is not None else max(1, s.min_replicas),
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
        },
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        health_check_period_s=s.health_check_period_s,
    )
    return deployment.bind(
        reward=reward,
        options=options,
        max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s,
        limits=asdict(limits or HttpLimits()),
    )


def app_builder(args: dict):
    """``serve deploy`` entry point (deploy/serve_rewards.yaml): args = {reward, options, serve, limits}."""
    return build_reward_app(
        args["reward"], dict(args.get("options") or {}), ServeOptions(**(args.get("serve") or {})),
        HttpLimits(**(args.get("limits") or {})),
    )


@dataclass
class DeployedRewards:
    """What ``deploy_rewards`` started (so the caller removes exactly those) and the handles."""

    handles: dict = field(default_factory=dict)
    started: list[str] = field(default_factory=list)


def running_apps() -> set[str]:
    """Names of Serve applications currently RUNNING on the connected cluster."""
    try:
        status = serve.status()
    except Exception:  # noqa: BLE001 - Serve not started yet
        return set()
    return {name for name, app in status.applications.items() if str(app.status).endswith("RUNNING")}


def deploy_rewards(specs: dict[str, dict], serve_options: dict[str, ServeOptions], *, limits: HttpLimits,
                   http_host: str = "127.0.0.1", http_port: int = 8000, reuse_running: bool = True) -> DeployedRewards:
    """Starts (or reuses) one application per reward; returns handles and the apps it started."""
    serve.start(http_options={"host": http_host, "port": http_port})
    deployed = DeployedRewards()
    running = running_apps() if reuse_running else set()
    for reward, options in specs.items():
        name = app_name(reward)
        if name not in running:
            serve.run(build_reward_app(reward, options, serve_options[reward], limits), name=name,
                      route_prefix=f"/{reward}", blocking=False)
            deployed.started.append(name)
        deployed.handles[reward] = serve.get_app_handle(name)
    return deployed


def remove_rewards(names: list[str]) -> None:
    for name in names:
        try:
            serve.delete(name)
        except Exception:  # noqa: BLE001 - best effort at shutdown; a missing app is already gone
            pass
