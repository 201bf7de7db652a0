"""Fixed-shape model calls in a Serve batch (``rewards/serve_batch.py``, ``pad_to``): an item's score does
not depend on what the queue merged it with."""

from __future__ import annotations

import numpy as np
import torch

from rewards.base import RewardOutput
from rewards.serve_batch import ItemScoringError, score_batch

torch.set_num_threads(1)


class _RowsSensitive:
    """Mean pixel + 1e-3 x the number of rows of the call: a model whose result depends on the batch shape
    by construction (and says so); records the row count of every call. A prompt "boom" makes it raise."""

    batch_shape_sensitive = True

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, images: np.ndarray, prompts: list[str]) -> RewardOutput:
        self.calls.append(len(images))
        if "boom" in prompts:
            raise ValueError("cannot score 'boom'")
        means = images.reshape(len(images), -1).mean(axis=1)
        return RewardOutput(scores=(means + 1e-3 * len(images)).astype(np.float32))


def _items(n: int, prompts: list[str] | None = None) -> list[tuple]:
    images = np.arange(n * 4 * 4 * 3, dtype=np.uint8).reshape(n, 4, 4, 3)
    return [("r", image, p) for image, p in zip(images, prompts or ["a"] * n, strict=True)]


def test_padded_calls_give_every_item_the_score_it_gets_in_a_full_batch():
    items = _items(8)
    reward = _RowsSensitive()
    full, _ = score_batch({"r": reward}, items, pad_to=8)
    alone = [score_batch({"r": reward}, [item], pad_to=8)[0][0] for item in items]
    three, _ = score_batch({"r": reward}, items[:3], pad_to=8)
    assert reward.calls == [8] * 10  # every call was 8 rows wide
    means = np.stack([item[1] for item in items]).reshape(8, -1).mean(axis=1)
    np.testing.assert_allclose([row["score"] for row in full], means + 8e-3, rtol=1e-6)
    assert [row["score"] for row in alone] == [row["score"] for row in full]
    assert len(three) == 3 and [row["score"] for row in three] == [row["score"] for row in full[:3]]
    # Without padding the same item's score moves with the batch it was merged into.
    unpadded, _ = score_batch({"r": reward}, items[:1])
    assert unpadded[0]["score"] != full[0]["score"]


def test_a_failing_item_is_still_isolated_when_calls_are_padded():
    reward = _RowsSensitive()
    results, failed = score_batch({"r": reward}, _items(4, ["a", "boom", "c", "d"]), pad_to=6)
    assert failed == 1 and isinstance(results[1], ItemScoringError)
    assert [len(results)] + reward.calls == [4, 6, 6, 6, 6, 6]  # the group, then each item alone, padded


def test_the_shapes_clip_scores_an_image_alone_bit_for_bit_as_in_a_full_batch():
    """The real reward model of the demo: one image scored alone (padded to 16 rows) gets the same float32
    score as inside a batch of 16 other images, whatever its neighbours and position."""
    from rewards.clip_score import ClipScore
    from rewards.tiny import shapes_clip_options

    rewards = {"clip_score": ClipScore(**shapes_clip_options())}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    prompts = ["two yellow squares", "a red circle", "a blue triangle left of a green circle"] * 8
    items = [("clip_score", image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    full, _ = score_batch(rewards, items[:16], pad_to=16)
    order = (3, 20, 0, 17, 9, 22, 5, 18, 12, 1, 23, 7, 19, 14, 2, 21)
    mixed, _ = score_batch(rewards, [items[i] for i in order], pad_to=16)
    by_index = {i: row["score"] for i, row in zip(order, mixed, strict=True)}
    for i in range(4):
        alone, _ = score_batch(rewards, [items[i]], pad_to=16)
        assert alone[0]["score"] == full[i]["score"]
        np.testing.assert_array_equal(alone[0]["embeddings"]["image"], full[i]["embeddings"]["image"])
    assert all(by_index[i] == full[i]["score"] for i in by_index if i < 16)


def test_a_reward_that_is_not_batch_shape_sensitive_is_not_padded():
    """A per-image reward (or LLaVA's captioner, where a padded row costs a whole generation) runs on the
    items it was given."""

    class PerImage(_RowsSensitive):
        batch_shape_sensitive = False

    reward = PerImage()
    results, _ = score_batch({"r": reward}, _items(3), pad_to=8)
    assert reward.calls == [3] and len(results) == 3
