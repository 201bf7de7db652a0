"""The ``eval/`` metrics of one evaluation, as pure functions of its images, prompt sets and scores.

Notation: N evaluation images, each of a named prompt set (``sets`` [N]) and a prompt (``prompts`` [N]);
per-image scores are float32 [N] (NaN: an image a reward could not score, left out of means). Per set
s and evaluation reward r:

- ``eval/<r>/<s>``: the mean of r over the set; ``eval/reward_mean/<s>``: the training reward's;
- ``eval/gold_<s>``, ``eval/gold_<s>_se``: the gold reward's mean and its standard error
  std / sqrt(n) (ddof = 1, n = scored images); ``eval/gold_<s>/<group>``: the mean per prompt group,
  for gold rewards that group their prompts (the shapes judge: caption families);
  ``eval/gold_<s>/checks/<c>``: the mean of each part of the gold score over the images it applies to,
  for gold rewards that return their parts (the shapes judge: binding, count, relation, overlap);
- ``eval/diversity/<s>``: the mean over the set's prompts of the mean pairwise RMS pixel distance
  between that prompt's images (pixels in [0, 1]: 0 = identical images, at most 1); a policy that
  collapses to one image per prompt drives it to 0;
- ``eval/recall_at_1/<s>``: the fraction of images whose own prompt is the nearest of all evaluation
  prompts in the recall reward's (CLIP) embedding space.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """(mean, standard error = std(ddof=1) / sqrt(n)) of the finite values of float [n]; NaN where there
    are too few (no value for the mean, fewer than two for the error)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    mean = float(finite.mean()) if finite.size else float("nan")
    se = float(finite.std(ddof=1) / np.sqrt(finite.size)) if finite.size >= 2 else float("nan")
    return mean, se


def _mean(values: np.ndarray) -> float:
    return mean_and_se(values)[0]


def by_key(values: np.ndarray, keys: list[str]) -> dict[str, float]:
    """{key: mean of the finite values [n] with that key} for ``keys`` [n], in first-seen key order."""
    values, keys_arr = np.asarray(values), np.asarray(keys, dtype=object)
    return {key: _mean(values[keys_arr == key]) for key in dict.fromkeys(keys)}


def pairwise_rms(images: np.ndarray) -> float:
    """The mean over pairs (i < j) of sqrt(mean((x_i - x_j)²)) of uint8 images [k, H, W, 3] scaled to [0, 1];
    NaN for fewer than two images."""
    if len(images) < 2:
        return float("nan")
    pixels = np.asarray(images, dtype=np.float64) / 255.0
    return float(np.mean([np.sqrt(np.mean((pixels[i] - pixels[j]) ** 2))
                          for i, j in combinations(range(len(pixels)), 2)]))


def diversity(images: np.ndarray, prompts: list[str]) -> float:
    """The mean over distinct prompts of ``pairwise_rms`` of that prompt's images; images uint8 [n, H, W, 3],
    prompts [n]. NaN when no prompt has two images."""
    prompt_arr = np.asarray(prompts, dtype=object)
    per_prompt = [pairwise_rms(images[prompt_arr == p]) for p in dict.fromkeys(prompts)]
    finite = [v for v in per_prompt if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def eval_metrics(*, sets: list[str], prompts: list[str], images: np.ndarray, train_total: np.ndarray,
                 scores: dict[str, np.ndarray], gold: str | None, groups: list[str] | None,
                 recall_hits: np.ndarray | None, with_diversity: bool,
                 gold_checks: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """The per-set metrics (module docstring) of N images: sets and prompts [N], images uint8 [N, H, W, 3],
    train_total float [N] (the training reward), scores {evaluation reward: float [N]}, gold (one of
    ``scores``' names, or None), groups [N] (each image's group under the gold reward, or None),
    recall_hits bool [N] (or None: no recall reward), with_diversity (images per prompt >= 2), gold_checks
    {check: float [N]} (the gold score's parts, NaN where one does not apply; None: the gold has none)."""
    set_arr = np.asarray(sets, dtype=object)
    metrics: dict[str, float] = {}
    for s in dict.fromkeys(sets):
        mask = set_arr == s
        metrics[f"eval/reward_mean/{s}"] = _mean(np.asarray(train_total)[mask])
        for name, values in scores.items():
            metrics[f"eval/{name}/{s}"] = _mean(np.asarray(values)[mask])
        if gold is not None:
            gold_values = np.asarray(scores[gold])[mask]
            metrics[f"eval/gold_{s}"], metrics[f"eval/gold_{s}_se"] = mean_and_se(gold_values)
            if groups is not None:
                for group, value in by_key(gold_values, [g for g, m in zip(groups, mask, strict=True) if m]).items():
                    metrics[f"eval/gold_{s}/{group}"] = value
            for check, values in (gold_checks or {}).items():
                applies = np.asarray(values, dtype=np.float64)[mask]
                if np.isfinite(applies).any():  # a set without relation prompts has no relation rate
                    metrics[f"eval/gold_{s}/checks/{check}"] = _mean(applies)
        if with_diversity:
            metrics[f"eval/diversity/{s}"] = diversity(images[mask], [p for p, m in zip(prompts, mask, strict=True) if m])
        if recall_hits is not None:
            metrics[f"eval/recall_at_1/{s}"] = float(np.mean(np.asarray(recall_hits, dtype=bool)[mask]))
    return metrics
