"""Advantage estimation from scalar rewards (DDPO's per-prompt stat tracker)."""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStatTracker:
    """Normalizes rewards per prompt with a running history.

    For each prompt a deque of its last ``buffer_size`` rewards is kept; an advantage is
    ``(r - mean) / (std + 1e-6)`` over that prompt's history, or over the whole batch while the
    prompt has fewer than ``min_count`` rewards (DDPO's ``PerPromptStatTracker``).
    """

    def __init__(self, *, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.history: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Adds the batch to the history and returns advantages float32 [B]."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {rewards.shape[0]} rewards")
        advantages = np.empty_like(rewards)
        prompt_array = np.array(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):
            mask = prompt_array == prompt
            history = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            history.extend(rewards[mask].tolist())
            if len(history) < self.min_count:
                mean, std = rewards.mean(), rewards.std()
            else:
                mean, std = np.mean(history), np.std(history)
            advantages[mask] = (rewards[mask] - mean) / (std + 1e-6)
        return advantages.astype(np.float32)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.history = {k: deque(v, maxlen=self.buffer_size) for k, v in state["history"].items()}


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """Whole-batch normalization (no per-prompt history): (r - mean) / (std + 1e-6)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return ((rewards - rewards.mean()) / (rewards.std() + 1e-6)).astype(np.float32)


def clip_advantages(advantages: np.ndarray, *, max_abs: float) -> np.ndarray:
    """Clips to ±max_abs (DDPO's ``adv_clip_max``)."""
    return np.clip(advantages, -max_abs, max_abs)


def group_advantages(group_ids: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """Group-relative advantages float32 [N] (GRPO's, as DanceGRPO and Flow-GRPO use for diffusion):
    ``(r - mean_g) / (std_g + 1e-6)`` over the samples of the sample's group g in this batch, with no
    history. group_ids: int [N]; rewards: float [N], finite. A group of one sample, or whose rewards are
    all equal, carries no comparison and gets 0."""
    group_ids = np.asarray(group_ids)
    rewards = np.asarray(rewards, dtype=np.float64)
    if group_ids.shape != rewards.shape or rewards.ndim != 1:
        raise ValueError(f"group_ids {group_ids.shape} and rewards {rewards.shape} must be the same 1-D shape")
    advantages = np.zeros(rewards.shape, dtype=np.float64)
    for group in np.unique(group_ids):
        members = group_ids == group
        r = rewards[members]
        advantages[members] = (r - r.mean()) / (r.std() + 1e-6)
    return advantages.astype(np.float32)
