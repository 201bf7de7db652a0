"""The one typed, validated config tree of a gard run (YAML + ``key=value`` overrides).

Every field is typed; values are checked against their type and rule when the tree is built, and
errors name the field's full path, the value, the rule and how to fix it (exit code 2 in the CLI).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config_rules import FRACTION, NON_NEGATIVE, POSITIVE, RESUMABLE, ConfigError, _rule, choice
from cluster.eval_config import EvaluationConfig, validate_evaluation
from cluster.method_config import B2Config, DFusionConfig, DpoConfig, RwrConfig, VolumeConfig
from cluster.reward_config import RewardConfig, default_rewards, parse_rewards


def _algorithm_names() -> list[str]:
    from learner.algorithms import ALGORITHMS  # the registry is the one list of update rules

    return list(ALGORITHMS)


@dataclass
class PolicyConfig:
    pretrained: str = field(default="tiny:sd", metadata={"doc": "pipeline dir, hub id, or tiny:sd / tiny:sd-v"})
    dtype: str = field(default="float32", metadata=choice("float32", "float16", "bfloat16"))
    device: str = field(default="auto", metadata={**choice("auto", "cpu", "cuda"), **RESUMABLE})
    lora_rank: int = field(default=4, metadata=POSITIVE)
    lora_alpha: float = field(default=4.0, metadata=POSITIVE)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init_lora_seed: int = 0
    # TexForce (Chen et al., ECCV 2024): which networks carry a trainable LoRA: [unet], [text_encoder] or both.
    train_targets: list[str] = field(default_factory=lambda: ["unet"])
    text_encoder_lora_rank: int = field(default=4, metadata=POSITIVE)
    text_encoder_lora_alpha: float = field(default=4.0, metadata=POSITIVE)
    text_encoder_lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    init_adapter: str | None = field(default=None, metadata={
        "doc": "start from this diffusers LoRA directory (a previous run's lora/, or gard fuse-lora output)"})


@dataclass
class SamplingConfig:
    num_steps: int = field(default=20, metadata=POSITIVE)
    eta: float = field(default=1.0, metadata=_rule(lambda v: v > 0, "> 0 (training needs stochastic DDIM steps)"))
    guidance_scale: float = field(default=5.0, metadata=NON_NEGATIVE)
    resolution: int = field(default=64, metadata=_rule(lambda v: 0 < v <= 4096 and v % 8 == 0,
                                                       "a positive multiple of 8, at most 4096"))
    negative_prompt: str = ""
    timestep_spacing: str | None = field(default=None, metadata={
        **choice("leading", "trailing", "linspace"),
        "doc": "override the pretrained DDIM scheduler's spacing (null: keep it); a schedule that contains "
               "t = 0 has a step with sigma = 0 and is refused"})
    batch_size: int = field(default=8, metadata=POSITIVE)
    batches_per_sampler: int = field(default=2, metadata=POSITIVE)


@dataclass
class PromptsConfig:
    train: list[str] = field(default_factory=list)
    train_file: str | None = None


@dataclass
class TrainConfig:
    algorithm: str = field(default="ppo", metadata={
        "check": lambda v: v in _algorithm_names(), "rule": lambda: f"one of {_algorithm_names()}"})
    learning_rate: float = field(default=3e-4, metadata=POSITIVE)
    learning_rate_end: float | None = field(default=None, metadata={
        **POSITIVE, "doc": "online learners: the lr goes linearly from learning_rate at epoch 0 to this at "
                           "lr_ramp_epochs, constant after; none: constant learning_rate"})
    lr_ramp_epochs: int = field(default=0, metadata=NON_NEGATIVE)
    adam_beta1: float = field(default=0.9, metadata=_rule(lambda v: 0 <= v < 1, "in [0, 1)"))
    adam_beta2: float = field(default=0.999, metadata=_rule(lambda v: 0 <= v < 1, "in [0, 1)"))
    adam_weight_decay: float = field(default=1e-4, metadata=NON_NEGATIVE)
    adam_eps: float = field(default=1e-8, metadata=POSITIVE)
    max_grad_norm: float = field(default=1.0, metadata=POSITIVE)
    clip_range: float = field(default=1e-4, metadata=POSITIVE)
    target_kl: float | None = field(default=None, metadata={
        **POSITIVE, **RESUMABLE,
        "doc": "ppo/pg: an epoch's optimizer steps stop at the first step whose approx_kl (½ mean (log ρ)² "
               "over its pairs, before the step) exceeds it, and that step is not applied; none: never"})
    adv_clip_max: float = field(default=5.0, metadata=POSITIVE)
    advantage: str = field(default="per_prompt", metadata={
        **choice("per_prompt", "per_group", "batch"),
        "doc": "per_prompt: z-score against the prompt's last stat_buffer_size rewards (DDPO's stat tracker); "
               "per_group: within the sample's group of this epoch, its B² branch group (leaves that share "
               "x_T: DanceGRPO's groups) or else the prompt's samples of the epoch (Flow-GRPO's); batch: "
               "against the whole epoch"})
    stat_buffer_size: int = field(default=32, metadata=POSITIVE)
    stat_min_count: int = field(default=16, metadata=POSITIVE)
    timestep_fraction: float = field(default=1.0, metadata=FRACTION)
    step_range: list[int] | None = field(default=None, metadata={
        "doc": "[first, last): train only these denoising steps, 0 being the noisiest (x_T -> x_{T-1}); "
               "timestep_fraction then draws within them. null: every step (with b2: the stage's interval). "
               "On the shapes world [0, 5] of 10 (the noisiest half) collapsed DDPO; [5, 10] did not "
               "(BENCHMARKS.md)"})
    inner_epochs: int = field(default=1, metadata=POSITIVE)
    updates_per_epoch: int = field(default=4, metadata=POSITIVE)
    micro_batch_size: int = field(default=16, metadata=POSITIVE)
    kl_beta: float = field(default=0.0, metadata=NON_NEGATIVE)
    kl_beta_end: float | None = field(default=None, metadata=NON_NEGATIVE)
    kl_ramp_epochs: int = field(default=0, metadata=NON_NEGATIVE)
    mixed_precision: str = field(default="no", metadata={
        **choice("no", "bf16", "fp16"),
        "doc": "the learner's precision (samplers use policy.dtype): bf16 autocast, or fp16 autocast with "
               "loss scaling; LoRA weights and optimizer state stay float32 (learner/precision.py)"})
    max_skipped_steps: int = field(default=10, metadata={
        **POSITIVE, **RESUMABLE, "doc": "optimizer steps skipped in a row (non-finite loss, gradient or batch) that stop "
                           "the run, after a checkpoint"})


@dataclass
class RewardServiceConfig:
    """Where rewards run: ``local`` (in the reward-stage actor) or ``serve`` (one Serve app per reward).

    Per-reward deployment settings live under ``rewards.<name>.serve`` (rewards/serve_options.py).
    """

    backend: str = field(default="local", metadata=choice("local", "serve"))
    timeout_s: float = field(default=120.0, metadata=POSITIVE)
    max_retries: int = field(default=2, metadata=NON_NEGATIVE)
    retry_backoff_s: float = field(default=1.0, metadata=NON_NEGATIVE)
    http_host: str = "127.0.0.1"
    http_port: int = field(default=8000, metadata=_rule(lambda v: 0 < v < 65536, "a TCP port in 1..65535"))
    # Bounds of the HTTP API (rewards/http_codec.py HttpLimits): 413 above a size, 429 when busy.
    max_body_bytes: int = field(default=16 * 2**20, metadata=POSITIVE)
    max_image_pixels: int = field(default=2048 * 2048, metadata=POSITIVE)
    max_request_pixels: int = field(default=64 * 2**20, metadata={
        **POSITIVE, "doc": "decoded pixels summed over a request's images (3 bytes each); >= max_image_pixels"})
    max_aspect_ratio: float = field(default=16.0, metadata={
        **_rule(lambda v: v >= 1, ">= 1"), "doc": "longer over shorter side of an image (422 above)"})
    max_batch: int = field(default=256, metadata=POSITIVE)
    max_inflight_images: int = field(default=1024, metadata={
        **POSITIVE, "doc": "images being decoded or scored per replica, over its concurrent requests; an HTTP "
                           "request beyond it gets 429 with Retry-After; >= max_batch"})
    keep_running: bool = field(default=False, metadata={"doc": "leave the apps gard train started"})
    down_timeout_s: float = field(default=300.0, metadata={
        **NON_NEGATIVE, "doc": "keep retrying a failing reward this long (and at least max_retries times); "
                               "then checkpoint and stop the run"})

    def http_limits(self):
        """The HTTP bounds as ``rewards.http_codec.HttpLimits`` (ValueError when they contradict each other)."""
        from rewards.http_codec import HttpLimits

        return HttpLimits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(HttpLimits)})


@dataclass
class ClusterConfig:
    address: str | None = field(default=None, metadata={"doc": "None: start a local Ray on 127.0.0.1", **RESUMABLE})
    local_num_cpus: int | None = field(default=None, metadata={**POSITIVE, **RESUMABLE})
    num_samplers: int = field(default=2, metadata=POSITIVE)
    sampler_num_cpus: float = field(default=0.5, metadata={**NON_NEGATIVE, **RESUMABLE})
    sampler_num_gpus: float = field(default=0.0, metadata={**NON_NEGATIVE, **RESUMABLE})
    learner_num_cpus: float = field(default=0.5, metadata={**NON_NEGATIVE, **RESUMABLE})
    learner_num_gpus: float = field(default=0.0, metadata={**NON_NEGATIVE, **RESUMABLE})
    reward_num_cpus: float = field(default=0.5, metadata={**NON_NEGATIVE, **RESUMABLE})
    reward_num_gpus: float = field(default=0.0, metadata={**NON_NEGATIVE, **RESUMABLE})
    max_staleness: int = field(default=0, metadata=_rule(lambda v: v in (0, 1), "0 (synchronous) or 1 (pipelined)"))
    layout: str = field(default="disaggregated", metadata={
        **choice("disaggregated", "colocated"), **RESUMABLE,
        "doc": "disaggregated: samplers and learner ranks apart (ranks packed, samplers spread); colocated: sampler "
               "i and rank i share one bundle, e.g. 0.45 + 0.45 of a GPU (cluster/layout.py)"})
    placement_timeout_s: float = field(default=300.0, metadata={
        **POSITIVE, **RESUMABLE, "doc": "how long to wait for Ray to reserve the placement groups (an autoscaling "
                                        "cluster may need to add nodes) before stopping with the bundles named"})
    call_timeout_s: float = field(default=600.0, metadata={**POSITIVE, **RESUMABLE})
    torch_threads: int = field(default=1, metadata={**POSITIVE, **RESUMABLE})
    max_actor_failures: int = field(default=3, metadata={
        **POSITIVE, **RESUMABLE, "doc": "the learner and the reward stage are restarted when they die; this many "
                                        "deaths in a row (on one call) stop the run with a checkpoint"})
    num_learners: int = field(default=1, metadata={
        **POSITIVE, **RESUMABLE, "doc": "data-parallel learner ranks (a torch.distributed group: gloo on CPU, NCCL on "
                                        "GPU), each asking for learner_num_cpus / learner_num_gpus; they split every "
                                        "optimizer step and average gradients, rank 0 publishes and is checkpointed. "
                                        "May change on resume (the update is the same up to float summation order)"})
    learner_check_every: int = field(default=10, metadata={
        **NON_NEGATIVE, **RESUMABLE, "doc": "with several learner ranks, compare their adapter and optimizer state "
                                            "every this many epochs (0: never); a mismatch stops the run with rank "
                                            "0's checkpoint"})
    max_sampler_failures: int = field(default=3, metadata={
        **POSITIVE, **RESUMABLE, "doc": "a sampler that dies is restarted; the death that makes this many in a "
                                        "row (deaths while restarting included) stops the run: 1 stops at the first"})


@dataclass
class CheckpointConfig:
    """Atomic checkpoints under ``<run_dir>/checkpoints/`` (cluster/checkpoint.py)."""

    every_epochs: int = field(default=5, metadata={
        **NON_NEGATIVE, "doc": "0: only at the end of the run and on a graceful stop"})
    keep_last: int = field(default=3, metadata=POSITIVE)


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl (cluster/metrics.py): TensorBoard, and optionally W&B."""

    tensorboard: bool = True
    progress: bool = True
    wandb: bool = field(default=False, metadata={
        "doc": "mirror the metric rows (step = epoch) and evaluation grids to Weights & Biases; needs the "
               "wandb package (pip install wandb), imported only when this is on"})
    wandb_project: str = field(default="gard", metadata=_rule(lambda v: bool(v.strip()), "a non-empty name"))
    wandb_mode: str = field(default="offline", metadata={
        **choice("offline", "online", "disabled"),
        "doc": "offline: files under <run_dir>/wandb, uploaded later with `wandb sync`; online: needs "
               "`wandb login` (or WANDB_API_KEY); disabled: W&B is not started"})


@dataclass
class Config:
    seed: int = 0
    epochs: int = field(default=10, metadata={**POSITIVE, **RESUMABLE})  # a finished run can be extended
    name: str = field(default="gard", metadata=RESUMABLE)
    output_dir: str | None = field(default=None, metadata=RESUMABLE)
    cache_dir: str = field(default=".cache/gard", metadata=RESUMABLE)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # name -> RewardConfig (cluster/reward_config.py): weight, Serve placement, the model's options.
    rewards: dict[str, RewardConfig] = field(default_factory=default_rewards, metadata={"parse": parse_rewards})
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    rwr: RwrConfig = field(default_factory=RwrConfig)
    dfusion: DFusionConfig = field(default_factory=DFusionConfig)
    b2: B2Config = field(default_factory=B2Config)
    reward_service: RewardServiceConfig = field(default_factory=RewardServiceConfig, metadata=RESUMABLE)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=RESUMABLE)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata=RESUMABLE)  # eval_config.py
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=RESUMABLE)

    # ----- derived ------------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        """Rewarded samples per epoch (with B² branching, each prompt of a batch yields n_branch leaves)."""
        leaves = self.b2.n_branch if (self.b2.enabled and self.b2.branching) else 1
        return self.cluster.num_samplers * self.sampling.batches_per_sampler * self.sampling.batch_size * leaves

    @property
    def train_steps_per_sample(self) -> int:
        return max(1, int(self.sampling.num_steps * self.train.timestep_fraction))

    def to_dict(self) -> dict:
        """Plain data in the YAML form the loader reads back (rewards flat, as users write them)."""
        data = dataclasses.asdict(self)
        data["rewards"] = {name: reward.to_yaml() for name, reward in self.rewards.items()}
        data["evaluation"] = self.evaluation.to_yaml()
        return data


def resume_safe_fields(cls=Config, prefix: str = "") -> tuple[str, ...]:
    """Dotted paths of the fields marked ``RESUMABLE`` (a marked section ends with "."): what a resumed
    run may change (how long to run, where things live, resources, timeouts, logging, evaluation,
    checkpointing).
    Every other field decides what is sampled and trained, so it must match the checkpoint's."""
    hints = typing.get_type_hints(cls)
    paths: list[str] = []
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            tp, path = typing.get_args(tp)[1], path + ".*"  # a named collection of sections (rewards.*)
        section = dataclasses.is_dataclass(tp)
        if f.metadata.get("resume_safe"):
            paths.append(path + ("." if section else ""))
        elif section:
            paths.extend(resume_safe_fields(tp, path + "."))
    return tuple(paths)


# ----- building and validation ------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads YAML (or starts from the defaults when ``path`` is None), applies overrides, validates
    (``cluster/config_loader.py``)."""
    from cluster.config_loader import load

    return load(path, overrides)


def validate(config: Config) -> None:
    """Cross-field rules (no I/O, no changes to the config): a ConfigError names the first violation."""
    from rewards.registry import REWARDS

    p = config.prompts
    if not p.train:
        raise ConfigError("prompts.train is empty: give at least one training prompt (prompts.train or prompts.train_file)")
    for i, prompt in enumerate(p.train):
        if not prompt.strip():
            raise ConfigError(f"prompts.train[{i}] is an empty string; every prompt needs text")

    pol = config.policy
    if not pol.train_targets or len(set(pol.train_targets)) != len(pol.train_targets) or \
            not set(pol.train_targets) <= {"unet", "text_encoder"}:
        raise ConfigError(f"policy.train_targets = {pol.train_targets}: expected a non-empty list of distinct "
                          f"names out of ['unet', 'text_encoder']")

    if not config.rewards:
        raise ConfigError(f"rewards is empty: configure at least one of {sorted(REWARDS)} with a weight")
    if (config.volume.gamma > 0 or (config.volume.gamma_end or 0) > 0) and "clip_score" not in config.rewards:
        raise ConfigError(f"volume.gamma = {config.volume.gamma} needs text and image embeddings, which the "
                          f"clip_score reward returns; add rewards.clip_score or set volume.gamma=0")
    modalities = config.volume.modalities
    if len(modalities) < 2 or len(set(modalities)) != len(modalities) or not set(modalities) <= {"text", "image", "caption"}:
        raise ConfigError(f"volume.modalities = {modalities}: expected k >= 2 distinct names out of "
                          f"['text', 'image', 'caption']")
    if "caption" in modalities and not {"llava_bertscore", "clip_score"} <= set(config.rewards):
        raise ConfigError(f"volume.modalities = {modalities}: the 'caption' modality embeds llava_bertscore's "
                          f"captions with clip_score's text encoder; configure both rewards or drop 'caption'")
    if config.b2.enabled:
        from learner.bpt import BptSchedule

        b = config.b2
        if b.tau_end > config.sampling.num_steps:
            raise ConfigError(f"b2.tau_end = {b.tau_end} exceeds sampling.num_steps = {config.sampling.num_steps}; "
                              f"the trained interval cannot be longer than the trajectory")
        try:
            BptSchedule(num_steps=config.sampling.num_steps, tau_start=b.tau_start, tau_end=b.tau_end,
                        num_stages=b.num_stages, epochs_per_stage=b.epochs_per_stage)
        except ValueError as err:
            raise ConfigError(f"b2: {err}") from None
        if not b.share_start and not (b.branching and b.tau_start == b.tau_end == config.sampling.num_steps):
            raise ConfigError(f"b2.share_start = false needs branch rollouts from x_T at every stage (b2.branching = "
                              f"true, b2.tau_start = b2.tau_end = sampling.num_steps = {config.sampling.num_steps}); "
                              f"got branching = {b.branching}, tau {b.tau_start} -> {b.tau_end}: leaves that share "
                              f"a prefix share its x_T")
        if b.selection == "all" and config.train.algorithm not in ("ppo", "pg"):
            raise ConfigError(f"b2.selection = 'all' trains every leaf with a policy-gradient advantage, but "
                              f"train.algorithm = {config.train.algorithm!r}; set train.algorithm to 'ppo' or "
                              f"'pg', or b2.selection=contrastive")
    if config.dpo.pair_source == "dfusion":
        if config.train.algorithm != "dpo":
            raise ConfigError(f"dpo.pair_source = 'dfusion' builds DPO pairs, but train.algorithm = "
                              f"{config.train.algorithm!r}; set train.algorithm=dpo or dpo.pair_source=best_worst")
        try:
            dfusion_spec(config)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    validate_evaluation(config.evaluation, train_rewards=config.rewards,
                        reward_num_gpus=config.cluster.reward_num_gpus)
    try:
        config.reward_service.http_limits()
    except ValueError as err:
        raise ConfigError(f"reward_service: {err}") from None
    from cluster.layout import validate_layout

    validate_layout(config.cluster)
    if config.train.target_kl is not None and config.train.algorithm not in ("ppo", "pg"):
        raise ConfigError(f"train.target_kl = {config.train.target_kl} stops PPO/PG steps by their approx_kl, but "
                          f"train.algorithm = {config.train.algorithm!r} has none; set train.algorithm to 'ppo' or "
                          f"'pg', or train.target_kl=null")
    _validate_step_range(config)
    if config.train.stat_min_count > config.train.stat_buffer_size:
        raise ConfigError(f"train.stat_min_count = {config.train.stat_min_count} exceeds train.stat_buffer_size = "
                          f"{config.train.stat_buffer_size}; per-prompt statistics would never be used")


def _validate_step_range(config: Config) -> None:
    window, num_steps = config.train.step_range, config.sampling.num_steps
    if window is None:
        return
    if len(window) != 2 or not 0 <= window[0] < window[1] <= num_steps:  # the loader has checked int items
        raise ConfigError(f"train.step_range = {window}: expected [first, last] with 0 <= first < last <= "
                          f"sampling.num_steps = {num_steps} (denoising steps first..last-1, 0 the noisiest), "
                          f"or null for every step")
    if config.train.algorithm not in ("ppo", "pg", "dpo"):
        raise ConfigError(f"train.step_range = {window} picks sampled transitions to train, but train.algorithm = "
                          f"{config.train.algorithm!r} re-noises the final latents at fresh timesteps; use it with "
                          f"'ppo', 'pg' or 'dpo', or set train.step_range=null")
    if config.b2.enabled:
        raise ConfigError(f"train.step_range = {window} fixes the trained steps, but b2.enabled = true widens "
                          f"them stage by stage (b2.tau_start..tau_end); set train.step_range=null or b2.enabled=false")


def dfusion_spec(config: Config):
    """The ``dfusion`` section as an ``actors.dfusion.DFusionSpec`` (ValueError on a bad combination)."""
    from actors.dfusion import DFusionSpec

    d = config.dfusion
    return DFusionSpec(
        token_positions=None if d.token_positions is None else tuple(d.token_positions),
        mask_threshold=d.mask_threshold, mask_normalize=d.mask_normalize, mask_steps=d.mask_steps,
        mask_factors=tuple(d.mask_factors), fuse_parts=tuple(d.fuse_parts), fuse_start=d.fuse_start,
        fuse_end=d.fuse_end)
