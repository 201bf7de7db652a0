"""Scoring one Serve batch: single (reward, image, prompt) items merged from concurrent requests.

Items of the same reward and image size are scored by one model call. A failing call must not fail
the other requests of the batch (``@serve.batch`` would hand its exception to every caller), so the
items of that call are scored again one by one and each item that still fails gets its own
``ItemScoringError`` as its result: only the request that sent it fails.
"""

from __future__ import annotations

import numpy as np

from rewards.base import RewardOutput

Item = tuple[str, np.ndarray, str]  # (reward name, uint8 image [H, W, 3], prompt)


class ItemScoringError(ValueError):
    """A reward raised on one item scored alone: the input, not the batch, is what failed."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message  # kept as an attribute: Ray copies it onto the error a handle caller sees


def _rows(output: RewardOutput, count: int) -> list[dict]:
    return [{
        "score": float(output.scores[row]),
        "embeddings": {k: v[row] for k, v in output.embeddings.items()},
        "caption": output.captions[row] if output.captions is not None else None,
        "error": output.errors[row] if output.errors is not None else None,
    } for row in range(count)]


def _call(rewards: dict, reward: str, items: list[Item]) -> list[dict]:
    output = rewards[reward](np.stack([item[1] for item in items]), [item[2] for item in items])
    return _rows(output, len(items))


def score_batch(rewards: dict, items: list[Item]) -> tuple[list[dict | ItemScoringError], int]:
    """-> (one result per item: a row dict or the item's ``ItemScoringError``, the number of items that
    failed). One model call per (reward, image size) group; a failing group falls back to single items."""
    results: list[dict | ItemScoringError | None] = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    for i, (reward, image, _) in enumerate(items):
        groups.setdefault((reward, image.shape), []).append(i)
    failed = 0
    for (reward, _), indices in groups.items():
        try:
            rows = _call(rewards, reward, [items[i] for i in indices])
        except Exception:  # noqa: BLE001 - which item caused it is found below, one by one
            rows = []
            for i in indices:
                try:
                    rows.extend(_call(rewards, reward, [items[i]]))
                except Exception as err:  # noqa: BLE001 - reported to that item's request only
                    height, width = items[i][1].shape[:2]
                    rows.append(ItemScoringError(f"reward {reward!r} failed on this {width}x{height} image: "
                                                 f"{type(err).__name__}: {str(err)[:300]}"))
                    failed += 1
        for i, row in zip(indices, rows, strict=True):
            results[i] = row
    return results, failed
