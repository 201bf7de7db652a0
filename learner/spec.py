"""The learner's settings (built from the ``train`` config section plus a few cluster/B² fields)."""

from __future__ import annotations

from dataclasses import dataclass

from learner.bpt import BptSchedule

ADVANTAGE_MODES = ("per_prompt", "per_group", "batch")
B2_SELECTIONS = ("contrastive", "all")


@dataclass(frozen=True)
class LearnerSpec:
    """Optimization settings. ``algorithm`` names a rule of ``learner.algorithms.ALGORITHMS``. No defaults
    here: they live in the config (``cluster/config.py``), which builds this spec (``cluster/specs.py``)."""

    algorithm: str
    learning_rate: float
    learning_rate_end: float | None  # linear from learning_rate at epoch 0 to this at lr_ramp_epochs
    lr_ramp_epochs: int
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_eps: float
    max_grad_norm: float
    clip_range: float
    target_kl: float | None  # ppo/pg: stop an epoch's steps at the first step whose approx_kl exceeds it
    adv_clip_max: float
    advantage: str
    stat_buffer_size: int
    stat_min_count: int
    timestep_fraction: float
    step_range: tuple[int, int] | None  # [first, last) trained denoising steps; None: all (or B²'s interval)
    inner_epochs: int
    updates_per_epoch: int
    micro_batch_size: int
    kl_beta: float
    kl_beta_end: float | None
    kl_ramp_epochs: int
    max_staleness: int
    seed: int
    # B²-DiffuRL (backward progressive training + contrastive selection); None = off.
    bpt: BptSchedule | None
    b2_threshold: float
    b2_neg_threshold: float | None  # None: -b2_threshold
    b2_history_epochs: int
    b2_selection: str  # contrastive: best/worst leaf per group (§3.3); all: every leaf, train.advantage's advantages
    dpo_beta: float  # online trajectory DPO
    dpo_denoise_beta: float  # online Diffusion-DPO, denoising form
    dpo_noise_draws: int  # its (t, ε) draws per pair
    rwr_weighting: str  # reward-weighted regression: sparse | exponential
    rwr_temperature: float  # its exponential weighting's temperature
    rwr_noise_draws: int  # its (t, ε) draws per weighted sample
    mixed_precision: str  # the learner's own precision: no | bf16 | fp16 (learner/precision.py)
