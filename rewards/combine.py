"""Weighted combination of reward outputs with the GARD volume shaping term (GARD eq. 13).

``total_i = Σ_j w_j r_ij - γ · Vol_i`` where ``Vol_i`` is the volume of item i's embeddings in
``volume_modalities`` (``rewards.volume.gram_volume``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rewards.base import RewardOutput, ScoredBatch
from rewards.volume import gram_volume


def _check_weights(outputs: dict[str, RewardOutput], weights: dict[str, float]) -> None:
    missing = sorted(set(outputs) - set(weights))
    extra = sorted(set(weights) - set(outputs))
    if missing or extra:
        raise ValueError(
            f"weights must have one entry per reward: missing weights for {missing}, weights for rewards "
            f"that were not computed {extra} (rewards: {sorted(outputs)})"
        )
    for name, weight in weights.items():
        if not math.isfinite(weight):
            raise ValueError(f"weights[{name!r}] must be finite, got {weight!r}")


def volume_from_outputs(
    outputs: dict[str, RewardOutput], modalities: tuple[str, ...]
) -> tuple[np.ndarray | None, str | None]:
    """Vol [B] (float32) from the first output holding every modality, and that reward's name.

    Embeddings are stacked in ``modalities`` order into [B, k, n]; (None, None) if no output has them.
    """
    for name, out in outputs.items():
        if all(m in out.embeddings for m in modalities):
            dims = {m: out.embeddings[m].shape[1] for m in modalities}
            if len(set(dims.values())) != 1:
                raise ValueError(
                    f"reward {name!r} returned embeddings of different widths {dims}; the volume "
                    "needs them in one embedding space"
                )
            # float64: det G of nearly aligned vectors is a small difference of O(1) terms.
            stacked = np.stack([out.embeddings[m] for m in modalities], axis=1).astype(np.float64)
            return gram_volume(torch.from_numpy(stacked)).numpy().astype(np.float32), name
    return None, None


def combine_rewards(
    outputs: dict[str, RewardOutput],
    *,
    weights: dict[str, float],
    gamma: float = 0.0,
    volume_modalities: tuple[str, ...] = ("text", "image"),
) -> ScoredBatch:
    """Combines per-reward outputs into the shaped return (GARD eq. 13): Σ_j w_j r_j - γ · Vol.

    The volume is computed whenever some output has every modality in ``volume_modalities`` (for
    logging), and subtracted only with gamma > 0, where it is required. A NaN score makes that
    item's total NaN (the learner drops and counts such items).
    """
    if not outputs:
        raise ValueError("combine_rewards needs at least one reward output, got none")
    _check_weights(outputs, weights)
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(
            f"gamma must be finite and >= 0 (the volume is subtracted, GARD eq. 13), got {gamma!r}"
        )
    sizes = {name: out.scores.shape[0] for name, out in outputs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"reward outputs disagree on the batch size: {sizes}")
    batch = next(iter(sizes.values()))

    components = {name: out.scores.astype(np.float32) for name, out in outputs.items()}
    total = np.zeros(batch, dtype=np.float64)
    for name, scores in components.items():
        total += weights[name] * scores.astype(np.float64)

    volume, _ = volume_from_outputs(outputs, tuple(volume_modalities))
    if gamma > 0:
        if volume is None:
            returned = {name: sorted(out.embeddings) for name, out in outputs.items()}
            raise ValueError(
                f"gamma={gamma} needs the embeddings {list(volume_modalities)} from one reward, but none "
                f"returned them all; rewards returned {returned}"
            )
        total -= gamma * volume.astype(np.float64)
    return ScoredBatch(total=total.astype(np.float32), components=components, volume=volume)


CAPTION = "caption"


def caption_embedding_source(outputs: dict[str, RewardOutput], embedders: set[str]) -> tuple[str, list[str]] | None:
    """Where the caption modality for a k = 3 volume comes from (GARD eq. 12 with the LLaVA caption).

    Returns (name of a reward that embeds texts and returned "text" embeddings, the captions), or None
    when no reward captioned the images or none can embed text.
    """
    captions = next((o.captions for o in outputs.values() if o.captions is not None), None)
    target = next((name for name in outputs if name in embedders and "text" in outputs[name].embeddings), None)
    if captions is None or target is None:
        return None
    return target, list(captions)
