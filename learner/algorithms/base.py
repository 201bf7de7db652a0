"""What an update rule receives and returns (the interface of ``learner.algorithms.ALGORITHMS``).

A rule is a function ``rule(state: TrainState, inputs: UpdateInputs) -> UpdateResult``: it trains the
policy's adapter through ``state.stepper`` (the guarded optimizer step) and reports how many optimizer
steps it applied; the Learner bumps the policy version when that number is positive.

With several learner ranks every rank runs the rule on the same inputs: it trains only its share of each
optimizer step's (sample, timestep) pairs (``state.group.shard``) and merges its statistics over the
ranks (``state.group.merge_means``); ``state.stepper`` sums the gradients (``learner/distributed.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from actors.policy import Policy
from learner.advantages import PerPromptStatTracker
from learner.bpt import BptSchedule
from learner.distributed import RankGroup
from learner.precision import GuardedStep
from learner.selection import ZScoreHistory
from learner.spec import LearnerSpec
from learner.transitions import TransitionBatch


@dataclass
class TrainState:
    """The learner's trainable state that rules may read and change."""

    policy: Policy
    stepper: GuardedStep
    spec: LearnerSpec
    stat_tracker: PerPromptStatTracker  # per-prompt reward statistics (DDPO advantages)
    zscores: ZScoreHistory  # B²-DiffuRL's per-prompt z-score history
    schedule: BptSchedule | None  # B²-DiffuRL's backward progressive stages, None when off
    group: RankGroup = field(default_factory=RankGroup)  # this learner's rank (the single learner by default)


@dataclass
class PairBatch:
    """Explicit preference pairs: ``batch`` rows ``winners[p]`` ≻ ``losers[p]`` (e.g. D-Fusion's)."""

    batch: TransitionBatch
    winners: np.ndarray  # int64 [P]
    losers: np.ndarray  # int64 [P]


@dataclass
class UpdateInputs:
    """One epoch's training inputs, already filtered (fresh, finite).

    batch: N samples; rewards float32 [N]; groups int [N] (a prompt's samples, or a B² branch group);
    steps: the denoising-step indices to train (B²: the stage's interval); stage: the B² stage or None;
    rng: this epoch's generator (timestep subsets, shuffling); pairs: explicit pairs or None.
    """

    batch: TransitionBatch
    rewards: np.ndarray
    groups: np.ndarray
    steps: np.ndarray
    epoch: int
    stage: int | None
    rng: np.random.Generator
    pairs: PairBatch | None = None


@dataclass
class UpdateResult:
    """stats: scalar metrics of the update; optimizer_steps: steps applied (skipped ones excluded)."""

    stats: dict[str, float] = field(default_factory=dict)
    optimizer_steps: int = 0


UpdateRule = Callable[[TrainState, UpdateInputs], UpdateResult]
