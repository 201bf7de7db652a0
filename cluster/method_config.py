"""The config sections of the methods beyond the ``train`` section's optimizer: Diffusion-DPO, D-Fusion,
B²-DiffuRL, the GARD volume and reward-weighted regression (part of the tree of ``cluster/config.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config_rules import FRACTION, NON_NEGATIVE, POSITIVE, _rule, choice


@dataclass
class DpoConfig:
    """Diffusion-DPO (Wallace et al., CVPR 2024): offline from a preference JSONL (``gard dpo``), or online
    on the epoch's samples: ``train.algorithm: dpo`` (the trajectory form, ``learner/algorithms/online_dpo.py``)
    or ``train.algorithm: diffusion_dpo`` (the denoising form, ``learner/algorithms/denoising_dpo.py``)."""

    beta: float = field(default=2000.0, metadata={
        **POSITIVE, "doc": "β of the denoising form (offline and diffusion_dpo), on per-sample mean squared errors"})
    noise_draws: int = field(default=4, metadata={
        **POSITIVE, "doc": "diffusion_dpo: (t, ε) draws per preference pair in each optimizer step"})
    online_beta: float = field(default=1.0, metadata=POSITIVE)
    dataset: str | None = field(default=None, metadata={"doc": "JSONL: {prompt, chosen, rejected} image paths"})
    steps: int = field(default=100, metadata=POSITIVE)
    batch_size: int = field(default=4, metadata=POSITIVE)
    log_every: int = field(default=10, metadata=POSITIVE)
    # Online DPO pairs: best_worst = the best and worst sample of each group (prompt or branch group);
    # dfusion = (D-Fusion sample ≻ worst sample) per prompt, the fusion of its best into its worst (D-Fusion, ICML 2025).
    pair_source: str = field(default="best_worst", metadata=choice("best_worst", "dfusion"))


@dataclass
class DFusionConfig:
    """D-Fusion (ICML 2025; actors/dfusion.py): how the fused sample of a (worst, best) pair is built."""

    token_positions: list[int] | None = field(default=None, metadata={
        "doc": "prompt token positions (1 = first word) whose cross-attention makes the mask; null: all content"})
    mask_threshold: float = field(default=0.5, metadata=NON_NEGATIVE)
    mask_normalize: str = field(default="minmax", metadata=choice("minmax", "max", "none"))
    mask_steps: str = field(default="all", metadata=choice("all", "current"))
    mask_factors: list[int] = field(default_factory=list, metadata={
        "doc": "latent/layer downsampling factors of the cross-attention layers used (empty: all)"})
    fuse_parts: list[str] = field(default_factory=lambda: ["mid", "up"])
    fuse_start: float = field(default=0.1, metadata=_rule(lambda v: 0 <= v < 1, "in [0, 1)"))
    fuse_end: float = field(default=1.0, metadata=FRACTION)


@dataclass
class B2Config:
    """B²-DiffuRL (Hu et al., CVPR 2025): backward progressive training + branch rollouts + contrastive selection."""

    enabled: bool = False
    tau_start: int = field(default=14, metadata=POSITIVE)
    tau_end: int = field(default=20, metadata=POSITIVE)
    num_stages: int = field(default=100, metadata=POSITIVE)
    epochs_per_stage: int = field(default=1, metadata=POSITIVE)
    branching: bool = True
    n_branch: int = field(default=5, metadata=_rule(lambda v: v >= 2, ">= 2"))
    share_start: bool = field(default=True, metadata={
        "doc": "the leaves of a prompt start from one x_T (B²'s branch rollouts); false: each from its own, "
               "so a group is independent samples of its prompt (only with tau_start = tau_end = "
               "sampling.num_steps, where the leaves share nothing else)"})
    threshold: float = field(default=0.5, metadata=NON_NEGATIVE)
    neg_threshold: float | None = field(default=None, metadata={
        "check": lambda v: v <= 0, "rule": "<= 0",
        "doc": "a group's worst leaf is trained when its z < neg_threshold (the release's NegThreshold); "
               "none: -threshold"})
    selection: str = field(default="contrastive", metadata={
        **choice("contrastive", "all"),
        "doc": "contrastive: each group's best leaf (z >= threshold) and worst (z < neg_threshold) are trained "
               "with their z as advantage (§3.3); all: every leaf is trained, with train.advantage's "
               "advantages (per_group: GRPO's within-group standardization)"})
    history_epochs: int = field(default=8, metadata={
        **NON_NEGATIVE, "doc": "z-scores are taken over the current epoch's rewards of a prompt and the last "
                               "history_epochs epochs' (the release's 8 stages of one sampling round each)"})


@dataclass
class VolumeConfig:
    """The GARD volume shaping term: r̃ = Σ w_j r_j - γ Vol (GARD eq. 12-13)."""

    gamma: float = field(default=0.0, metadata=NON_NEGATIVE)
    gamma_end: float | None = field(default=None, metadata=NON_NEGATIVE)
    ramp_epochs: int = field(default=0, metadata=NON_NEGATIVE)
    modalities: list[str] = field(default_factory=lambda: ["text", "image"])


@dataclass
class RwrConfig:
    """Reward-weighted regression (``train.algorithm: rwr``; DDPO's baseline, Black et al., ICLR 2024, §4.1):
    the diffusion model's own denoising loss on the epoch's samples, weighted by their reward within their
    prompt's group (``learner/algorithms/rwr.py``)."""

    weighting: str = field(default="sparse", metadata={
        **choice("sparse", "exponential"),
        "doc": "sparse: weight 1 on the samples above their group's mean reward, 0 on the rest; exponential: "
               "weight exp(z / temperature) of the sample's z-scored reward within its group"})
    temperature: float = field(default=1.0, metadata={**POSITIVE, "doc": "exponential weighting's temperature"})
    noise_draws: int = field(default=2, metadata={
        **POSITIVE, "doc": "(t, ε) draws per weighted sample in each optimizer step"})
