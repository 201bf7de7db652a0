"""Scoring one Serve batch: single (reward, image, prompt) items merged from concurrent requests.

Items of the same reward and image size are scored by one model call. A failing call must not fail
the other requests of the batch (``@serve.batch`` would hand its exception to every caller), so the
items of that call are scored again one by one and each item that still fails gets its own
``ItemScoringError`` as its result: only the request that sent it fails.

With ``pad_to``, every call of a reward that declares ``batch_shape_sensitive`` (the CLIP-based ones) has
that many rows, the last item repeated, and the copies' results are dropped: an item's score is then the
same whatever the queue merged it with. Others are not padded: per-image rewards (JPEG, the judge) do not
need it, and a padded row of LLaVA's captioner costs a whole generation while vLLM's batching is not
batch-invariant anyway. Batched float kernels are
not batch-size invariant (torch's CPU matmul takes other paths for a few rows; measured on the shapes
CLIP: scores of batches of 1-4 images differ from those of 5-16 by up to 4e-8), and Serve's batches
depend on timing, so without padding two runs of one config could train on different rewards.
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


def _call(rewards: dict, reward: str, items: list[Item], pad_to: int | None) -> list[dict]:
    model = rewards[reward]
    pad = (pad_to or 0) - len(items) if getattr(model, "batch_shape_sensitive", False) else 0
    padded = items + [items[-1]] * max(pad, 0)
    output = model(np.stack([item[1] for item in padded]), [item[2] for item in padded])
    return _rows(output, len(items))


def score_batch(rewards: dict, items: list[Item], *,
                pad_to: int | None = None) -> tuple[list[dict | ItemScoringError], int]:
    """-> (one result per item: a row dict or the item's ``ItemScoringError``, the number of items that
    failed). One model call per (reward, image size) group, of ``pad_to`` rows when set and the reward is
    batch-shape sensitive; a failing group falls back to single items."""
    results: list[dict | ItemScoringError | None] = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    for i, (reward, image, _) in enumerate(items):
        groups.setdefault((reward, image.shape), []).append(i)
    failed = 0
    for (reward, _), indices in groups.items():
        try:
            rows = _call(rewards, reward, [items[i] for i in indices], pad_to)
        except Exception:  # noqa: BLE001 - which item caused it is found below, one by one
            rows = []
            for i in indices:
                try:
                    rows.extend(_call(rewards, reward, [items[i]], pad_to))
                except Exception as err:  # noqa: BLE001 - reported to that item's request only
                    height, width = items[i][1].shape[:2]
                    rows.append(ItemScoringError(f"reward {reward!r} failed on this {width}x{height} image: "
                                                 f"{type(err).__name__}: {str(err)[:300]}"))
                    failed += 1
        for i, row in zip(indices, rows, strict=True):
            results[i] = row
    return results, failed
