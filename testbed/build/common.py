"""Shared machinery of the model builders: seeds, data batches from the world generator, resumable
training state and progress reporting.

Determinism rule: everything random in step ``k`` of a build comes from ``step_generator(seed, k)``
(noise, KL samples, batch picks) or from ``scene_batch(seed, k, ...)`` (the scenes), never from a
generator carried across steps. A resumed run therefore needs only the weights, the optimizer state
and the step counter to continue bit-identically: there is no RNG stream to restore.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from testbed.world import Scene, render, scene_for_seed

# Seed spaces of the different draws are kept apart by a large odd stride, so the scenes of step k
# of one model never coincide with the scenes of another model or of the evaluation sets.
_STRIDE = 1_000_003
EVAL_SEED_BASE = 900_000_000  # evaluation scenes: far from any training scene index


def step_generator(seed: int, step: int, *, stream: int = 0) -> torch.Generator:
    """The torch.Generator of one training step (CPU): a pure function of (seed, step, stream)."""
    return torch.Generator().manual_seed((seed * _STRIDE + step) * 7 + stream)


def scene_batch(seed: int, step: int, batch_size: int) -> list[Scene]:
    """The training-split scenes of one step: ``batch_size`` scenes with no held-out kind."""
    base = (seed * _STRIDE + step) * batch_size
    return [scene_for_seed(base + i) for i in range(batch_size)]


def codec_scene_batch(seed: int, step: int, batch_size: int, *, held_out_every: int = 4) -> list[Scene]:
    """The VAE's scenes of one step: every kind of the world, one scene in ``held_out_every`` with a
    held-out kind. The VAE is the pipeline's image codec, trained on broader data than the
    text-conditioned models, as Stable Diffusion's autoencoder was (OpenImages, against the UNet's LAION
    captions); the hold-out is a property of text conditioning, which the UNet and text encoder never
    see for the held-out kinds."""
    base = (seed * _STRIDE + step) * batch_size
    return [scene_for_seed(base + i, held_out=i % held_out_every == held_out_every - 1) for i in range(batch_size)]


def eval_scenes(n: int, *, held_out: bool, family: str | None = None, offset: int = 0) -> list[Scene]:
    """Fixed evaluation scenes, disjoint from every training batch (seen kinds or with a held-out kind)."""
    return [scene_for_seed(EVAL_SEED_BASE + offset + i, family=family, held_out=held_out) for i in range(n)]


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float32 [B, 3, H, W] in [-1, 1] (the diffusers VAE convention)."""
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (rounded, as a pipeline's output would be)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    return images_to_tensor([render(s) for s in scenes])


def cosine_lr(step: int, *, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to 10% of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainState:
    """What a resumed build needs: the step reached, the trainable modules' and optimizer's state."""

    step: int
    modules: dict[str, dict[str, torch.Tensor]]
    optimizer: dict

    def save(self, path: Path) -> None:
        """Atomic write (temporary file, then rename): a build killed mid-save keeps the previous state."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        os.close(fd)
        torch.save({"step": self.step, "modules": self.modules, "optimizer": self.optimizer}, tmp)
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> TrainState | None:
        if not path.exists():
            return None
        data = torch.load(path, map_location="cpu", weights_only=False)
        return TrainState(step=int(data["step"]), modules=data["modules"], optimizer=data["optimizer"])


def train_loop(
    *,
    name: str,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[int], tuple[torch.Tensor, dict[str, float]]],
    steps: int,
    state_path: Path,
    lr_at: Callable[[int], float],
    save_every: int = 500,
    log_every: int = 50,
    clip_norm: float = 1.0,
    stop_after: int | None = None,
) -> int:
    """Runs steps [resumed step, ``steps``) of ``loss_fn`` (a function of the step index), saving the
    training state every ``save_every`` steps and at the end; returns the step reached.

    The state at ``state_path`` (if any) is loaded first, so rerunning a build continues where it stopped.
    ``stop_after`` ends this run early at that step (as an interruption would; the learning-rate schedule
    still spans ``steps``), so a long build can be done in time-boxed pieces.
    """
    state = TrainState.load(state_path)
    start = 0
    if state is not None:
        for key, module in modules.items():
            module.load_state_dict(state.modules[key])
        optimizer.load_state_dict(state.optimizer)
        start = state.step
        print(f"[{name}] resuming at step {start} from {state_path.name}", file=sys.stderr, flush=True)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]

    def save(step: int) -> None:
        TrainState(step, {k: m.state_dict() for k, m in modules.items()}, optimizer.state_dict()).save(state_path)

    end = steps if stop_after is None else min(steps, stop_after)
    t0, running = time.time(), {}
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, stats = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        for key, value in {"loss": loss.item(), **stats}.items():
            running[key] = running.get(key, 0.0) + value
        done = step + 1
        if done % log_every == 0 or done == steps:
            n = log_every if done % log_every == 0 else done % log_every
            rate = (done - start) / max(time.time() - t0, 1e-9)
            eta = (steps - done) / max(rate, 1e-9)
            shown = " ".join(f"{k}={v / n:.4g}" for k, v in running.items())
            print(f"[{name}] step {done}/{steps} {shown} {rate:.2f} it/s eta {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)
            running = {}
        if done % save_every == 0 or done == end:
            save(done)
    if start >= end:
        print(f"[{name}] already trained to step {start} (asked {end}); nothing to do", file=sys.stderr, flush=True)
    return max(start, end)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
