"""Reward models, their weighted combination and the GARD volume term."""

from rewards.base import Reward, RewardOutput, ScoredBatch, TextEmbedder, check_batch
from rewards.combine import combine_rewards
from rewards.registry import REWARDS, build_reward, reward_options
from rewards.volume import gram_volume
from rewards.worker import RewardWorker

__all__ = [
    "REWARDS",
    "Reward",
    "RewardOutput",
    "RewardWorker",
    "ScoredBatch",
    "TextEmbedder",
    "build_reward",
    "check_batch",
    "combine_rewards",
    "gram_volume",
    "reward_options",
]
