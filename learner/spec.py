"""The learner's settings (built from the ``train`` config section plus a few cluster/B² fields)."""

from __future__ import annotations

from dataclasses import dataclass

from learner.bpt import BptSchedule

ADVANTAGE_MODES = ("per_prompt", "batch")


@dataclass(frozen=True)
class LearnerSpec:
    """Optimization settings. ``algorithm`` names a rule of ``learner.algorithms.ALGORITHMS``."""

    algorithm: str = "ppo"
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    advantage: str = "per_prompt"
    stat_buffer_size: int = 32
    stat_min_count: int = 16
    timestep_fraction: float = 1.0
    inner_epochs: int = 1
    updates_per_epoch: int = 4
    micro_batch_size: int = 16
    kl_beta: float = 0.0
    kl_beta_end: float | None = None
    kl_ramp_epochs: int = 0
    max_staleness: int = 0
    seed: int = 0
    # B²-DiffuRL (backward progressive training + contrastive selection); None = off.
    bpt: BptSchedule | None = None
    b2_threshold: float = 0.5
    b2_history_stages: int = 8
    dpo_beta: float = 1.0  # online trajectory DPO
    mixed_precision: str = "no"  # the learner's own precision: no | bf16 | fp16 (learner/precision.py)
