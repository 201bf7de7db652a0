"""The driver: wires samplers, reward stage and learner on Ray and runs the epochs.

It moves references only: trajectories go sampler -> learner and images sampler -> reward stage as
ObjectRefs; the driver reads back scalar metrics (and the small evaluation images for grids).

Pipelining: with ``cluster.max_staleness = 0`` each epoch samples with the newest adapter, then
trains (synchronous DDPO). With 1, sampling of epoch k+1 is queued before the update on epoch k, so
samplers work while the learner trains; epoch k+1 is then one version behind, which PPO's ratio
against the recorded log-probs accounts for.

Long runs: a checkpoint every ``checkpoint.every_epochs`` epochs, at the end and on a graceful stop
(cluster/checkpoint.py); ``resume`` continues from one. With ``max_staleness: 0`` a resumed run is
bit-for-bit the uninterrupted one on CPU: the learner's state is restored exactly and every batch's
prompts and noise derive from (seed, epoch, worker, batch). (With 1, the epoch after the checkpoint
is sampled with the newest adapter instead of the one before it.) Dead samplers are restarted and
their batches sampled again (cluster/samplers.py); a reward that stays down, a sampler that keeps
dying or a learner that keeps skipping non-finite steps stops the run with a checkpoint written first.

Beside the loop: ``specs.py`` (actor specs, banner), ``eval_run.py`` (evaluations, hacking guard), ``eval_summary.py``
(the gold before and after), ``dfusion_pairs.py``, ``epoch_metrics.py``, ``run.py`` (Ray session, ``train()``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from actors.seeding import batch_prompts, batch_seed
from actors.tiny import resolve_pretrained
from cluster.adapter_record import record_files
from cluster.checkpoint import Checkpoint, write_checkpoint
from cluster.config import Config
from cluster.dfusion_pairs import DFusionLaunch, dfusion_row, launch_dfusion
from cluster.epoch_metrics import epoch_row, log_captions, progress_bar, report_epoch, run_counters
from cluster.errors import (
    RewardDownError,
    RewardHackingError,
    RewardStageFailedError,
    reward_failure,
)
from cluster.eval_run import Evaluator
from cluster.eval_summary import summarise_run
from cluster.evaluation import save_eval
from cluster.learner_group import connect_learners, start_learner_actors
from cluster.learner_handle import LearnerFailedError
from cluster.metrics import MetricsWriteError, MetricsWriter, open_writer
from cluster.placement_groups import create_placement, locate, placement_report
from cluster.samplers import (
    BatchJob,
    BranchPlan,
    EpochBatch,
    SamplerFailedError,
    SamplerPool,
    StepAbandoned,
    start_sampler_actors,
)
from cluster.specs import (
    bpt_schedule,
    evaluation_specs,
    resolve_reward_specs,
    reward_stage_resources,
    start_reward_services,
)
from cluster.stop import EXIT_CODES, RunInterrupted, StopRequest
from learner.distributed import LearnerDivergedError
from learner.precision import TrainingStalledError, ratio_check, stalled_error
from learner.schedules import linear_ramp


class Driver:
    """Owns the Ray actors of one run and the epoch loop."""

    def __init__(self, config: Config, *, run_dir: Path):
        import ray

        self.ray, self.config, self.run_dir = ray, config, run_dir
        self.timeout = config.cluster.call_timeout_s
        self.started_apps: list[str] = []
        # The layout's placement groups, reserved before any actor starts (cluster/placement_groups.py);
        # removed by shutdown(), also when starting the actors fails.
        self.placement = create_placement(config)
        try:
            self._start(config)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, config: Config) -> None:
        ray, c = self.ray, config.cluster
        pretrained = self.pretrained = resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir)
        specs, weights = resolve_reward_specs(config.rewards, cache_dir=config.cache_dir)
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(c.torch_threads)}}
        from rewards.stage import RewardStage

        self.samplers = start_sampler_actors(config, pretrained=pretrained, env=env, placement=self.placement)
        # Restarted by Ray when they die; the handle puts them back at the state after the last update.
        learners = start_learner_actors(config, pretrained=pretrained, env=env, placement=self.placement)
        stage_cpus, stage_gpus = reward_stage_resources(config)
        eval_specs, recall = evaluation_specs(config, specs)

        def start_reward_stage(service):
            # With services the stage mostly waits on handles, so it takes several batches at once. Scoring
            # is a pure function of its inputs, so Ray may rerun a call on the restarted stage when it dies.
            return ray.remote(
                num_cpus=stage_cpus, num_gpus=stage_gpus, max_concurrency=1 if service is None else 8,
                runtime_env=env, max_restarts=-1, max_task_retries=c.max_actor_failures - 1,
            )(RewardStage).remote(specs=specs, weights=weights, volume_modalities=tuple(config.volume.modalities),
                                  service=service, eval_specs=eval_specs, recall=recall)

        serve = config.reward_service.backend == "serve"
        # The local stage loads its reward models while the learner loads the policy; the Serve apps are
        # deployed only once the learner has started (nothing to remove if it refuses its adapter).
        self.reward_stage = None if serve else start_reward_stage(None)
        # The learner refuses adapters that bind to nothing: say so before anything else runs. Several
        # ranks form their process group here (cluster/learner_group.py).
        self.learner = connect_learners(learners, config=config, pretrained=pretrained)
        self.schedule = bpt_schedule(config)
        if serve:  # deploys the reward apps not running yet
            service, self.started_apps = start_reward_services(config, specs)
            self.reward_stage = start_reward_stage(service)
        self.weights_ref = None
        self.pool = SamplerPool(samplers=self.samplers, reward_stage=self.reward_stage, timeout_s=self.timeout,
                                max_failures=c.max_sampler_failures)
        self.evaluator = Evaluator(config, pool=self.pool, reward_stage=self.reward_stage, complete=self.complete,
                                   get=self._get)
        self.rows: list[dict] = []  # metric rows of the completed epochs (restored on resume)
        self.version = 0  # the learner's policy version after the last update
        self.completed_epochs = 0  # epochs whose update the learner has applied
        self.last_checkpoint: Path | None = None

    def shutdown(self) -> None:
        """Removes the reward applications this run started (unless reward_service.keep_running), ends the
        reward stage, then removes the placement groups (and the samplers and learner ranks in them)."""
        if self.started_apps and not self.config.reward_service.keep_running:
            from rewards.serve import remove_rewards

            remove_rewards(self.started_apps)
            self.started_apps = []
        # The stage runs outside the placement groups: end it here so that its CPUs are free for the next
        # run in this Ray session (a resume in-process, `gard eval` after `gard train`) at once, not when
        # Python collects its handle.
        stage, self.reward_stage = getattr(self, "reward_stage", None), None
        if stage is not None:
            try:
                self.ray.kill(stage, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead, or Ray already gone
                pass
        self.placement.remove()

    def placement_report(self) -> str:
        """Where every sampler, learner rank and the reward stage runs (node, GPUs), for the banner."""
        actors = {f"sampler {i}": s for i, s in enumerate(self.samplers)}
        actors.update({f"learner rank {r}": a for r, a in enumerate(self.learner.actors)})
        return placement_report(self.placement.plan, locate(actors, reward_stage=self.reward_stage,
                                                            timeout_s=self.timeout))

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
        self.weights_ref = self.learner.publish()
        return self.pool.set_weights(self.weights_ref)

    def launch(self, epoch: int) -> EpochBatch:
        """Queues one epoch of sampling and its reward calls (rewards run while sampling continues)."""
        cfg, s = self.config, self.config.sampling
        batch_prompt_lists = []
        gamma = self.gamma(epoch)
        branches = None if self.schedule is None or not cfg.b2.branching else BranchPlan(
            n_branch=cfg.b2.n_branch, branch_step=self.schedule.branch_step(self.schedule.stage(epoch)),
            share_start=cfg.b2.share_start)
        jobs = []
        for batch in range(s.batches_per_sampler):
            for worker in range(len(self.samplers)):
                prompts = batch_prompts(cfg.prompts.train, size=s.batch_size, seed=cfg.seed, epoch=epoch,
                                        worker=worker, batch=batch)
                seed = batch_seed(cfg.seed, epoch=epoch, worker=worker, batch=batch)
                job = BatchJob(worker=worker, prompts=prompts, seed=seed, gamma=gamma, branches=branches)
                jobs.append(self.pool.submit(job))
                # the prompt of every sample, group-major for branch rollouts (D-Fusion pairs by prompt)
                batch_prompt_lists.append([p for p in prompts for _ in range(branches.n_branch if branches else 1)])
        return EpochBatch(jobs=jobs, submitted_at=time.perf_counter(), prompts=batch_prompt_lists)

    def complete(self, batch: EpochBatch, *, abandon=lambda: False) -> list:
        """Every batch's scores; batches lost with a dead sampler are sampled again first.

        A reward that stayed down becomes RewardDownError, a reward stage that kept dying
        RewardStageFailedError (``cluster/errors.py``).
        """
        try:
            return self.pool.complete(batch.jobs, abandon=abandon)
        except (self.ray.exceptions.RayTaskError, self.ray.exceptions.RayActorError) as err:
            failure = reward_failure(err, self.reward_stage, limit=self.config.cluster.max_actor_failures)
            if failure is None:
                raise
            raise failure from err

    def launch_dfusion(self, current: EpochBatch, scores: list, epoch: int) -> DFusionLaunch:
        return launch_dfusion(self.config, current, scores, samplers=self.samplers, reward_stage=self.reward_stage,
                              gamma=self.gamma(epoch))

    def dfusion_row(self, fusion: DFusionLaunch) -> dict:
        fused = [s.total for s in self._get(fusion.scores)]
        return dfusion_row(fusion, stats=self._get(fusion.stats), fused=np.concatenate(fused) if fused else None)

    def lora_record(self, *, epoch: int, policy_version: int) -> dict[str, bytes]:
        """``gard_adapter.json`` for a ``lora/`` directory: the base model and how far it was trained."""
        return record_files(self.config, pretrained=self.pretrained,
                            progress={"epoch": epoch, "policy_version": policy_version})

    def export_lora(self, out: Path | None = None) -> Path:
        files = {**self.learner.export_lora(), **self.lora_record(epoch=self.completed_epochs, policy_version=self.version)}
        out = out or self.run_dir / "lora"
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
        learner_state, lora_files = self.learner.state(), self.learner.export_lora()
        lora_files.update(self.lora_record(epoch=epoch, policy_version=int(learner_state["version"])))
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

        version = self.learner.load_state(checkpoint.learner_state)
        if version != checkpoint.meta["policy_version"]:
            raise RuntimeError(f"restored policy version {version} != checkpoint's {checkpoint.meta['policy_version']}")
        set_rng_state(checkpoint.driver_state["rng"])
        counters = checkpoint.driver_state.get("counters", {})
        self.pool.counters.restarts = int(counters.get("sampler_restarts_total", 0))
        self.pool.counters.resampled_batches = int(counters.get("resampled_batches_total", 0))
        self.rows = [dict(row) for row in checkpoint.metrics]
        self.evaluator.restore(self.rows)
        self.completed_epochs = checkpoint.epoch
        self.version = version
        self.last_checkpoint = checkpoint.path

    def counters(self) -> dict:
        return run_counters(self.rows, sampler_restarts=self.pool.counters.restarts,
                            resampled_batches=self.pool.counters.resampled_batches)

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
    def run(self, *, log=print, resume: Checkpoint | None = None, stop: StopRequest | None = None,
            on_epoch_end=None) -> list[dict]:
        """Runs epochs ``resume.epoch`` (0 without a checkpoint) to ``config.epochs``; ``on_epoch_end(epoch,
        row)`` is called after each epoch's row is written (and, when pipelining, the next epoch queued)."""
        cfg = self.config
        stop = stop or StopRequest()
        self.pool.log = self.learner.log = log
        writer = open_writer(cfg, run_dir=self.run_dir, resuming=resume is not None)
        if resume is not None:
            self.restore(resume)
            writer.rows = [dict(row) for row in self.rows]
        first = self.completed_epochs
        progress = progress_bar(cfg.epochs, enabled=cfg.logging.progress)
        progress.update(first)
        try:
            self.broadcast()
            if first == 0:
                initial = self.evaluator.initial()
                save_eval(initial, run_dir=self.run_dir, updates=0, writer=writer)
                log(f"eval before training: reward {initial.mean:.4f}")
            else:
                log(f"resumed from {resume.path} at epoch {first} (policy version {resume.meta['policy_version']})")
            try:
                self._epochs(first, writer=writer, progress=progress, log=log, stop=stop, on_epoch_end=on_epoch_end)
            except (RewardDownError, SamplerFailedError, TrainingStalledError, LearnerFailedError,
                    RewardStageFailedError, MetricsWriteError, RewardHackingError, LearnerDivergedError) as err:
                self.learner.max_failures += 1  # one more restore, to take the final checkpoint
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
            for line in summarise_run(self.run_dir, gold=cfg.evaluation.gold) if cfg.evaluation.gold else []:
                log(line)  # the gold reward before and after training, paired image by image
        finally:
            progress.close()
            writer.close()
        return self.rows

    def _epochs(self, first: int, *, writer: MetricsWriter, progress, log, stop: StopRequest, on_epoch_end) -> None:
        cfg = self.config
        pending = self.launch(first)
        last_end = time.perf_counter()
        for epoch in range(first, cfg.epochs):
            current = pending
            if cfg.cluster.max_staleness >= 1 and epoch + 1 < cfg.epochs:
                pending = self.launch(epoch + 1)  # samplers keep the current adapter while we train
            wait_start = time.perf_counter()
            restarts_before, resampled_before = self.pool.counters.restarts, self.pool.counters.resampled_batches
            try:  # every batch of the epoch, lost ones sampled again; a stop abandons the epoch here
                scores = self.complete(current, abandon=lambda: stop.requested)
            except StepAbandoned:
                log(f"gard: abandoned epoch {epoch} before its update (stop requested)")
                return
            fusion = None
            if cfg.dpo.pair_source == "dfusion":  # the rewards pick each prompt's worst and best sample
                fusion = self.launch_dfusion(current, scores, epoch)
            version_before = self.version
            stats = self.learner.update(trajectories=current.trajectories, rewards=current.scores, epoch=epoch,
                                        pairs=None if fusion is None else fusion.pairs)
            self.completed_epochs = epoch + 1
            self.version = int(stats["train/policy_version"])
            # Nothing is published when every step was skipped: the samplers already hold this adapter.
            # (With max_staleness 1 the broadcast also waits for epoch k+1's sampling.)
            applied = self.broadcast() if self.version != version_before else []
            if (warning := ratio_check(stats, config=cfg)) is not None:
                log(f"gard: warning (epoch {epoch}): {warning}")
            if cfg.cluster.max_staleness == 0 and epoch + 1 < cfg.epochs and not stop.requested:
                pending = self.launch(epoch + 1)
            row = self._epoch_row(epoch, scores, stats, applied)
            row.update({"sampler/restarts": self.pool.counters.restarts - restarts_before,
                        "sampler/resampled_batches": self.pool.counters.resampled_batches - resampled_before,
                        "sampler/restarts_total": self.pool.counters.restarts,
                        "time/driver_wait_s": time.perf_counter() - wait_start})
            if fusion is not None:
                row.update(self.dfusion_row(fusion))
            log_captions(self.run_dir, epoch, scores)
            evaluation, alarm = self.evaluator.after_epoch(row, epoch=epoch)
            if alarm is not None:
                log(f"gard: warning (epoch {epoch}): {alarm}")
            now = time.perf_counter()
            row["time/epoch_s"], row["time/samples_per_s"] = now - last_end, row["reward/n_scored"] / (now - last_end)
            last_end = now
            writer.write(row)
            self.rows.append(writer.rows[-1])
            if evaluation is not None:  # after the row: W&B ignores a step lower than one it has logged
                self.evaluator.record(evaluation, run_dir=self.run_dir, updates=epoch + 1, writer=writer,
                                      export=self.export_lora)
            if self._checkpoint_due():
                self.save_checkpoint()
            report_epoch(progress, row, log=log)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
            if (stalled := stalled_error(stats, limit=cfg.train.max_skipped_steps)) is not None:
                raise stalled
            if alarm is not None and cfg.evaluation.guard.action == "stop":
                raise RewardHackingError(alarm)
            if stop.requested:
                return

    def _epoch_row(self, epoch, scores, stats, applied) -> dict:
        return epoch_row(epoch, scores=scores, stats=stats, applied=applied, config=self.config,
                         schedule=self.schedule, num_samplers=len(self.samplers), gamma=self.gamma(epoch))
