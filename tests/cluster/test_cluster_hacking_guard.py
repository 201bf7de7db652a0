"""The reward-hacking guard on hand-written evaluation sequences (pure: no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.hacking_guard import HackingGuard

torch.set_num_threads(1)


def _alarms(guard: HackingGuard, points: list[tuple[float, float]]) -> list[bool]:
    return [guard.update(train=t, gold=g) is not None for t, g in points]


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_the_alarm_comes_exactly_at_the_kth_opposite_move(patience):
    # Train rises and gold falls at every step from the initial evaluation on.
    points = [(float(i), float(-i)) for i in range(patience + 3)]
    alarms = _alarms(HackingGuard(patience=patience), points)
    # The first point is the initial evaluation; step k (k >= 1) ends at point k: the alarm at point K.
    assert alarms == [False] * patience + [True] * 3


def test_the_message_names_both_metrics_and_their_last_k_plus_one_values():
    guard = HackingGuard(patience=2, action="stop", train_metric="eval/reward_mean", gold_metric="eval/gold_heldout")
    assert guard.update(train=-4.0, gold=0.5) is None
    assert guard.update(train=-3.5, gold=0.4) is None
    message = guard.update(train=-3.0, gold=0.25)
    assert "eval/reward_mean rose (-4 -> -3.5 -> -3)" in message
    assert "eval/gold_heldout fell (0.5 -> 0.4 -> 0.25)" in message
    assert "action stop" in message and "patience 2" in message
    # One more opposite move: still alarmed, showing the last K + 1 = 3 points only.
    assert "rose (-3.5 -> -3 -> -2)" in guard.update(train=-2.0, gold=0.2)


def test_a_gold_rise_or_a_flat_step_resets_the_streak():
    guard = HackingGuard(patience=2)
    # up/down, then gold rises (reset), then up/down twice more: alarm only at the second of those.
    assert _alarms(guard, [(0, 0), (1, -1), (2, 0), (3, -1), (4, -2)]) == [False, False, False, False, True]
    guard = HackingGuard(patience=2)
    # train flat is not a rise
    assert _alarms(guard, [(0, 0), (1, -1), (1, -2), (2, -3)]) == [False, False, False, False]
    guard = HackingGuard(patience=1)
    # both rising (a good run) or both falling never alarm
    assert _alarms(guard, [(0, 0), (1, 1), (2, 2), (1, 1), (0, 0)]) == [False] * 5


def test_nan_resets_the_streak_and_is_not_a_point():
    guard = HackingGuard(patience=2)
    nan = math.nan
    assert _alarms(guard, [(0, 0), (1, -1), (nan, -2), (3, -3), (4, -4), (5, -5)]) == \
        [False, False, False, False, False, True]
    guard = HackingGuard(patience=1)
    assert _alarms(guard, [(0, 0), (1, nan), (2, -1), (3, -2)]) == [False, False, False, True]
    assert guard.update(train=None, gold=1.0) is None  # a null row value (non-finite in metrics.jsonl)
    assert guard.points == [] and guard.streak == 0


def test_replaying_metric_rows_restores_the_state_of_the_uninterrupted_guard():
    names = {"train_metric": "eval/reward_mean", "gold_metric": "eval/gold_all"}
    rows = [{"epoch": 0, "eval/reward_mean_initial": 0.0, "eval/gold_all_initial": 0.0,
             "eval/reward_mean": 1.0, "eval/gold_all": -1.0},
            {"epoch": 1},  # no evaluation in this row
            {"epoch": 2, "eval/reward_mean": 2.0, "eval/gold_all": -2.0}]
    live = HackingGuard(patience=3, **names)
    live.observe({"eval/reward_mean": 0.0, "eval/gold_all": 0.0})  # the initial evaluation
    for row in rows:
        live.observe(row)
    resumed = HackingGuard(patience=3, **names)
    resumed.replay(rows)
    assert (resumed.points, resumed.streak) == (live.points, live.streak) == ([(0, 0), (1, -1), (2, -2)], 2)
    assert resumed.update(train=3.0, gold=-3.0) is not None  # the third step in a row, across the resume


def test_patience_must_be_positive():
    with pytest.raises(ValueError, match="patience must be >= 1, got 0"):
        HackingGuard(patience=0)
