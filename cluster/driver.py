"""The driver: wires samplers, reward stage and learner on Ray and runs the epochs.

It moves references only: trajectories go sampler -> learner and images sampler -> reward stage as
ObjectRefs; the driver reads back scalar metrics (and the small evaluation images for grids).

Pipelining (DESIGN.md §5): with ``cluster.max_staleness = 0`` each epoch samples with the newest
adapter, then trains (synchronous DDPO). With 1, sampling of epoch k+1 is queued before the update
on epoch k, so samplers work while the learner trains; epoch k+1 is then one version behind, which
PPO's ratio against the recorded log-probs accounts for.

Long runs (issue 6): a checkpoint every ``checkpoint.every_epochs`` epochs, at the end and on a
graceful stop (cluster/checkpoint.py); ``resume`` continues from one. With ``max_staleness: 0`` a
resumed run is bit-for-bit the uninterrupted one on CPU: the learner's state is restored exactly and
every batch's prompts and noise derive from (seed, epoch, worker, batch). (With 1, the epoch after
the checkpoint is sampled with the newest adapter instead of the one before it.) Dead samplers are
restarted and their batches sampled again (cluster/samplers.py); a reward that stays down, or a
sampler that keeps dying, stops the run with a checkpoint written first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from actors.policy import PolicySpec
from actors.tiny import resolve_pretrained
from cluster.checkpoint import (
    Checkpoint,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    write_checkpoint,
)
from cluster.config import Config, ConfigError
from cluster.metrics import MetricsWriter, save_grid
from cluster.samplers import BatchJob, SamplerFailedError, SamplerPool, StepAbandoned
from cluster.seeding import batch_prompts, batch_seed, eval_seed
from cluster.stop import EXIT_CODES, RunInterrupted, StopRequest, stop_on_signals
from learner.bpt import BptSchedule
from learner.learner import LearnerSpec
from learner.precision import TrainingStalledError
from learner.schedules import linear_ramp

TINY_CLIP = "tiny:clip"


@dataclass
class EvalResult:
    mean: float
    images: np.ndarray  # uint8 [N, H, W, 3]
    components: dict[str, float]  # eval_<reward> -> mean
    prompts: list[str]
    scores: np.ndarray  # float32 [N]
    captions: list[str] | None


@dataclass
class EpochBatch:
    """One epoch's sampler batches (jobs hold the refs), in submission order."""

    jobs: list[BatchJob]
    submitted_at: float
    prompts: list = dataclasses.field(default_factory=list)  # the prompt of every sample, per batch

    @property
    def trajectories(self) -> list:  # ObjectRef[Trajectory]
        return [job.trajectory for job in self.jobs]

    @property
    def scores(self) -> list:  # ObjectRef[ScoredImages]
        return [job.score for job in self.jobs]


@dataclass
class DFusionLaunch:
    """References to one epoch's D-Fusion calls (``dpo.pair_source = dfusion``), in pair order."""

    pairs: list  # ObjectRef[TrajectoryPairs]: chosen = fused, rejected = the prompt's worst sample
    scores: list  # ObjectRef[ScoredImages] of the fused images (monitoring only, see launch_dfusion)
    stats: list  # ObjectRef[dict]: mask_fraction per pair, unet_calls, dfusion_s
    poor_rewards: np.ndarray  # float32 [P]
    good_rewards: np.ndarray  # float32 [P]


class RewardDownError(RuntimeError):
    """A reward stayed down past reward_service.down_timeout_s; the run stopped after a checkpoint."""


def _start_error(err, actor: str) -> Exception:
    """The error an actor's constructor raised, from Ray's ActorDiedError (Ray keeps only its text).

    Refusals of the user's settings (an adapter that binds to nothing, a schedule with σ = 0) become a
    ConfigError naming the field; anything else keeps Ray's error with its traceback."""
    lines = [line.strip() for line in str(getattr(err, "error_msg", "") or "").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    kind, _, message = last.partition(": ")
    if kind.rsplit(".", 1)[-1] in ("AdapterBindingError", "ValueError") and message:
        return ConfigError(f"the {actor} could not start: {message}")
    return err


def resolve_reward_specs(config: Config) -> tuple[dict[str, dict], dict[str, float]]:
    """Splits ``rewards`` into builder options and weights; ``tiny:clip`` models are built locally."""
    from rewards.tiny import tiny_aesthetic_options, tiny_clip_score_options

    specs, weights = {}, {}
    cache_dir = Path(config.cache_dir).resolve()  # absolute: reward replicas may run in another cwd
    tiny_dir = cache_dir / "tiny-clip"
    for name, options in config.rewards.items():
        options = dict(options)
        weights[name] = float(options.pop("weight", 1.0))
        options.pop("serve", None)
        if name == "clip_score" and options.get("model") == TINY_CLIP:
            options = {**options, **tiny_clip_score_options(tiny_dir, seed=options.get("seed", 0))}
        if name == "aesthetic" and options.get("clip_model") == TINY_CLIP:
            options = {**options, **tiny_aesthetic_options(tiny_dir, seed=options.get("seed", 0))}
        if name == "llava_bertscore":
            options.setdefault("cache_dir", str(cache_dir))
        specs[name] = options
    return specs, weights


def policy_spec(config: Config, *, pretrained: str, num_gpus: float) -> PolicySpec:
    device = config.policy.device
    if device == "auto":
        device = "cuda" if num_gpus > 0 else "cpu"
    s, p = config.sampling, config.policy
    return PolicySpec(
        pretrained=pretrained,
        lora_rank=p.lora_rank,
        lora_alpha=p.lora_alpha,
        lora_targets=tuple(p.lora_targets),
        dtype=p.dtype,
        device=device,
        num_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
        eta=s.eta,
        resolution=s.resolution,
        negative_prompt=s.negative_prompt,
        init_lora_seed=p.init_lora_seed,
        train_targets=tuple(p.train_targets),
        text_encoder_lora_rank=p.text_encoder_lora_rank,
        text_encoder_lora_alpha=p.text_encoder_lora_alpha,
        text_encoder_lora_targets=tuple(p.text_encoder_lora_targets),
        timestep_spacing=s.timestep_spacing,
    )


def bpt_schedule(config: Config) -> BptSchedule | None:
    """The B² backward-progressive schedule, or None when B² is off."""
    b = config.b2
    if not b.enabled:
        return None
    return BptSchedule(num_steps=config.sampling.num_steps, tau_start=b.tau_start, tau_end=b.tau_end,
                       num_stages=b.num_stages, epochs_per_stage=b.epochs_per_stage)


def learner_spec(config: Config) -> LearnerSpec:
    fields = {f.name for f in dataclasses.fields(LearnerSpec)}
    train = {k: v for k, v in dataclasses.asdict(config.train).items() if k in fields}
    return LearnerSpec(**train, max_staleness=config.cluster.max_staleness, seed=config.seed,
                       bpt=bpt_schedule(config), b2_threshold=config.b2.threshold,
                       b2_history_stages=config.b2.history_stages, dpo_beta=config.dpo.online_beta)


def _adapters(policy) -> str:
    """'UNet LoRA r=4 + text-encoder LoRA r=4' for the banner."""
    parts = {"unet": f"UNet LoRA r={policy.lora_rank}",
             "text_encoder": f"text-encoder LoRA r={policy.text_encoder_lora_rank}"}
    adapters = " + ".join(parts[t] for t in policy.train_targets)
    return adapters + (f", from {policy.init_adapter}" if policy.init_adapter else "")


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
        "  rewards             : " + ", ".join(f"{k} x{v.get('weight', 1.0)}" for k, v in config.rewards.items())
        + (f", volume gamma={config.volume.gamma}" if config.volume.gamma or config.volume.gamma_end else ""),
        f"  epochs              : {config.epochs}   seed {config.seed}   max_staleness {c.max_staleness}",
        f"  samplers            : {c.num_samplers} x {s.batches_per_sampler} batches x {s.batch_size} "
        + (f"prompts x {config.b2.n_branch} leaves" if branching else "images") + f" = {samples} samples / epoch",
        f"  DDIM                : {s.num_steps} steps, eta {s.eta}, guidance {s.guidance_scale}, {s.resolution}px",
        f"  training            : {t.algorithm}, {config.train_steps_per_sample}/{s.num_steps} timesteps per sample,"
        f" {t.inner_epochs} inner epoch(s), precision {t.mixed_precision} (samplers {config.policy.dtype})",
        f"  (sample, t) pairs   : {pairs} / epoch in {steps} optimizer steps of ~{pairs // max(steps, 1)}"
        f" (micro-batches of {t.micro_batch_size})",
        f"  eval                : {len(config.prompts.eval)} prompts x {config.prompts.eval_images_per_prompt}"
        f" images, fixed seeds",
        *([f"  B²-DiffuRL          : tau {config.b2.tau_start}->{config.b2.tau_end} over {config.b2.num_stages} stages"
           f" x {config.b2.epochs_per_stage} epoch(s)"
           + (f", {config.b2.n_branch} branches per prefix" if config.b2.branching else ", no branching")
           + f", selection |z| >= {config.b2.threshold}, history {config.b2.history_stages}"] if config.b2.enabled else []),
        *([f"  D-Fusion pairs      : per prompt (fused ≻ worst), mask threshold {config.dfusion.mask_threshold}"
           f" ({config.dfusion.mask_normalize}, {config.dfusion.mask_steps} steps), fused parts "
           f"{config.dfusion.fuse_parts}, steps [{config.dfusion.fuse_start}, {config.dfusion.fuse_end})"]
          if config.dpo.pair_source == "dfusion" else []),
        "=" * 72,
    ]
    return "\n".join(lines)


class Driver:
    """Owns the Ray actors of one run and the epoch loop."""

    def __init__(self, config: Config, *, run_dir: Path):
        import ray

        self.ray = ray
        self.config = config
        self.run_dir = run_dir
        self.timeout = config.cluster.call_timeout_s
        c = config.cluster
        pretrained = resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir)
        specs, weights = resolve_reward_specs(config)
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(c.torch_threads)}}
        from cluster.remote import RemoteLearner, RemoteSampler
        from cluster.stages import RewardStage

        # Unlimited restarts, no transparent task retries: the driver re-sends the adapter to a
        # restarted sampler before it samples again (cluster/samplers.py).
        sampler_cls = ray.remote(num_cpus=c.sampler_num_cpus, num_gpus=c.sampler_num_gpus, runtime_env=env,
                                 max_restarts=-1, max_task_retries=0)(RemoteSampler)
        self.samplers = [
            sampler_cls.remote(
                spec=policy_spec(config, pretrained=pretrained, num_gpus=c.sampler_num_gpus),
                worker_index=i,
                torch_threads=c.torch_threads,
                call_timeout_s=self.timeout,
            )
            for i in range(c.num_samplers)
        ]
        self.learner = ray.remote(num_cpus=c.learner_num_cpus, num_gpus=c.learner_num_gpus, runtime_env=env)(
            RemoteLearner
        ).remote(
            policy_spec=policy_spec(config, pretrained=pretrained, num_gpus=c.learner_num_gpus),
            spec=learner_spec(config),
            torch_threads=c.torch_threads,
            init_adapter=config.policy.init_adapter,
            call_timeout_s=self.timeout,
        )
        try:  # the learner refuses adapters that bind to nothing: say so before anything else runs
            ray.get(self.learner.__ray_ready__.remote(), timeout=self.timeout)
        except ray.exceptions.RayActorError as err:
            raise _start_error(err, "learner") from err
        self.schedule = bpt_schedule(config)
        self.started_apps: list[str] = []
        service = None
        if config.reward_service.backend == "serve":
            service = self._start_reward_services(specs)
        # With services the stage only waits on handles, so it takes several batches at once.
        self.reward_stage = ray.remote(
            num_cpus=c.reward_num_cpus if service is None else 0.1,
            num_gpus=c.reward_num_gpus if service is None else 0,
            max_concurrency=1 if service is None else 8,
            runtime_env=env,
        )(RewardStage).remote(specs=specs, weights=weights, volume_modalities=tuple(config.volume.modalities),
                              service=service)
        self.weights_ref = None
        self.pool = SamplerPool(samplers=self.samplers, reward_stage=self.reward_stage, timeout_s=self.timeout,
                                max_failures=c.max_sampler_failures)
        self.rows: list[dict] = []  # metric rows of the completed epochs (restored on resume)
        self.version = 0  # the learner's policy version after the last update
        self.completed_epochs = 0  # epochs whose update the learner has applied
        self.last_checkpoint: Path | None = None

    def _start_reward_services(self, specs: dict[str, dict]) -> dict:
        """Deploys the reward applications not running yet; remembers what it started."""
        from cluster.config import serve_options
        from rewards.http_codec import HttpLimits
        from rewards.serve import deploy_rewards

        rs = self.config.reward_service
        options = {name: serve_options(name, self.config.rewards[name].get("serve")) for name in specs}
        limits = HttpLimits(max_body_bytes=rs.max_body_bytes, max_image_pixels=rs.max_image_pixels,
                            max_batch=rs.max_batch)
        deployed = deploy_rewards(specs, options, limits=limits, http_host=rs.http_host, http_port=rs.http_port)
        self.started_apps = deployed.started
        return {"timeout_s": rs.timeout_s, "max_retries": rs.max_retries, "retry_backoff_s": rs.retry_backoff_s,
                "down_timeout_s": rs.down_timeout_s, "apps": deployed.apps}

    def shutdown(self) -> None:
        """Removes the reward applications this run started (unless reward_service.keep_running)."""
        if self.started_apps and not self.config.reward_service.keep_running:
            from rewards.serve import remove_rewards

            remove_rewards(self.started_apps)
            self.started_apps = []

    # ----- helpers ------------------------------------------------------------------------
    def _get(self, refs):
        return self.ray.get(refs, timeout=self.timeout)

    def gamma(self, epoch: int) -> float:
        v = self.config.volume
        return linear_ramp(epoch, start=v.gamma, end=v.gamma_end, ramp_epochs=v.ramp_epochs)

    def broadcast(self) -> list[dict]:
        """Publishes the learner's adapter once (one ObjectRef), applies it on every sampler and waits.

        Returns the samplers' acknowledgements ({"version", "apply_s"}); a sampler found dead is
        restarted and given the adapter (cluster/samplers.py).
        """
        self.weights_ref = self.learner.publish.remote()
        return self.pool.set_weights(self.weights_ref)

    def launch(self, epoch: int) -> EpochBatch:
        """Queues one epoch of sampling and its reward calls (rewards run while sampling continues)."""
        cfg, s = self.config, self.config.sampling
        batch_prompt_lists = []
        gamma = self.gamma(epoch)
        branches = None
        if self.schedule is not None and cfg.b2.branching:
            branches = (cfg.b2.n_branch, self.schedule.branch_step(self.schedule.stage(epoch)))
        jobs = []
        for batch in range(s.batches_per_sampler):
            for worker in range(len(self.samplers)):
                prompts = batch_prompts(
                    cfg.prompts.train, size=s.batch_size, seed=cfg.seed, epoch=epoch, worker=worker, batch=batch
                )
                seed = batch_seed(cfg.seed, epoch=epoch, worker=worker, batch=batch)
                job = BatchJob(worker=worker, prompts=prompts, seed=seed, gamma=gamma, branches=branches)
                jobs.append(self.pool.submit(job))
                # the prompt of every sample, group-major for branch rollouts (D-Fusion pairs by prompt)
                batch_prompt_lists.append([p for p in prompts for _ in range(branches[0] if branches else 1)])
        return EpochBatch(jobs=jobs, submitted_at=time.perf_counter(), prompts=batch_prompt_lists)

    def complete(self, batch: EpochBatch, *, abandon=lambda: False) -> list:
        """Every batch's scores; batches lost with a dead sampler are sampled again first.

        A reward that stayed down (RewardServiceError after its retries) becomes RewardDownError.
        """
        from rewards.client import RewardServiceError

        try:
            return self.pool.complete(batch.jobs, abandon=abandon)
        except self.ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, RewardServiceError):
                raise RewardDownError(str(cause)) from err
            raise

    def launch_dfusion(self, current: EpochBatch, scores: list, epoch: int) -> DFusionLaunch:
        """D-Fusion pairs (seed 004; actors/dfusion.py): per prompt of the epoch, its worst and best sample
        (finite rewards, best > worst), fused on the samplers (pairs split evenly; only the trajectory
        batches a sampler needs are sent, as references).

        The fused samples are rewarded too, but only as a metric: the pair's order (fused ≻ worst) is
        D-Fusion's construction (the fused image takes the best sample's content inside the prompt
        tokens' attention mask), not a reward comparison, so training does not wait on or filter by it.
        One extra reward batch of P images per epoch is cheap next to the fusion itself (~4 UNet
        passes per step), and ``dfusion_reward_gain`` shows whether the construction holds for a reward.
        """
        from cluster.config import dfusion_spec
        from learner.selection import preference_pairs

        spec = dfusion_spec(self.config)
        total = np.concatenate([s.total for s in scores]).astype(np.float32)
        prompts = [p for batch in current.prompts for p in batch]
        if len(prompts) != total.size:
            raise RuntimeError(f"{len(prompts)} prompts but {total.size} rewards in epoch {epoch}")
        groups = np.unique(prompts, return_inverse=True)[1]
        best, worst = preference_pairs(groups, total)
        where = [(b, row) for b, batch in enumerate(current.prompts) for row in range(len(batch))]  # (batch, row)
        pair_refs, score_refs, stat_refs = [], [], []
        if best.size:
            for k, chunk in enumerate(np.array_split(np.arange(best.size), min(len(self.samplers), best.size))):
                used = sorted({where[i][0] for i in np.concatenate([best[chunk], worst[chunk]])})
                local = {b: j for j, b in enumerate(used)}
                # D-Fusion is a deterministic function of its inputs, so Ray may simply run it again on a
                # restarted sampler; until the next broadcast that sampler holds the initial adapter, and
                # the learner then refuses its pairs as stale (counted) instead of training on them.
                pairs_ref, images_ref, stats_ref = self.samplers[k].dfusion.options(
                    num_returns=3, max_task_retries=2).remote(
                    sources=[current.jobs[b].trajectory for b in used],
                    poor=[(local[where[i][0]], where[i][1]) for i in worst[chunk]],
                    good=[(local[where[i][0]], where[i][1]) for i in best[chunk]],
                    spec=spec)
                pair_refs.append(pairs_ref)
                stat_refs.append(stats_ref)
                score_refs.append(self.reward_stage.score.remote(batch=images_ref, gamma=self.gamma(epoch)))
        return DFusionLaunch(pairs=pair_refs, scores=score_refs, stats=stat_refs, poor_rewards=total[worst],
                             good_rewards=total[best])

    def dfusion_row(self, fusion: DFusionLaunch) -> dict:
        """Per-epoch D-Fusion metrics: pair count, mean mask fraction, rewards of fused / worst / best."""
        row = {"n_dfusion_pairs": int(fusion.poor_rewards.size)}
        if not fusion.pairs:
            return row
        stats = self._get(fusion.stats)
        fused = np.concatenate([s.total for s in self._get(fusion.scores)])
        row.update({
            "dfusion_mask_fraction": float(np.mean([f for s in stats for f in s["mask_fraction"]])),
            "dfusion_reward_mean": float(np.nanmean(fused)),
            "dfusion_poor_reward_mean": float(np.mean(fusion.poor_rewards)),
            "dfusion_good_reward_mean": float(np.mean(fusion.good_rewards)),
            "dfusion_reward_gain": float(np.nanmean(fused - fusion.poor_rewards)),
            "dfusion_s": float(max(s["dfusion_s"] for s in stats)),
        })
        return row

    def evaluate(self) -> EvalResult:
        """The fixed evaluation set (prompts x images_per_prompt, fixed seeds) with current weights."""
        cfg = self.config
        prompts = [p for p in cfg.prompts.eval for _ in range(cfg.prompts.eval_images_per_prompt)]
        size = cfg.sampling.batch_size
        chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        jobs = [self.pool.submit(BatchJob(worker=k % len(self.samplers), prompts=chunk, gamma=0.0,
                                          seed=eval_seed(cfg.prompts.eval_seed, chunk=k)))
                for k, chunk in enumerate(chunks)]
        scores = self.complete(EpochBatch(jobs=jobs, submitted_at=time.perf_counter()))
        images = np.concatenate([b.images for b in self._get([job.images for job in jobs])])
        total = np.concatenate([s.total for s in scores])
        components = {
            f"eval_{name}": float(np.nanmean(np.concatenate([s.components[name] for s in scores])))
            for name in scores[0].components
        }
        captions = [c for s in scores for c in (s.captions or [])] or None
        return EvalResult(float(np.nanmean(total)), images, components, prompts, total, captions)

    def save_eval(self, result: EvalResult, epoch: int) -> None:
        """Grid PNG, plus prompts/scores/captions as JSON, under samples/."""
        stem = self.run_dir / "samples" / f"eval_epoch{epoch:04d}"
        save_grid(result.images, stem.with_suffix(".png"))
        items = [{"prompt": p, "reward": None if not np.isfinite(r) else float(r)}
                 for p, r in zip(result.prompts, result.scores, strict=True)]
        for item, caption in zip(items, result.captions or [], strict=False):
            item["caption"] = caption
        stem.with_suffix(".json").write_text(json.dumps(items, indent=1))

    def export_lora(self) -> Path:
        files = self._get(self.learner.export_lora.remote())
        out = self.run_dir / "lora"
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
        return out

    # ----- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """An atomic checkpoint of the completed epochs (cluster/checkpoint.py)."""
        from actors.rng import rng_state

        cfg = self.config
        epoch = self.completed_epochs
        learner_ref, lora_ref = self.learner.state_dict.remote(), self.learner.export_lora.remote()
        learner_state, lora_files = self._get([learner_ref, lora_ref])
        info = {
            "policy_version": int(learner_state["version"]),
            "bpt_stage": self.schedule.stage(epoch) if self.schedule is not None else None,
            "counters": self.counters(),
        }
        self.last_checkpoint = write_checkpoint(
            self.run_dir, epoch=epoch, learner_state=learner_state, lora_files=lora_files,
            driver_state={"rng": rng_state(), "counters": self.counters()}, metrics=self.rows[:epoch],
            config=cfg.to_dict(), info=info, keep_last=cfg.checkpoint.keep_last)
        return self.last_checkpoint

    def restore(self, checkpoint: Checkpoint) -> None:
        """Puts the learner, the counters, the metric rows and the driver's RNG where the checkpoint was."""
        from actors.rng import set_rng_state

        version = self._get(self.learner.load_state_dict.remote(state=self.ray.put(checkpoint.learner_state)))
        if version != checkpoint.meta["policy_version"]:
            raise RuntimeError(f"restored policy version {version} != checkpoint's {checkpoint.meta['policy_version']}")
        set_rng_state(checkpoint.driver_state["rng"])
        counters = checkpoint.driver_state.get("counters", {})
        self.pool.counters.restarts = int(counters.get("sampler_restarts_total", 0))
        self.pool.counters.resampled_batches = int(counters.get("resampled_batches_total", 0))
        self.rows = [dict(row) for row in checkpoint.metrics]
        self.completed_epochs = checkpoint.epoch
        self.version = version
        self.last_checkpoint = checkpoint.path

    def counters(self) -> dict:
        return {"sampler_restarts_total": self.pool.counters.restarts,
                "resampled_batches_total": self.pool.counters.resampled_batches,
                "stale_refused_total": int(sum(r.get("stale_refused", 0) or 0 for r in self.rows)),
                "nonfinite_rewards_total": int(sum(r.get("nonfinite_rewards", 0) or 0 for r in self.rows)),
                "nonfinite_trajectories_total": int(sum(r.get("nonfinite_trajectories", 0) or 0 for r in self.rows)),
                "skipped_steps_total": int(sum(r.get("skipped_steps", 0) or 0 for r in self.rows))}

    def _checkpoint_due(self) -> bool:
        every = self.config.checkpoint.every_epochs
        return bool(every) and self.completed_epochs % every == 0

    def _checkpoint_before_stopping(self, log) -> str:
        """Writes a checkpoint of the completed epochs (unless one exists) and says where it is."""
        if self.completed_epochs == 0:
            return "no checkpoint (no epoch was completed)"
        if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.completed_epochs:06d}"):
            try:
                self.save_checkpoint()
            except Exception as err:  # noqa: BLE001 - report the original failure, not this one
                log(f"gard: could not write a checkpoint before stopping: {err}")
                return "no checkpoint could be written"
        return f"checkpoint {self.last_checkpoint} (epoch {self.completed_epochs})"

    # ----- the loop -----------------------------------------------------------------------
    def run(self, *, log=print, resume: Checkpoint | None = None, stop: StopRequest | None = None) -> list[dict]:
        """Runs epochs ``resume.epoch`` (0 without a checkpoint) to ``config.epochs``."""
        cfg = self.config
        stop = stop or StopRequest()
        self.pool.log = log
        writer = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard)
        if resume is not None:
            self.restore(resume)
            writer.rows = [dict(row) for row in self.rows]
        first = self.completed_epochs
        progress = _progress(cfg.epochs, enabled=cfg.logging.progress)
        progress.update(first)
        try:
            self.broadcast()
            eval_mean = None
            if first == 0:
                initial = self.evaluate()
                self.save_eval(initial, 0)
                eval_mean = initial.mean
                log(f"eval before training: reward {eval_mean:.4f}")
            else:
                log(f"resumed from {resume.path} at epoch {first} (policy version {resume.meta['policy_version']})")
            try:
                self._epochs(first, writer=writer, progress=progress, log=log, stop=stop, eval_mean=eval_mean)
            except (RewardDownError, SamplerFailedError, TrainingStalledError) as err:
                where = self._checkpoint_before_stopping(log)
                raise type(err)(f"{err}. The run stopped after {where}; fix the cause and continue with "
                                f"--resume auto") from err
            if stop.requested and self.completed_epochs < cfg.epochs:
                where = self._checkpoint_before_stopping(log)
                raise RunInterrupted(
                    f"stopped by {stop.reason} after epoch {self.completed_epochs} of {cfg.epochs}; {where}; "
                    f"continue with: gard train CONFIG --output-dir {self.run_dir} --resume auto",
                    exit_code=EXIT_CODES.get(stop.reason, 130))
            self._checkpoint_before_stopping(log)  # the final state, so the run can be extended
            lora_dir = self.export_lora()
            log(f"final adapter: {lora_dir}")
        finally:
            progress.close()
            writer.close()
        return self.rows

    def _epochs(self, first: int, *, writer, progress, log, stop: StopRequest, eval_mean) -> None:
        cfg = self.config
        pending = self.launch(first)
        last_end = time.perf_counter()
        for epoch in range(first, cfg.epochs):
            current = pending
            if cfg.cluster.max_staleness >= 1 and epoch + 1 < cfg.epochs:
                pending = self.launch(epoch + 1)  # samplers keep the current adapter while we train
            wait_start = time.perf_counter()
            restarts_before = self.pool.counters.restarts
            resampled_before = self.pool.counters.resampled_batches
            try:  # every batch of the epoch, lost ones sampled again; a stop abandons the epoch here
                scores = self.complete(current, abandon=lambda: stop.requested)
            except StepAbandoned:
                log(f"gard: abandoned epoch {epoch} before its update (stop requested)")
                return
            fusion = None
            if cfg.dpo.pair_source == "dfusion":  # the rewards pick each prompt's worst and best sample
                fusion = self.launch_dfusion(current, scores, epoch)
            version_before = self.version
            stats = self._get(self.learner.update.remote(
                trajectories=current.trajectories, rewards=current.scores, epoch=epoch,
                pairs=None if fusion is None else fusion.pairs))
            self.completed_epochs = epoch + 1
            self.version = int(stats["version"])
            # Nothing is published when every step was skipped: the samplers already hold this adapter.
            # (With max_staleness 1 the broadcast also waits for epoch k+1's sampling.)
            applied = self.broadcast() if self.version != version_before else []
            self._check_training(stats, epoch=epoch, log=log)
            if cfg.cluster.max_staleness == 0 and epoch + 1 < cfg.epochs and not stop.requested:
                pending = self.launch(epoch + 1)
            row = self._epoch_row(epoch, scores, stats, applied)
            row["sampler_restarts"] = self.pool.counters.restarts - restarts_before
            row["resampled_batches"] = self.pool.counters.resampled_batches - resampled_before
            row["sampler_restarts_total"] = self.pool.counters.restarts
            if fusion is not None:
                row.update(self.dfusion_row(fusion))
            self._log_captions(epoch, scores)
            row["driver_wait_s"] = time.perf_counter() - wait_start
            last_eval = epoch + 1 == cfg.epochs
            every = cfg.logging.eval_every
            if last_eval or (every and (epoch + 1) % every == 0):
                result = self.evaluate()
                row["eval_reward_mean"] = result.mean
                row.update(result.components)
                self.save_eval(result, epoch + 1)
            if epoch == 0 and eval_mean is not None:
                row["eval_reward_mean_initial"] = eval_mean
            now = time.perf_counter()
            row["epoch_s"] = now - last_end
            row["samples_per_s"] = row["n_samples_scored"] / row["epoch_s"]
            last_end = now
            writer.write(row)
            self.rows.append(writer.rows[-1])
            if self._checkpoint_due():
                self.save_checkpoint()
            progress.update(1)
            progress.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row.get('kl', 0):.2e}")
            log(_summary_line(row))
            limit = cfg.train.max_skipped_steps
            if stats.get("skipped_steps_in_row", 0) >= limit:
                raise TrainingStalledError(
                    f"{int(stats['skipped_steps_in_row'])} optimizer steps in a row were skipped because the "
                    f"loss, the gradient norm or the whole batch was not finite (train.max_skipped_steps = {limit}; "
                    f"last epoch: {int(stats.get('nonfinite_trajectories', 0))} non-finite trajectories, "
                    f"{int(stats.get('nonfinite_rewards', 0))} non-finite rewards, loss scale "
                    f"{stats.get('loss_scale', 1.0):g}). Lower train.learning_rate, use train.mixed_precision=bf16 "
                    f"or policy.dtype=float32/bfloat16 if the samplers overflow in float16")
            if stop.requested:
                return

    def _check_training(self, stats: dict, *, epoch: int, log) -> None:
        """Warns when the first-step importance ratio says sampler and learner disagree (learner/precision.py)."""
        from learner.precision import ratio_warning

        if "onpolicy_ratio_dev" not in stats:
            return
        deviation = stats["onpolicy_ratio_dev"]
        if deviation != deviation and self.config.cluster.max_staleness:  # NaN: the sampling adapter is not held
            return
        message = ratio_warning(deviation=deviation, threshold=self.config.train.clip_range,
                                sampler_dtype=self.config.policy.dtype, mixed_precision=self.config.train.mixed_precision)
        if message:
            log(f"gard: warning (epoch {epoch}): {message}")

    def _log_captions(self, epoch: int, scores) -> None:
        """Captions of the first scored batch of each epoch (captioning rewards only) -> captions.jsonl."""
        first = scores[0]
        if not first.captions:
            return
        with (self.run_dir / "captions.jsonl").open("a") as f:
            for caption, reward in zip(first.captions, first.total, strict=False):
                f.write(json.dumps({"epoch": epoch, "caption": caption,
                                    "reward": float(reward) if np.isfinite(reward) else None}) + "\n")

    def _epoch_row(self, epoch, scores, stats, applied) -> dict:
        total = np.concatenate([s.total for s in scores])
        finite = total[np.isfinite(total)]
        row = {
            "epoch": epoch,
            "policy_version": int(stats.get("version", epoch + 1)),
            "reward_mean": float(finite.mean()) if finite.size else float("nan"),
            "reward_std": float(finite.std()) if finite.size else float("nan"),
            "n_samples_scored": int(total.size),
            "sampled_policy_version": int(min(s.policy_version for s in scores)),
        }
        for name in scores[0].components:
            values = np.concatenate([s.components[name] for s in scores])
            row[f"reward_{name}"] = float(np.nanmean(values))
        if scores[0].volume is not None:
            row["volume_mean"] = float(np.nanmean(np.concatenate([s.volume for s in scores])))
        row["gamma"] = self.gamma(epoch)
        row["sample_s"] = float(sum(s.sample_s for s in scores)) / len(self.samplers)
        row["reward_s"] = float(sum(s.reward_wall_s for s in scores))
        for name in scores[0].reward_latency_s:
            row[f"latency_{name}_s"] = float(np.mean([s.reward_latency_s[name] for s in scores]))
        row["reward_retries"] = int(sum(sum((s.retries or {}).values()) for s in scores))
        for key in ("loss", "pg_loss", "kl", "approx_kl", "clipfrac", "ratio", "grad_norm", "beta",
                    "advantage_abs_mean", "n_pairs", "stale_refused", "nonfinite_rewards", "train_s", "wait_inputs_s",
                    "pairs_per_s", "publish_s", "n_selected", "n_dpo_pairs", "dpo_loss", "dpo_acc", "dpo_margin",
                    "onpolicy_ratio_dev", "loss_scale"):
            if key in stats:
                row[key] = stats[key]
        for key in ("nonfinite_trajectories", "optimizer_steps", "skipped_steps", "skipped_steps_in_row"):
            row[key] = int(stats.get(key, 0))
        if self.schedule is not None:
            stage = self.schedule.stage(epoch)
            row["bpt_stage"] = stage
            row["train_interval"] = list(self.schedule.interval(stage))  # [first, last) denoising-step indices
            row["branch_step"] = self.schedule.branch_step(stage) if self.config.b2.branching else None
            row.setdefault("n_selected", 0)
        # Broadcast cost: packing + hashing on the learner, then verify + copy on the slowest sampler.
        row["apply_weights_s"] = max((a["apply_s"] for a in applied), default=0.0)
        row["broadcast_s"] = (row.get("publish_s", 0.0) if applied else 0.0) + row["apply_weights_s"]
        return row


def _summary_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']:>3}", f"v{row['policy_version']}", f"reward {row['reward_mean']:.4f}"
             f" ± {row['reward_std']:.4f}", f"loss {row.get('loss', float('nan')):.3e}",
             f"kl {row.get('kl', float('nan')):.2e}", f"approx_kl {row.get('approx_kl', float('nan')):.2e}",
             f"clipfrac {row.get('clipfrac', float('nan')):.2f}", f"{row['epoch_s']:.1f}s"]
    if "eval_reward_mean" in row:
        parts.append(f"eval {row['eval_reward_mean']:.4f}")
    return "  ".join(parts)


def _progress(total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="epochs", unit="epoch", disable=not enabled, leave=True)


@contextlib.contextmanager
def ray_session(config: Config):
    """Connects to ``cluster.address`` or starts a local Ray bound to 127.0.0.1; shuts down what it started."""
    # Ray binds its ports to loopback only with this set (ENVIRONMENT.md); set before import.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    started = False
    if ray.is_initialized():
        address = "already initialized"
    elif config.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=config.cluster.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        address = config.cluster.address or os.environ["RAY_ADDRESS"]
    else:
        ray.init(
            num_cpus=config.cluster.local_num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
        started = True
        address = "local (127.0.0.1)"
    try:
        yield address
    finally:
        if started:
            ray.shutdown()


def prepare_run_dir(config: Config, output_dir: str | None, *, resume: Checkpoint | None = None) -> Path:
    """Creates the run directory; metrics.jsonl starts empty, or with the resumed checkpoint's rows."""
    run_dir = Path(output_dir or config.output_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = resume.metrics if resume is not None else []
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def find_resume_checkpoint(config: Config, *, resume: str, output_dir: str | None, log=print) -> Checkpoint | None:
    """``--resume auto``: the newest valid checkpoint of the output directory (None: start fresh);
    ``--resume PATH``: that checkpoint, or the newest one of that run directory. Refuses a checkpoint
    whose config would sample or train differently (ConfigError naming the fields)."""
    if resume == "auto":
        run_dir = output_dir or config.output_dir
        if not run_dir:
            raise ConfigError("--resume auto looks for checkpoints in the run directory, but none is set: pass "
                              "--output-dir DIR (or set output_dir) to the directory of the run to continue")
        path = latest_checkpoint(Path(run_dir))
        if path is None:
            log(f"gard: no checkpoint in {Path(run_dir) / 'checkpoints'}: starting fresh")
            return None
    else:
        path = Path(resume)
        if (path / "checkpoints").is_dir():  # a run directory: its newest checkpoint
            path = latest_checkpoint(path) or path / "checkpoints"
    checkpoint = load_checkpoint(path)
    check_compatible(checkpoint, config.to_dict())
    return checkpoint


def train(config: Config, *, output_dir: str | None = None, resume: str | None = None,
          stop: StopRequest | None = None, log=print) -> Path:
    """Runs a whole training job (or continues one: ``resume`` = "auto" or a path); returns the run
    directory. SIGINT/SIGTERM (or ``stop.request``) end it after the current epoch with a checkpoint,
    raising RunInterrupted."""
    checkpoint = None
    if resume:
        checkpoint = find_resume_checkpoint(config, resume=resume, output_dir=output_dir, log=log)
        if checkpoint is not None and output_dir is None and config.output_dir is None:
            output_dir = str(checkpoint.path.parent.parent)  # --resume PATH continues in that run's directory
    if checkpoint is not None and checkpoint.epoch >= config.epochs:
        run_dir = Path(output_dir or config.output_dir)
        log(f"gard: {checkpoint.path} already has {checkpoint.epoch} epochs >= epochs={config.epochs}; "
            f"nothing to train (pass epochs=N with N > {checkpoint.epoch} to continue)")
        return run_dir
    from cluster.preflight import check_scheduler

    check_scheduler(config, pretrained=resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir))
    run_dir = prepare_run_dir(config, output_dir, resume=checkpoint)
    stop = stop or StopRequest()
    with ray_session(config) as address, stop_on_signals(stop, log=log):
        log(banner(config, run_dir, address))
        driver = Driver(config, run_dir=run_dir)
        try:
            driver.run(log=log, resume=checkpoint, stop=stop)
        finally:
            driver.shutdown()
    return run_dir
