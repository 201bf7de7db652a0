"""The sampler actors of a run and what happens when one dies.

Samplers are Ray actors with unlimited restarts. A batch is a ``BatchJob`` (worker, prompts, seed:
everything needed to sample it again), submitted as sample -> score. When a sampler dies, every
batch it had in flight fails with a ``RayActorError``; ``SamplerPool.complete`` notices it on that
batch's score, re-sends the newest adapter to the restarted actor, and submits the same job again.
Its seed comes from (seed, epoch, worker, batch), so the new batch is the one that was lost, sampled
with the adapter the epoch is meant to use: an epoch always trains on every batch exactly once.
A sampler that fails ``max_failures`` times in a row (without one good batch between) stops the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.errors import cause_chain


class SamplerFailedError(RuntimeError):
    """A sampler kept dying; names the worker and the last error."""


class StepAbandoned(Exception):
    """A stop was requested while the epoch's batches were still being sampled or scored."""


@dataclass
class BatchJob:
    """One sampler batch: what to sample (enough to sample it again) and the refs once submitted.

    branches: (n_branch, branch_step) for B² branch rollouts, None for plain sampling.
    generation: the sampler's restart count when the job was submitted (failures of an older
    generation were already handled; the job only needs resubmitting).
    """

    worker: int
    prompts: list[str]
    seed: int
    gamma: float
    branches: tuple[int, int] | None = None
    trajectory: object = None  # ObjectRef[Trajectory]
    images: object = None  # ObjectRef[ImageBatch]
    score: object = None  # ObjectRef[ScoredBatch]
    generation: int = 0


@dataclass
class EpochBatch:
    """One epoch's sampler batches (jobs hold the refs), in submission order."""

    jobs: list[BatchJob]
    submitted_at: float
    prompts: list = field(default_factory=list)  # the prompt of every sample, per batch

    @property
    def trajectories(self) -> list:  # ObjectRef[Trajectory]
        return [job.trajectory for job in self.jobs]

    @property
    def scores(self) -> list:  # ObjectRef[ScoredBatch]
        return [job.score for job in self.jobs]


@dataclass
class FailureCounters:
    """Sampler failures since the run (or the resumed run's checkpoint) started."""

    restarts: int = 0  # deaths handled (each one restarts the actor and re-sends the adapter)
    resampled_batches: int = 0  # batches lost with a dead sampler and sampled again
    recovery_s: list[float] = field(default_factory=list)  # failure noticed -> adapter re-applied


def _actor_error(err: BaseException):
    """The innermost RayActorError in ``err``'s chain: the actor that actually died (a dependent
    task's RayTaskError wraps it, and Ray's dual exception classes copy its attributes)."""
    import ray

    found = [e for e in cause_chain(err) if isinstance(e, ray.exceptions.RayActorError)]
    return found[-1] if found else None


def _object_lost(err: BaseException) -> bool:
    import ray

    return any(isinstance(e, ray.exceptions.ObjectLostError) for e in cause_chain(err))


class SamplerPool:
    """Submits batches to the samplers and completes them, recovering from sampler deaths."""

    def __init__(self, *, samplers: list, reward_stage, timeout_s: float, max_failures: int, log=print):
        self.samplers = samplers
        self.reward_stage = reward_stage
        self.timeout_s = timeout_s
        self.max_failures = max_failures
        self.log = log
        self.generation = [0] * len(samplers)
        self.failures_in_a_row = [0] * len(samplers)
        self.counters = FailureCounters()
        self.weights_ref = None  # the newest published adapter, re-sent to a restarted sampler
        self._ids = {s._actor_id.hex(): i for i, s in enumerate(samplers)}

    # ----- submission ------------------------------------------------------------------------
    def submit(self, job: BatchJob) -> BatchJob:
        sampler = self.samplers[job.worker]
        if job.branches is not None:
            n_branch, branch_step = job.branches
            job.trajectory, job.images = sampler.sample_branches.options(num_returns=2).remote(
                prompts=job.prompts, seed=job.seed, n_branch=n_branch, branch_step=branch_step)
        else:
            job.trajectory, job.images = sampler.sample.options(num_returns=2).remote(prompts=job.prompts,
                                                                                       seed=job.seed)
        job.score = self.reward_stage.score.remote(batch=job.images, gamma=job.gamma)
        job.generation = self.generation[job.worker]
        return job

    def set_weights(self, weights_ref) -> list[dict]:
        """Queues ``weights_ref`` on every sampler and waits for the acks, recovering dead samplers."""
        import ray

        self.weights_ref = weights_ref
        acks = [(i, s.set_weights.remote(packet=weights_ref), self.generation[i]) for i, s in enumerate(self.samplers)]
        out = []
        for worker, ack, generation in acks:
            try:
                out.append(ray.get(ack, timeout=self.timeout_s))
            except ray.exceptions.RayActorError as err:
                # A sampler that died after its last batch: the recovery re-applies the same adapter.
                out.append(self._recover(worker, err, generation))
        return out

    # ----- completion ------------------------------------------------------------------------
    def complete(self, jobs: list[BatchJob], *, abandon=lambda: False) -> list:
        """Scores of every job, in order; a batch lost with its sampler is sampled again.

        On return every job's refs point at a successful sample and score (never a partial epoch).
        ``abandon()`` is polled while waiting: when it turns true, StepAbandoned is raised (a graceful
        stop does not wait for an epoch that has not reached the learner yet).
        """
        import ray

        scores = []
        for job in jobs:
            while True:
                try:
                    self._wait(job.score, abandon)
                    scored = ray.get(job.score, timeout=self.timeout_s)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
                    self._handle_loss(job, err)
                    continue
                except ray.exceptions.RayTaskError as err:  # the dependency's failure, wrapped
                    if _actor_error(err) is None and not _object_lost(err):
                        raise
                    self._handle_loss(job, err)
                    continue
                if job.generation == self.generation[job.worker]:
                    self.failures_in_a_row[job.worker] = 0
                scores.append(scored)
                break
        return scores

    def _wait(self, ref, abandon) -> None:
        """Waits for ``ref`` to be ready (or failed), at most timeout_s, polling ``abandon`` twice a second."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            ready, _ = ray.wait([ref], timeout=0.5, fetch_local=False)
            if ready:
                return
            if abandon():
                raise StepAbandoned
        # Past the deadline: the ray.get that follows raises GetTimeoutError.

    def _handle_loss(self, job: BatchJob, err: BaseException) -> None:
        actor_err = _actor_error(err)
        worker = self._ids.get(getattr(actor_err, "actor_id", None) or "", None)
        if actor_err is not None and worker is None:
            raise err  # another actor (the reward stage) died: not a sampler failure
        if worker is not None and job.generation == self.generation[worker]:
            self._recover(worker, err, job.generation)
        self.counters.resampled_batches += 1
        self.submit(job)

    def _recover(self, worker: int, err: BaseException, generation: int) -> dict:
        """Counts a sampler death, waits for the restarted actor and gives it the newest adapter.

        While Ray restarts the actor, calls fail fast with ActorUnavailableError ("restarting"): those
        are waited out (up to timeout_s). A call that finds it dead again counts as another failure.
        """
        import ray

        sampler = self.samplers[worker]
        if generation != self.generation[worker]:  # this death was already handled
            return ray.get(sampler.set_weights.remote(packet=self.weights_ref), timeout=self.timeout_s)
        start = time.perf_counter()
        while True:
            self.failures_in_a_row[worker] += 1
            self.generation[worker] += 1
            self.counters.restarts += 1
            if self.failures_in_a_row[worker] > self.max_failures:
                raise SamplerFailedError(
                    f"sampler {worker} failed {self.failures_in_a_row[worker]} times in a row "
                    f"(cluster.max_sampler_failures = {self.max_failures}); last error: {_first_line(err)}")
            self.log(f"sampler {worker} died ({type(_actor_error(err) or err).__name__}); waiting for its restart, "
                     f"re-sending the newest adapter and sampling its lost batches again")
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    ack = ray.get(sampler.set_weights.remote(packet=self.weights_ref), timeout=self.timeout_s)
                    self.counters.recovery_s.append(time.perf_counter() - start)
                    return ack
                except ray.exceptions.ActorUnavailableError as again:  # still restarting
                    if time.monotonic() > deadline:
                        raise SamplerFailedError(
                            f"sampler {worker} did not come back within cluster.call_timeout_s = {self.timeout_s}s "
                            f"after dying; last error: {_first_line(again)}") from again
                    time.sleep(0.2)
                except ray.exceptions.RayActorError as again:  # died again (or for good)
                    err = again
                    break


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
