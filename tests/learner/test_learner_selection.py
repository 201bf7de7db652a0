"""Contrastive selection for B²-DiffuRL (§3.3): per-prompt z-scores with an epoch history,
best-positive / worst-negative leaves per branch group, and DPO preference pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learner.selection import (
    DEFAULT_HISTORY_EPOCHS,
    DEFAULT_THRESHOLD,
    ZScoreHistory,
    preference_pairs,
    select_contrastive,
)

# Four groups; expected picks at threshold 0.5 written next to each row.
GROUPS = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
ZSCORES = np.array(
    [
        0.2,
        1.0,
        -0.9,  # g0: best 1.0 >= 0.5 -> positive 1; worst -0.9 < -0.5 -> negative 2
        0.4,
        0.1,
        -0.3,  # g1: neither passes
        0.5,
        -0.5,
        0.0,  # g2: 0.5 >= 0.5 -> positive 6; -0.5 is not < -0.5
        -2.0,
        -0.6,  # g3: best -0.6 fails; worst -2.0 -> negative 9
    ]
)


def test_defaults_are_the_released_launch_script_values():
    assert DEFAULT_THRESHOLD == 0.5 and DEFAULT_HISTORY_EPOCHS == 8


def test_select_contrastive_on_a_hand_made_table():
    pos, neg = select_contrastive(GROUPS, ZSCORES, threshold=0.5)
    assert pos.dtype == np.int64 and neg.dtype == np.int64
    np.testing.assert_array_equal(pos, [1, 6])
    np.testing.assert_array_equal(neg, [2, 9])


def test_select_contrastive_thresholds():
    pos, neg = select_contrastive(GROUPS, ZSCORES, threshold=0.0)
    np.testing.assert_array_equal(pos, [1, 3, 6])  # g3's best (-0.6) is still < 0
    np.testing.assert_array_equal(neg, [2, 5, 7, 9])
    pos, neg = select_contrastive(GROUPS, ZSCORES, threshold=1.5)
    np.testing.assert_array_equal(pos, [])
    np.testing.assert_array_equal(neg, [9])
    pos, neg = select_contrastive(GROUPS, ZSCORES, threshold=0.5, neg_threshold=-0.95)
    np.testing.assert_array_equal(pos, [1, 6])
    np.testing.assert_array_equal(neg, [9])


def test_select_contrastive_with_shuffled_rows_ties_and_nan():
    perm = np.array([10, 3, 7, 0, 5, 9, 1, 8, 4, 2, 6])
    pos, neg = select_contrastive(GROUPS[perm], ZSCORES[perm], threshold=0.5)
    np.testing.assert_array_equal(perm[pos], [1, 6])
    np.testing.assert_array_equal(perm[neg], [2, 9])
    # Ties: the first leaf in input order; non-finite z never selected.
    pos, neg = select_contrastive([5, 5, 5, 7, 7], [2.0, 2.0, -1.0, np.nan, -3.0], threshold=0.5)
    np.testing.assert_array_equal(pos, [0])
    np.testing.assert_array_equal(neg, [2, 4])


def test_select_contrastive_validation():
    with pytest.raises(ValueError, match="shape"):
        select_contrastive([0, 0], [1.0], threshold=0.5)
    with pytest.raises(ValueError, match="threshold=-0.1 .*>= 0"):
        select_contrastive([0], [1.0], threshold=-0.1)
    with pytest.raises(ValueError, match="neg_threshold=0.2 .*<= 0"):
        select_contrastive([0], [1.0], threshold=0.5, neg_threshold=0.2)


def test_zscores_use_the_current_epoch_and_the_last_h_epochs():
    history = ZScoreHistory(history_epochs=1)
    z0 = history.update(0, ["a", "a", "a", "b", "b"], [1.0, 2.0, 3.0, 10.0, 20.0])
    # a: mean 2, sample std 1; b: mean 15, sample std sqrt(50)
    np.testing.assert_allclose(z0, [-1.0, 0.0, 1.0, -5 / math.sqrt(50), 5 / math.sqrt(50)], rtol=1e-6)
    assert z0.dtype == np.float32

    z1 = history.update(1, ["a"], [5.0])  # epoch 0 + epoch 1: a = [1, 2, 3, 5]
    values = np.array([1.0, 2.0, 3.0, 5.0])
    np.testing.assert_allclose(z1, [(5.0 - values.mean()) / values.std(ddof=1)], rtol=1e-6)

    z2 = history.update(2, ["a"], [0.0])  # H = 1: epoch 0 is dropped, a = [5, 0]
    assert history.epochs == [1, 2]
    np.testing.assert_allclose(z2, [(0.0 - 2.5) / math.sqrt(12.5)], rtol=1e-6)
    np.testing.assert_array_equal(history.values("a"), [5.0, 0.0])
    # b's rewards lived only in epoch 0, which is gone.
    with pytest.raises(
        ValueError, match=r"prompt 'b' has no recorded rewards in the retained epochs \[1, 2\]"
    ):
        history.zscores(["b"], [1.0])


def test_several_batches_of_one_epoch_accumulate_and_h0_keeps_only_the_current_epoch():
    history = ZScoreHistory(history_epochs=0)
    history.add(3, ["p", "p"], [0.0, 2.0])
    history.add(3, ["p", "p"], [4.0, 6.0])
    np.testing.assert_array_equal(history.values("p"), [0.0, 2.0, 4.0, 6.0])
    history.add(4, ["p", "p"], [1.0, 3.0])
    np.testing.assert_array_equal(history.values("p"), [1.0, 3.0])
    np.testing.assert_allclose(history.zscores(["p", "p"], [1.0, 3.0]), [-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_single_value_gives_zero_nan_rewards_are_dropped_and_errors():
    history = ZScoreHistory(history_epochs=2)
    history.add(0, ["x", "y", "y", "y"], [7.0, 1.0, np.nan, 3.0])
    np.testing.assert_array_equal(history.zscores(["x"], [7.0]), [0.0])
    np.testing.assert_array_equal(history.values("y"), [1.0, 3.0])  # NaN never recorded
    z = history.zscores(["y", "y"], [np.nan, 3.0])
    assert np.isnan(z[0]) and z[1] == pytest.approx(1 / math.sqrt(2))
    history.add(0, ["w"], [np.inf])  # known prompt without a finite reward: NaN, never selected
    assert np.isnan(history.zscores(["w"], [1.0])).all()
    with pytest.raises(ValueError, match="prompt 'never' has no recorded rewards in the retained epochs"):
        history.zscores(["never"], [1.0])
    with pytest.raises(ValueError, match="epoch=-1 is older than the latest recorded epoch 0"):
        history.add(-1, ["x"], [1.0])
    with pytest.raises(ValueError, match="2 prompts but 1 rewards"):
        history.add(0, ["x", "y"], [1.0])
    with pytest.raises(ValueError, match="history_epochs=-1"):
        ZScoreHistory(history_epochs=-1)


def test_history_state_dict_round_trip():
    history = ZScoreHistory(history_epochs=2)
    for epoch in range(4):
        history.add(epoch, ["a", "b"], [float(epoch), 2.0 * epoch])
    restored = ZScoreHistory(history_epochs=5)
    restored.load_state_dict(history.state_dict())
    assert restored.history_epochs == 2 and restored.epochs == [1, 2, 3]
    np.testing.assert_array_equal(
        restored.zscores(["a", "b"], [0.5, 0.5]), history.zscores(["a", "b"], [0.5, 0.5])
    )
    restored.add(4, ["a"], [4.0])
    assert restored.epochs == [2, 3, 4]


def test_a_history_saved_with_stage_keys_loads_and_rolls_on_by_epoch():
    # The state of a checkpoint written when the history was keyed by B² stage.
    old = {"history_stages": 1, "stages": [(0, {"a": [1.0, 3.0]})]}
    restored = ZScoreHistory()
    restored.load_state_dict(old)
    assert restored.history_epochs == 1 and restored.epochs == [0]
    np.testing.assert_allclose(restored.zscores(["a"], [3.0]), [1 / math.sqrt(2)], rtol=1e-6)
    restored.add(7, ["a"], [5.0])
    restored.add(8, ["a"], [9.0])
    assert restored.epochs == [7, 8]
    np.testing.assert_array_equal(restored.values("a"), [5.0, 9.0])


def test_selection_pipeline_on_branch_groups():
    # Two prompts x two groups x three leaves; z-scores per prompt, then selection per group.
    prompts = ["cat"] * 6 + ["dog"] * 6
    groups = np.repeat(np.arange(4), 3)
    rewards = np.array([0.1, 0.2, 0.3, 0.5, 0.2, 0.1, 1.0, 1.0, 1.0, 0.0, 2.0, 1.0])
    z = ZScoreHistory(history_epochs=8).update(0, prompts, rewards)
    pos, neg = select_contrastive(groups, z, threshold=0.5)
    np.testing.assert_array_equal(pos, [3, 10])
    np.testing.assert_array_equal(neg, [0, 5, 9])  # group 1 holds the best and the worst cat leaf


def test_preference_pairs_best_and_worst_of_each_group():
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    rewards = np.array([0.1, 0.9, 0.5, 0.3, 0.3, np.nan, 0.2, -0.4, 5.0])
    winners, losers = preference_pairs(groups, rewards)
    np.testing.assert_array_equal(winners, [1, 6])  # g1 ties (no pair), g3 has one leaf
    np.testing.assert_array_equal(losers, [0, 7])
    winners, losers = preference_pairs(groups, rewards, min_margin=0.7)
    np.testing.assert_array_equal(winners, [1])
    np.testing.assert_array_equal(losers, [0])
    with pytest.raises(ValueError, match="shape"):
        preference_pairs([0, 0], [1.0, 2.0, 3.0])
