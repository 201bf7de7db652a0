"""The reward-hacking guard: a training metric that keeps rising while a gold metric keeps falling.

Reward hacking (the policy exploits what the training reward measures, not what it was meant to
measure) shows on the evaluation set as the training reward going up while a reward the policy never
trains on goes down. The guard watches one pair of evaluation metrics, evaluation after evaluation
(the one before the first update is the first point), and raises an alarm when the last ``patience``
steps were all such opposite moves. A NaN value (an evaluation that could not be scored) breaks the
streak: the next finite point starts a new one. Pure logic: no Ray, no I/O.
"""

from __future__ import annotations

import math

INITIAL = "_initial"  # the first metrics row stores the evaluation before training as <metric>_initial


class HackingGuard:
    """``update(train=..., gold=...)`` once per evaluation -> an alarm message or None."""

    def __init__(self, *, patience: int, action: str = "warn", train_metric: str = "eval/reward_mean",
                 gold_metric: str = "eval/gold_all"):
        if patience < 1:
            raise ValueError(f"HackingGuard: patience must be >= 1, got {patience}")
        self.patience = patience
        self.action = action
        self.train_metric = train_metric
        self.gold_metric = gold_metric
        self.points: list[tuple[float, float]] = []  # (train, gold) of the current streak's evaluations
        self.streak = 0  # consecutive steps with train up and gold down

    def update(self, *, train: float, gold: float) -> str | None:
        """Adds one evaluation; returns the alarm when the last ``patience`` steps all had the training
        metric rise and the gold metric fall (again at every further such step), else None."""
        train = float("nan") if train is None else float(train)
        gold = float("nan") if gold is None else float(gold)
        if not (math.isfinite(train) and math.isfinite(gold)):
            self.points, self.streak = [], 0
            return None
        if self.points:
            last_train, last_gold = self.points[-1]
            self.streak = self.streak + 1 if (train > last_train and gold < last_gold) else 0
        self.points = (self.points + [(train, gold)])[-(self.patience + 1):]
        if self.streak < self.patience:
            return None
        trains = " -> ".join(f"{t:.4g}" for t, _ in self.points)
        golds = " -> ".join(f"{g:.4g}" for _, g in self.points)
        return (f"reward hacking suspected: over the last {self.patience} evaluation(s) {self.train_metric} rose "
                f"({trains}) while {self.gold_metric} fell ({golds}) (evaluation.guard: action {self.action}, "
                f"patience {self.patience}); the policy is improving the training reward at the expense of "
                f"the gold reward: lower the learning rate, add a KL penalty or change the reward")

    def observe(self, metrics: dict, *, suffix: str = "") -> str | None:
        """``update`` with the two metrics of a metrics row (``<name><suffix>``; a missing or null value is
        NaN); a row holding neither (no evaluation) changes nothing."""
        train, gold = (f"{self.train_metric}{suffix}", f"{self.gold_metric}{suffix}")
        if train not in metrics and gold not in metrics:
            return None
        return self.update(train=metrics.get(train), gold=metrics.get(gold))

    def replay(self, rows: list[dict]) -> None:
        """Restores the state after ``rows`` (a resumed run's metric rows): the evaluation before training
        (the first row's ``<metric>_initial``), then every row's evaluation, in order."""
        self.points, self.streak = [], 0
        for index, row in enumerate(rows):
            if index == 0:
                self.observe(row, suffix=INITIAL)
            self.observe(row)
