"""The per-set eval/ metrics against hand-derived values (pure: no Ray, no models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cluster.eval_metrics import diversity, eval_metrics, mean_and_se, pairwise_rms
from rewards.gold import recall_hits
from rewards.shapes_judge import ShapesJudge

torch.set_num_threads(1)


def _flat(value: int, shape=(2, 2, 3)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def test_pairwise_rms_and_diversity_of_known_images():
    black, white, grey = _flat(0), _flat(255), _flat(51)  # 51 / 255 = 0.2
    assert pairwise_rms(np.stack([black, white])) == pytest.approx(1.0)
    assert pairwise_rms(np.stack([black, black])) == 0.0
    # Three images: pairs (0, 1) = 1, (0, 2) = 0.2, (1, 2) = 0.8 -> mean 2/3.
    assert pairwise_rms(np.stack([black, white, grey])) == pytest.approx(2 / 3)
    # Half the pixels differ by 1: sqrt(1/2).
    half = black.copy()
    half[0] = 255
    assert pairwise_rms(np.stack([black, half])) == pytest.approx(math.sqrt(0.5))
    assert math.isnan(pairwise_rms(black[None]))
    # Per prompt, then the mean over prompts: cat (black, white) = 1, dog (grey, grey) = 0 -> 0.5.
    images = np.stack([black, grey, white, grey])
    assert diversity(images, ["cat", "dog", "cat", "dog"]) == pytest.approx(0.5)
    assert math.isnan(diversity(images[:2], ["cat", "dog"]))  # one image per prompt: no pair


def test_mean_and_standard_error():
    mean, se = mean_and_se(np.array([1.0, 2.0, 3.0, 6.0, np.nan]))
    # mean 3, sample variance ((4 + 1 + 0 + 9) / 3) = 14/3, se = sqrt(14/3) / sqrt(4)
    assert mean == pytest.approx(3.0) and se == pytest.approx(math.sqrt(14 / 3) / 2)
    mean, se = mean_and_se(np.array([5.0]))
    assert mean == 5.0 and math.isnan(se)
    assert all(math.isnan(v) for v in mean_and_se(np.array([np.nan])))


def test_recall_hits_on_hand_made_embeddings():
    text = np.eye(3)  # candidates: prompt 0, 1, 2 along the axes
    image = np.array([[0.9, 0.1, 0.0],   # nearest 0, own 0: hit
                      [0.6, 0.8, 0.0],   # nearest 1, own 1: hit
                      [0.8, 0.0, 0.6],   # nearest 0, own 2: miss
                      [0.0, 0.6, 0.8]])  # nearest 2, own 2: hit
    np.testing.assert_array_equal(recall_hits(image, text, np.array([0, 1, 2, 2])), [True, True, False, True])


def test_per_set_metrics_group_means_and_recall():
    sets = ["seen", "seen", "seen", "seen", "heldout", "heldout"]
    prompts = ["a red circle", "a red circle", "two blue squares", "two blue squares",
               "a red circle above a blue square", "a red circle above a blue square"]
    images = np.stack([_flat(0), _flat(255), _flat(0), _flat(0), _flat(51), _flat(102)])
    gold = np.array([1, 0, 1, 1, 0, 1], dtype=np.float32)
    other = np.array([1, 2, 3, 4, 5, np.nan], dtype=np.float32)
    metrics = eval_metrics(sets=sets, prompts=prompts, images=images, train_total=np.arange(6, dtype=np.float32),
                           scores={"shapes_judge": gold, "clip_score": other}, gold="shapes_judge",
                           groups=ShapesJudge.groups(prompts), recall_hits=np.array([1, 1, 0, 1, 0, 0], bool),
                           with_diversity=True)
    expected = {
        "eval/reward_mean/seen": 1.5, "eval/reward_mean/heldout": 4.5,
        "eval/shapes_judge/seen": 0.75, "eval/shapes_judge/heldout": 0.5,
        "eval/clip_score/seen": 2.5, "eval/clip_score/heldout": 5.0,  # the NaN is left out
        "eval/gold_seen": 0.75, "eval/gold_heldout": 0.5,
        # seen 1, 0, 1, 1: sample variance (3/16 + 9/16) / 3 = 1/4, se = 0.5 / sqrt(4); heldout 0, 1: variance 1/2
        "eval/gold_seen_se": 0.5 / 2, "eval/gold_heldout_se": math.sqrt(0.5) / math.sqrt(2),
        "eval/gold_seen/single": 0.5, "eval/gold_seen/count": 1.0, "eval/gold_heldout/relation": 0.5,
        # seen: circle (black, white) = 1, squares (black, black) = 0 -> 0.5; heldout: |0.2 - 0.4| = 0.2
        "eval/diversity/seen": 0.5, "eval/diversity/heldout": 0.2,
        "eval/recall_at_1/seen": 0.75, "eval/recall_at_1/heldout": 0.0,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_without_gold_diversity_or_recall_only_the_set_means_are_written():
    metrics = eval_metrics(sets=["all", "all"], prompts=["a", "b"], images=np.stack([_flat(0), _flat(9)]),
                           train_total=np.array([1.0, 3.0]), scores={}, gold=None, groups=None, recall_hits=None,
                           with_diversity=False)
    assert metrics == {"eval/reward_mean/all": 2.0}


def test_the_gold_scores_parts_are_reported_per_set_where_they_apply():
    # The judge's parts of 4 images: two singles (seen), two relations (heldout); the relation check applies
    # to the relations only, so the seen set has no relation rate rather than a NaN one.
    sets, prompts = ["seen", "seen", "heldout", "heldout"], ["a red circle"] * 2 + ["a red circle above a blue square"] * 2
    nan = np.nan
    checks = {"binding": np.array([1, 0, 1, 1.0]), "count": np.array([1, 1, 0, 1.0]),
              "relation": np.array([nan, nan, 0, 1.0]), "overlap": np.array([1, 0.5, 0.5, 1.0])}
    metrics = eval_metrics(sets=sets, prompts=prompts, images=np.stack([_flat(0)] * 4), train_total=np.zeros(4),
                           scores={"shapes_judge": np.array([1, 0, 0, 1.0])}, gold="shapes_judge", groups=None,
                           recall_hits=None, with_diversity=False, gold_checks=checks)
    parts = {k: v for k, v in metrics.items() if "/checks/" in k}
    assert parts == pytest.approx({
        "eval/gold_seen/checks/binding": 0.5, "eval/gold_seen/checks/count": 1.0, "eval/gold_seen/checks/overlap": 0.75,
        "eval/gold_heldout/checks/binding": 1.0, "eval/gold_heldout/checks/count": 0.5,
        "eval/gold_heldout/checks/relation": 0.5, "eval/gold_heldout/checks/overlap": 0.75})
