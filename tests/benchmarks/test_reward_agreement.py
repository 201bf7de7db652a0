"""The reward-agreement benchmark's AUC against hand-counted cases."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "reward_agreement", Path(__file__).resolve().parents[2] / "benchmarks" / "reward_agreement.py")
reward_agreement = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reward_agreement)


def test_auc_counts_correct_over_incorrect_wins_with_ties_as_half():
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    correct = np.array([True, True, False, False])
    # pairs (correct, incorrect): (0.9, 0.5) win, (0.9, 0.1) win, (0.5, 0.5) tie, (0.5, 0.1) win -> 3.5 / 4
    assert reward_agreement.auc(scores, correct) == pytest.approx(0.875)
    assert reward_agreement.auc(scores, ~correct) == pytest.approx(0.125)  # the reverse ranking
    assert math.isnan(reward_agreement.auc(scores, np.ones(4, dtype=bool)))  # no incorrect image
