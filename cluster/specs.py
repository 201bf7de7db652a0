"""What the actors of a run are built from, derived from the config: policy, learner and reward specs,
and the start-up banner that prints the derived batch arithmetic (like ddpo-pytorch's)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from actors.policy import PolicySpec
from cluster.config import Config
from cluster.layout import describe_layout
from cluster.reward_config import RewardConfig
from learner.bpt import BptSchedule
from learner.spec import LearnerSpec

TINY_CLIP = "tiny:clip"
SHAPES_CLIP = "tiny:shapes-clip"  # the shapes world's trained reward model (testbed/weights/shapes-clip)


def resolve_reward_specs(rewards: dict[str, RewardConfig], *, cache_dir: str) -> tuple[dict[str, dict],
                                                                                       dict[str, float]]:
    """Each reward's builder options and weight (the training ``rewards`` or ``evaluation.rewards``);
    ``tiny:clip`` models are built locally under ``cache_dir``, ``tiny:shapes-clip`` is the shipped
    shapes-world reward model and ``tiny:shapes-llava`` its captioner (their manifests checked)."""
    from rewards.tiny import shapes_clip_options, tiny_aesthetic_options, tiny_clip_score_options

    specs, weights = {}, {}
    cache_dir = Path(cache_dir).resolve()  # absolute: reward replicas may run in another cwd
    tiny_dir = cache_dir / "tiny-clip"
    for name, reward in rewards.items():
        options = dict(reward.options)
        weights[name] = reward.weight
        if name == "clip_score" and options.get("model") == TINY_CLIP:
            options = {**options, **tiny_clip_score_options(tiny_dir, seed=options.get("seed", 0))}
        if name == "clip_score" and options.get("model") == SHAPES_CLIP:
            options = {**options, **shapes_clip_options()}
        if name == "aesthetic" and options.get("clip_model") == TINY_CLIP:
            options = {**options, **tiny_aesthetic_options(tiny_dir, seed=options.get("seed", 0))}
        if name == "llava_bertscore":
            options.setdefault("cache_dir", str(cache_dir))
            from rewards.llava_bertscore import SHAPES_LLAVA, resolve_llava_model

            if options.get("model") == SHAPES_LLAVA:
                resolve_llava_model(SHAPES_LLAVA, cache_dir=cache_dir)  # its manifest, checked before Ray starts
        specs[name] = options
    return specs, weights


def evaluation_specs(config: Config, train_specs: dict[str, dict]) -> tuple[dict[str, dict], tuple[str, dict] | None]:
    """(the gold rewards' builder options, (name, options) of the Recall@1 reward or None): the reward
    stage builds both in-process on its first evaluation. The recall reward is taken from
    ``evaluation.rewards`` when it is there, else from the training rewards (``train_specs``)."""
    specs, _ = resolve_reward_specs(config.evaluation.rewards, cache_dir=config.cache_dir)
    name = config.evaluation.recall
    if name is None:
        return specs, None
    return specs, (name, specs[name] if name in specs else train_specs[name])


def evaluation_in_process(config: Config) -> bool:
    """Whether the reward stage runs models of its own for the evaluation (gold or recall rewards)."""
    return bool(config.evaluation.rewards) or config.evaluation.recall is not None


def reward_stage_resources(config: Config) -> tuple[float, float]:
    """(CPUs, GPUs) of the reward-stage actor: ``cluster.reward_num_*`` with the local backend. With Serve
    it mostly waits on handles (0.1 CPU); it asks for ``cluster.reward_num_gpus`` only when it runs
    evaluation models of its own (a gold or recall reward on CUDA needs it; the config checks that)."""
    c = config.cluster
    if config.reward_service.backend == "serve":
        return 0.1, c.reward_num_gpus if evaluation_in_process(config) else 0.0
    return c.reward_num_cpus, c.reward_num_gpus


def _section_fields(spec_cls, *sections) -> dict:
    """The fields of ``spec_cls`` taken, by name, from config sections (lists become tuples): specs are
    built mechanically, so a setting is named, defaulted and validated once, in the config."""
    names = {f.name for f in dataclasses.fields(spec_cls)}
    values = {}
    for section in sections:
        for f in dataclasses.fields(section):
            if f.name in names:
                value = getattr(section, f.name)
                values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


def policy_spec(config: Config, *, pretrained: str, num_gpus: float) -> PolicySpec:
    """The ``policy`` and ``sampling`` sections as a PolicySpec (``device: auto`` resolved by the GPUs
    the actor gets; ``init_adapter`` is the learner's, not part of the spec)."""
    device = config.policy.device
    if device == "auto":
        device = "cuda" if num_gpus > 0 else "cpu"
    values = _section_fields(PolicySpec, config.policy, config.sampling)
    values.pop("init_adapter", None)
    return PolicySpec(**{**values, "pretrained": pretrained, "device": device})


def bpt_schedule(config: Config) -> BptSchedule | None:
    """The B² backward-progressive schedule, or None when B² is off."""
    b = config.b2
    if not b.enabled:
        return None
    return BptSchedule(num_steps=config.sampling.num_steps, tau_start=b.tau_start, tau_end=b.tau_end,
                       num_stages=b.num_stages, epochs_per_stage=b.epochs_per_stage)


def learner_spec(config: Config) -> LearnerSpec:
    """The ``train`` section as a LearnerSpec, plus the few settings of other sections it needs."""
    train = _section_fields(LearnerSpec, config.train)
    return LearnerSpec(**train, max_staleness=config.cluster.max_staleness, seed=config.seed,
                       bpt=bpt_schedule(config), b2_threshold=config.b2.threshold,
                       b2_neg_threshold=config.b2.neg_threshold,
                       b2_history_epochs=config.b2.history_epochs,
                       b2_selection=config.b2.selection, dpo_beta=config.dpo.online_beta,
                       dpo_denoise_beta=config.dpo.beta, dpo_noise_draws=config.dpo.noise_draws,
                       rwr_weighting=config.rwr.weighting, rwr_temperature=config.rwr.temperature,
                       rwr_noise_draws=config.rwr.noise_draws)


def default_policy_spec(*, pretrained: str, **overrides) -> PolicySpec:
    """The default config's PolicySpec (CPU) with ``overrides``: for tests and benchmarks, so that the
    defaults stay in the config alone."""
    return dataclasses.replace(policy_spec(Config(), pretrained=pretrained, num_gpus=0), **overrides)


def default_learner_spec(**overrides) -> LearnerSpec:
    """The default config's LearnerSpec with ``overrides`` (tests and benchmarks)."""
    return dataclasses.replace(learner_spec(Config()), **overrides)


def _adapters(policy) -> str:
    """'UNet LoRA r=4 + text-encoder LoRA r=4' for the banner."""
    parts = {"unet": f"UNet LoRA r={policy.lora_rank}",
             "text_encoder": f"text-encoder LoRA r={policy.text_encoder_lora_rank}"}
    adapters = " + ".join(parts[t] for t in policy.train_targets)
    return adapters + (f", from {policy.init_adapter}" if policy.init_adapter else "")


def _eval_line(evaluation) -> str:
    """'2 sets (seen 4, heldout 2 prompts) x 2 images, fixed seeds, every 10 epochs; gold shapes_judge; ...'."""
    sets = ", ".join(f"{name} {len(prompts)}" for name, prompts in evaluation.prompts.items())
    every = f"every {evaluation.every} epochs" if evaluation.every else "before and after training"
    line = (f"{len(evaluation.prompts)} set(s) ({sets} prompts) x {evaluation.images_per_prompt} images, fixed "
            f"seeds, {every}")
    if evaluation.gold is not None:
        others = [name for name in evaluation.rewards if name != evaluation.gold]
        line += f"; gold {evaluation.gold}" + (f" (also {', '.join(others)})" if others else "")
    if evaluation.recall is not None:
        line += f"; Recall@1 with {evaluation.recall}"
    if evaluation.guard.action != "off":
        g = evaluation.guard
        line += f"; hacking guard {g.action}: {g.train_metric} up and {g.metric} down {g.patience}x in a row"
    return line


def _learners_line(config: Config) -> str:
    """'2 ranks x (0.5 CPU, 0 GPU), gloo, ~N pairs per rank per step; states compared every 10 epochs'."""
    c, t = config.cluster, config.train
    line = f"{c.num_learners} {'rank' if c.num_learners == 1 else 'ranks'} x ({c.learner_num_cpus:g} CPU, " \
           f"{c.learner_num_gpus:g} GPU)"
    if c.num_learners == 1:
        return line
    pairs = config.samples_per_epoch * config.train_steps_per_sample * t.inner_epochs
    per_rank = pairs // max(t.inner_epochs * t.updates_per_epoch, 1) // c.num_learners
    backend = "nccl" if c.learner_num_gpus > 0 and config.policy.device != "cpu" else "gloo"
    check = f"every {c.learner_check_every} epochs" if c.learner_check_every else "never"
    return (f"{line}, torch.distributed {backend}, ~{per_rank} pairs per rank per step, gradients averaged; "
            f"states compared {check}")


def _items_line(config: Config, pairs: int, steps: int) -> str:
    """What an epoch trains: (sample, t) pairs of the sampled trajectories, or for the rules that noise the
    final latents afresh, at most this many (sample or pair, noise draw) items (only the weighted ones train)."""
    t, samples = config.train, config.samples_per_epoch
    micro = f" in {steps} optimizer steps (micro-batches of {t.micro_batch_size})"
    if t.algorithm == "rwr":
        return f"  (sample, draw) items: <= {samples * config.rwr.noise_draws * t.inner_epochs} / epoch{micro}"
    if t.algorithm == "diffusion_dpo":
        return f"  (pair, draw) items  : <= {samples // 2 * config.dpo.noise_draws * t.inner_epochs} / epoch{micro}"
    return (f"  (sample, t) pairs   : {pairs} / epoch in {steps} optimizer steps of ~{pairs // max(steps, 1)}"
            f" (micro-batches of {t.micro_batch_size})")


def banner(config: Config, run_dir: Path, ray_address: str) -> str:
    c, s, t = config.cluster, config.sampling, config.train
    branching = config.b2.enabled and config.b2.branching
    samples = config.samples_per_epoch
    pairs = samples * config.train_steps_per_sample * t.inner_epochs
    steps = t.inner_epochs * t.updates_per_epoch
    lines = [
        "=" * 72,
        f"gard train: {config.name}  ->  {run_dir}",
        f"  ray                 : {ray_address}",
        f"  policy              : {config.policy.pretrained} ({_adapters(config.policy)}, {config.policy.dtype})",
        "  rewards             : " + ", ".join(f"{k} x{v.weight}" for k, v in config.rewards.items())
        + (f", volume gamma={config.volume.gamma}" if config.volume.gamma or config.volume.gamma_end else ""),
        f"  epochs              : {config.epochs}   seed {config.seed}   max_staleness {c.max_staleness}",
        f"  samplers            : {c.num_samplers} x {s.batches_per_sampler} batches x {s.batch_size} "
        + (f"prompts x {config.b2.n_branch} leaves" if branching else "images") + f" = {samples} samples / epoch",
        f"  DDIM                : {s.num_steps} steps, eta {s.eta}, guidance {s.guidance_scale}, {s.resolution}px",
        f"  training            : {t.algorithm}, {config.train_steps_per_sample}/{s.num_steps} timesteps per sample,"
        f" {t.inner_epochs} inner epoch(s), precision {t.mixed_precision} (samplers {config.policy.dtype})",
        _items_line(config, pairs, steps),
        f"  learners            : {_learners_line(config)}",
        f"  layout              : {describe_layout(c)}",
        f"  eval                : {_eval_line(config.evaluation)}",
        *([f"  B²-DiffuRL          : tau {config.b2.tau_start}->{config.b2.tau_end} over {config.b2.num_stages} stages"
           f" x {config.b2.epochs_per_stage} epoch(s)"
           + (f", {config.b2.n_branch} branches per prefix" if config.b2.branching else ", no branching")
           + ("" if config.b2.share_start else " (each from its own x_T)")
           + (f", selection z >= {config.b2.threshold} / z < "
              f"{-config.b2.threshold if config.b2.neg_threshold is None else config.b2.neg_threshold}"
              f", history {config.b2.history_epochs} epochs" if config.b2.selection == "contrastive"
              else f", every leaf trained, advantage {t.advantage}")] if config.b2.enabled else []),
        *([f"  D-Fusion pairs      : per prompt (fused ≻ worst), mask threshold {config.dfusion.mask_threshold}"
           f" ({config.dfusion.mask_normalize}, {config.dfusion.mask_steps} steps), fused parts "
           f"{config.dfusion.fuse_parts}, steps [{config.dfusion.fuse_start}, {config.dfusion.fuse_end})"]
          if config.dpo.pair_source == "dfusion" else []),
        "=" * 72,
    ]
    return "\n".join(lines)



def deploy_config_rewards(config: Config, specs: dict[str, dict], *, reuse_running: bool = True):
    """Deploys one Serve application per reward of ``specs`` with the config's placement and HTTP limits
    -> ``rewards.serve.Deployed``."""
    from rewards.serve import deploy_rewards

    rs = config.reward_service
    return deploy_rewards(specs, {name: config.rewards[name].serve for name in specs}, limits=rs.http_limits(),
                          http_host=rs.http_host, http_port=rs.http_port, reuse_running=reuse_running)


def start_reward_services(config: Config, specs: dict[str, dict]) -> tuple[dict, list[str]]:
    """Deploys the reward applications that are not running yet -> (the reward stage's ``service``
    settings with the apps' handles, the names of the apps this call started)."""
    rs = config.reward_service
    deployed = deploy_config_rewards(config, specs)
    service = {"timeout_s": rs.timeout_s, "max_retries": rs.max_retries, "retry_backoff_s": rs.retry_backoff_s,
               "down_timeout_s": rs.down_timeout_s, "apps": deployed.apps}
    return service, deployed.started
