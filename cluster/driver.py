"""The driver: wires samplers, reward stage and learner on Ray and runs the epochs.

It moves references only: trajectories go sampler -> learner and images sampler -> reward stage as
ObjectRefs; the driver reads back scalar metrics (and the small evaluation images for grids).

Pipelining (DESIGN.md §5): with ``cluster.max_staleness = 0`` each epoch samples with the newest
adapter, then trains (synchronous DDPO). With 1, sampling of epoch k+1 is queued before the update
on epoch k, so samplers work while the learner trains; epoch k+1 is then one version behind, which
PPO's ratio against the recorded log-probs accounts for.
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
from cluster.config import Config
from cluster.metrics import MetricsWriter, save_grid
from cluster.seeding import batch_prompts, batch_seed, eval_seed
from learner.bpt import BptSchedule
from learner.learner import LearnerSpec
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
    """References to one epoch's sampler batches, in submission order."""

    trajectories: list  # ObjectRef[Trajectory]
    images: list  # ObjectRef[ImageBatch]
    scores: list  # ObjectRef[ScoredImages]
    submitted_at: float
    prompts: list = dataclasses.field(default_factory=list)  # the prompt of every sample, per batch


@dataclass
class DFusionLaunch:
    """References to one epoch's D-Fusion calls (``dpo.pair_source = dfusion``), in pair order."""

    pairs: list  # ObjectRef[TrajectoryPairs]: chosen = fused, rejected = the prompt's worst sample
    scores: list  # ObjectRef[ScoredImages] of the fused images (monitoring only, see launch_dfusion)
    stats: list  # ObjectRef[dict]: mask_fraction per pair, unet_calls, dfusion_s
    poor_rewards: np.ndarray  # float32 [P]
    good_rewards: np.ndarray  # float32 [P]


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
        f" {t.inner_epochs} inner epoch(s)",
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
        from actors.sampler import Sampler
        from cluster.stages import RewardStage
        from learner.learner import Learner

        sampler_cls = ray.remote(num_cpus=c.sampler_num_cpus, num_gpus=c.sampler_num_gpus, runtime_env=env)(Sampler)
        self.samplers = [
            sampler_cls.remote(
                spec=policy_spec(config, pretrained=pretrained, num_gpus=c.sampler_num_gpus),
                worker_index=i,
                torch_threads=c.torch_threads,
            )
            for i in range(c.num_samplers)
        ]
        self.learner = ray.remote(num_cpus=c.learner_num_cpus, num_gpus=c.learner_num_gpus, runtime_env=env)(
            Learner
        ).remote(
            policy_spec=policy_spec(config, pretrained=pretrained, num_gpus=c.learner_num_gpus),
            spec=learner_spec(config),
            torch_threads=c.torch_threads,
            init_adapter=config.policy.init_adapter,
        )
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
                "apps": deployed.apps}

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

    def broadcast(self) -> list:
        """Publishes the learner's adapter once (one ObjectRef) and queues it on every sampler.

        Returns the samplers' acknowledgement refs ({"version", "apply_s"}).
        """
        self.weights_ref = self.learner.publish.remote()
        return [s.set_weights.remote(packet=self.weights_ref) for s in self.samplers]

    def launch(self, epoch: int) -> EpochBatch:
        """Queues one epoch of sampling and its reward calls (rewards run while sampling continues)."""
        cfg, s = self.config, self.config.sampling
        trajs, images, scores, batch_prompt_lists = [], [], [], []
        gamma = self.gamma(epoch)
        for batch in range(s.batches_per_sampler):
            for worker, sampler in enumerate(self.samplers):
                prompts = batch_prompts(
                    cfg.prompts.train, size=s.batch_size, seed=cfg.seed, epoch=epoch, worker=worker, batch=batch
                )
                seed = batch_seed(cfg.seed, epoch=epoch, worker=worker, batch=batch)
                if self.schedule is not None and cfg.b2.branching:
                    branch_step = self.schedule.branch_step(self.schedule.stage(epoch))
                    traj_ref, image_ref = sampler.sample_branches.options(num_returns=2).remote(
                        prompts=prompts, seed=seed, n_branch=cfg.b2.n_branch, branch_step=branch_step)
                    batch_prompt_lists.append([p for p in prompts for _ in range(cfg.b2.n_branch)])  # group-major
                else:
                    traj_ref, image_ref = sampler.sample.options(num_returns=2).remote(prompts=prompts, seed=seed)
                    batch_prompt_lists.append(list(prompts))
                trajs.append(traj_ref)
                images.append(image_ref)
                scores.append(self.reward_stage.score.remote(batch=image_ref, gamma=gamma))
        return EpochBatch(trajectories=trajs, images=images, scores=scores, submitted_at=time.perf_counter(),
                          prompts=batch_prompt_lists)

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
                pairs_ref, images_ref, stats_ref = self.samplers[k].dfusion.options(num_returns=3).remote(
                    sources=[current.trajectories[b] for b in used],
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
        image_refs, score_refs = [], []
        for k, chunk in enumerate(chunks):
            sampler = self.samplers[k % len(self.samplers)]
            _, image_ref = sampler.sample.options(num_returns=2).remote(
                prompts=chunk, seed=eval_seed(cfg.prompts.eval_seed, chunk=k)
            )
            image_refs.append(image_ref)
            score_refs.append(self.reward_stage.score.remote(batch=image_ref, gamma=0.0))
        scores = self._get(score_refs)
        images = np.concatenate([b.images for b in self._get(image_refs)])
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

    # ----- the loop -----------------------------------------------------------------------
    def run(self, *, log=print) -> list[dict]:
        cfg = self.config
        writer = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard)
        progress = _progress(cfg.epochs, enabled=cfg.logging.progress)
        rows = []
        try:
            self._get(self.broadcast())
            initial = self.evaluate()
            self.save_eval(initial, 0)
            eval_mean = initial.mean
            log(f"eval before training: reward {eval_mean:.4f}")
            pending = self.launch(0)
            last_end = time.perf_counter()
            for epoch in range(cfg.epochs):
                current = pending
                if cfg.cluster.max_staleness >= 1 and epoch + 1 < cfg.epochs:
                    pending = self.launch(epoch + 1)  # samplers keep the current adapter while we train
                fusion = None
                if cfg.dpo.pair_source == "dfusion":  # the rewards pick each prompt's worst and best sample
                    fusion = self.launch_dfusion(current, self._get(current.scores), epoch)
                update_ref = self.learner.update.remote(
                    trajectories=current.trajectories, rewards=current.scores, epoch=epoch,
                    pairs=None if fusion is None else fusion.pairs,
                )
                wait_start = time.perf_counter()
                scores = self._get(current.scores)
                stats = self._get(update_ref)
                acks = self.broadcast()
                applied = self._get(acks)  # with max_staleness 1 this also waits for epoch k+1's sampling
                if cfg.cluster.max_staleness == 0 and epoch + 1 < cfg.epochs:
                    pending = self.launch(epoch + 1)
                row = self._epoch_row(epoch, scores, stats, applied)
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
                if epoch == 0:
                    row["eval_reward_mean_initial"] = eval_mean
                now = time.perf_counter()
                row["epoch_s"] = now - last_end
                row["samples_per_s"] = row["n_samples_scored"] / row["epoch_s"]
                last_end = now
                writer.write(row)
                rows.append(row)
                progress.update(1)
                progress.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row.get('kl', 0):.2e}")
                log(_summary_line(row))
            lora_dir = self.export_lora()
            log(f"final adapter: {lora_dir}")
        finally:
            progress.close()
            writer.close()
        return rows

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
                    "pairs_per_s", "publish_s", "n_selected", "n_dpo_pairs", "dpo_loss", "dpo_acc", "dpo_margin"):
            if key in stats:
                row[key] = stats[key]
        if self.schedule is not None:
            stage = self.schedule.stage(epoch)
            row["bpt_stage"] = stage
            row["train_interval"] = list(self.schedule.interval(stage))  # [first, last) denoising-step indices
            row["branch_step"] = self.schedule.branch_step(stage) if self.config.b2.branching else None
            row.setdefault("n_selected", 0)
        # Broadcast cost: packing + hashing on the learner, then verify + copy on the slowest sampler.
        row["apply_weights_s"] = max(a["apply_s"] for a in applied)
        row["broadcast_s"] = row.get("publish_s", 0.0) + row["apply_weights_s"]
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


def prepare_run_dir(config: Config, output_dir: str | None) -> Path:
    run_dir = Path(output_dir or config.output_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def train(config: Config, *, output_dir: str | None = None, log=print) -> Path:
    """Runs a whole training job; returns the run directory."""
    run_dir = prepare_run_dir(config, output_dir)
    with ray_session(config) as address:
        log(banner(config, run_dir, address))
        driver = Driver(config, run_dir=run_dir)
        try:
            driver.run(log=log)
        finally:
            driver.shutdown()
    return run_dir
