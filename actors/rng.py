"""Capture and restore a process's global random number generators (for exact checkpoint/resume).

Sampling never draws from these (every batch has its own ``torch.Generator`` seeded from
``(seed, epoch, worker, batch)``, actors/seeding.py), but library code may, so a checkpoint keeps
them: torch's CPU generator (and CUDA's when present), numpy's legacy global state and Python's
``random``. The state is plain tensors, ints and tuples, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """The process's global RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what ``rng_state`` captured (CUDA only when both sides have it)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
