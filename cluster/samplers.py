"""The sampler actors of a run and what happens when one dies.

Samplers are Ray actors with unlimited restarts. A batch is a ``BatchJob`` (worker, prompts, seed:
everything needed to sample it again), submitted as sample -> score. When a sampler dies, every
batch it had in flight fails with a ``RayActorError``; ``SamplerPool.complete`` notices it on that
batch's score, re-sends the newest adapter to the restarted actor, and submits the same job again.
Its seed comes from (seed, epoch, worker, batch), so the new batch is the one that was lost, sampled
with the adapter the epoch is meant to use: an epoch always trains on every batch exactly once.
A sampler that fails ``max_failures`` times in a row (without one good batch between) stops the run;
every death counts, also one while Ray is restarting the sampler, so 1 stops at the first death.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

from cluster.errors import cause_chain


def start_sampler_actors(config, *, pretrained: str, env: dict, placement) -> list:
    """Starts ``cluster.num_samplers`` sampler actors, sampler i in its bundle of ``placement``
    (``cluster/placement_groups.py``; ``placement.remove()`` ends them). Unlimited restarts (into the same
    bundle), no transparent task retries: the pool re-sends the adapter to a restarted sampler before it
    samples again."""
    import ray

    from cluster.remote import RemoteSampler
    from cluster.specs import policy_spec

    c = config.cluster
    cls = ray.remote(num_cpus=c.sampler_num_cpus, num_gpus=c.sampler_num_gpus, runtime_env=env, max_restarts=-1,
                     max_task_retries=0)(RemoteSampler)
    return placement.started([cls.options(**placement.sampler_options(index=i)).remote(
        spec=policy_spec(config, pretrained=pretrained, num_gpus=c.sampler_num_gpus), worker_index=i,
        torch_threads=c.torch_threads, call_timeout_s=c.call_timeout_s) for i in range(c.num_samplers)])


class SamplerFailedError(RuntimeError):
    """A sampler kept dying; names the worker and the last error."""


class StepAbandoned(Exception):
    """A stop was requested while the epoch's batches were still being sampled or scored."""


class BranchPlan(NamedTuple):
    """B² branch rollouts of one batch: ``n_branch`` leaves per prompt continue from step ``branch_step``
    of a shared prefix; with ``share_start`` false (branch_step 0 only) each leaf draws its own x_T."""

    n_branch: int
    branch_step: int
    share_start: bool


@dataclass
class BatchJob:
    """One sampler batch: what to sample (enough to sample it again) and the refs once submitted.

    branches: the B² branch rollouts, None for plain sampling.
    generation: the sampler's deaths the pool had counted when the job was submitted (failures of an
    older generation were already handled; the job only needs resubmitting).
    """

    worker: int
    prompts: list[str]
    seed: int
    gamma: float
    branches: BranchPlan | None = None
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

    restarts: int = 0  # deaths the run went on after (Ray restarted the actor; the adapter is re-sent)
    resampled_batches: int = 0  # batches lost with a dead sampler and sampled again
    recovery_s: list[float] = field(default_factory=list)  # per recovery: failure noticed -> adapter re-applied


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
    """Submits batches to the samplers and completes them, recovering from sampler deaths.

    Deaths are counted from Ray's own restart count of each actor (``_actor_state``), not from the
    errors the driver happens to see: a sampler that dies again while Ray restarts it (in its
    constructor, or while taking the adapter) raises nothing the driver could catch, yet it is one
    more failure in a row.
    """

    def __init__(self, *, samplers: list, reward_stage, timeout_s: float, max_failures: int, log=print):
        self.samplers = samplers
        self.reward_stage = reward_stage
        self.timeout_s = timeout_s
        self.max_failures = max_failures
        self.log = log
        self.generation = [0] * len(samplers)  # deaths counted per sampler (a job keeps the value it saw)
        self.failures_in_a_row = [0] * len(samplers)
        self.restarts_seen = [_actor_state(s)[0] for s in samplers]  # Ray's restart count, as last counted
        # Restarted samplers not yet given the newest adapter -> (its set_weights ref, restart count when
        # sent) while that call is in flight, else None.
        self.unrecovered: dict[int, tuple | None] = {}
        self.counters = FailureCounters()
        self.weights_ref = None  # the newest published adapter, re-sent to a restarted sampler
        self._ids = {s._actor_id.hex(): i for i, s in enumerate(samplers)}

    # ----- submission ------------------------------------------------------------------------
    def submit(self, job: BatchJob) -> BatchJob:
        sampler = self.samplers[job.worker]
        # A recovery was abandoned, or the sampler died while idle (no batch failed to tell, and Ray's
        # restarted actor has no adapter): the newest adapter first, then the batch.
        if job.worker in self.unrecovered or _actor_state(sampler)[0] != self.restarts_seen[job.worker]:
            self._recover(job.worker, None)
        if job.branches is not None:
            plan = job.branches
            job.trajectory, job.images = sampler.sample_branches.options(num_returns=2).remote(
                prompts=job.prompts, seed=job.seed, n_branch=plan.n_branch, branch_step=plan.branch_step,
                share_start=plan.share_start)
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
        # An older adapter still on its way to a sampler being restarted is not the one to wait for.
        self.unrecovered = dict.fromkeys(self.unrecovered)
        acks = [(i, s.set_weights.remote(packet=weights_ref)) for i, s in enumerate(self.samplers)]
        out = []
        for worker, ack in acks:
            try:
                out.append(ray.get(ack, timeout=self.timeout_s))
                self.unrecovered.pop(worker, None)
            except ray.exceptions.RayActorError as err:
                # A sampler that died after its last batch: the recovery re-applies the same adapter.
                out.append(self._recover(worker, err))
        return out

    # ----- completion ------------------------------------------------------------------------
    def complete(self, jobs: list[BatchJob], *, abandon=lambda: False) -> list:
        """Scores of every job, in order; a batch lost with its sampler is sampled again.

        On return every job's refs point at a successful sample and score (never a partial epoch).
        ``abandon()`` is polled while waiting, also while a dead sampler is being restarted: when it
        turns true, StepAbandoned is raised (a graceful stop does not wait for an epoch that has not
        reached the learner yet, nor for a restart).
        """
        import ray

        scores = []
        for job in jobs:
            while True:
                try:
                    self._wait(job.score, abandon)
                    scored = ray.get(job.score, timeout=self.timeout_s)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
                    self._handle_loss(job, err, abandon)
                    continue
                except ray.exceptions.RayTaskError as err:  # the dependency's failure, wrapped
                    if _actor_error(err) is None and not _object_lost(err):
                        raise
                    self._handle_loss(job, err, abandon)
                    continue
                if job.generation == self.generation[job.worker]:
                    self.failures_in_a_row[job.worker] = 0
                scores.append(scored)
                break
        return scores

    def _wait(self, ref, abandon, *, deadline: float | None = None) -> None:
        """Waits for ``ref`` to be ready (or failed) until ``deadline`` (default: timeout_s from now),
        polling ``abandon`` twice a second."""
        import ray

        deadline = time.monotonic() + self.timeout_s if deadline is None else deadline
        while time.monotonic() < deadline:
            ready, _ = ray.wait([ref], timeout=0.5, fetch_local=False)
            if ready:
                return
            if abandon():
                raise StepAbandoned
        # Past the deadline: the ray.get that follows raises GetTimeoutError.

    def _handle_loss(self, job: BatchJob, err: BaseException, abandon) -> None:
        actor_err = _actor_error(err)
        worker = self._ids.get(getattr(actor_err, "actor_id", None) or "", None)
        if actor_err is not None and worker is None:
            raise err  # another actor (the reward stage) died: not a sampler failure
        if worker is not None and job.generation == self.generation[worker]:
            self._recover(worker, err, abandon=abandon)
        self.counters.resampled_batches += 1
        self.submit(job)

    def _recover(self, worker: int, err: BaseException | None, *, abandon=lambda: False) -> dict:
        """Counts the sampler's deaths, waits for the restarted actor and gives it the newest adapter.

        Every death Ray restarted the actor for is one failure, including deaths during this restart
        (in the constructor or while taking the adapter). The adapter counts as applied only when the
        restart count did not move between sending it and its ack: otherwise the actor that
        acknowledged it is gone. ``abandon()`` is polled throughout; an abandoned recovery keeps its
        adapter call in flight in ``unrecovered`` and is finished by the next ``submit``.
        """
        import ray

        sampler = self.samplers[worker]
        self.unrecovered.setdefault(worker, None)
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        while True:
            restarts, state = _actor_state(sampler)
            if self._count_deaths(worker, restarts, err):
                deadline = time.monotonic() + self.timeout_s  # each death gets a full timeout to come back
            if state == "DEAD":
                raise SamplerFailedError(f"sampler {worker} is dead and Ray will not restart it; last error: "
                                         f"{_first_line(err)}")
            if state == "ALIVE":  # (also while its constructor runs: the call waits for it)
                if self.unrecovered[worker] is None:
                    self.unrecovered[worker] = (sampler.set_weights.remote(packet=self.weights_ref), restarts)
                ack_ref, sent_at = self.unrecovered[worker]
                try:
                    self._wait(ack_ref, abandon, deadline=deadline)
                    ack = ray.get(ack_ref, timeout=max(0.0, deadline - time.monotonic()))
                except ray.exceptions.RayActorError as again:  # died: the next count tells how often
                    err, self.unrecovered[worker] = again, None
                except ray.exceptions.GetTimeoutError:
                    pass  # the deadline check below names it
                else:
                    if _actor_state(sampler)[0] == sent_at:
                        del self.unrecovered[worker]
                        self.counters.recovery_s.append(time.perf_counter() - start)
                        return ack
                    self.unrecovered[worker] = None  # acknowledged by an actor that has died since: again
            if time.monotonic() > deadline:
                raise SamplerFailedError(
                    f"sampler {worker} did not come back within cluster.call_timeout_s = {self.timeout_s}s "
                    f"after dying; last error: {_first_line(err)}")
            time.sleep(0.2)  # Ray is still restarting it
            if abandon():
                raise StepAbandoned

    def _count_deaths(self, worker: int, restarts: int, err: BaseException | None) -> bool:
        """Counts the deaths Ray restarted ``worker`` for since the last count; raises SamplerFailedError
        on the one that makes ``max_failures`` in a row (that one is not counted as a restart: the run
        stops instead). True when there was a new death."""
        new = restarts - self.restarts_seen[worker]
        for _ in range(new):
            self.restarts_seen[worker] += 1
            self.generation[worker] += 1
            self.failures_in_a_row[worker] += 1
            in_a_row = self.failures_in_a_row[worker]
            if in_a_row >= self.max_failures:
                raise SamplerFailedError(
                    f"sampler {worker} failed {in_a_row} times in a row "
                    f"(cluster.max_sampler_failures = {self.max_failures}); last error: {_first_line(err)}")
            self.counters.restarts += 1
            if in_a_row > 1:
                self.log(f"sampler {worker} died again ({in_a_row} failures in a row; cluster.max_sampler_failures "
                         f"= {self.max_failures}); waiting for its restart")
                continue
            how = "found restarted by Ray" if err is None else type(_actor_error(err) or err).__name__
            self.log(f"sampler {worker} died ({how}); waiting for its restart, re-sending the newest adapter "
                     f"and sampling its lost batches again")
        return new > 0


def _actor_state(actor) -> tuple[int, str]:
    """(how many times Ray restarted ``actor``, its state: ALIVE, RESTARTING, DEAD, ...) from the GCS.

    The public state API (ray.util.state) needs the dashboard, which local runs do not start; the GCS
    actor table is what it reads too. An actor not registered yet reads as (0, PENDING_CREATION).
    """
    from ray._private.state import actors

    info = actors(actor_id=actor._actor_id.hex()) or {}
    return int(info.get("NumRestarts", 0)), str(info.get("State", "PENDING_CREATION"))


def _first_line(err: BaseException | None) -> str:
    if err is None:  # the deaths were found in Ray's restart count, not through a failed call
        return "none seen (found in Ray's restart count of the actor)"
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
