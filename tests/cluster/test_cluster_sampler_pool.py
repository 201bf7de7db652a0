"""SamplerPool (cluster/samplers.py) on a real local Ray with fake samplers that die on command: a
batch lost with its sampler is sampled again with the same seed and prompts after the newest adapter
is re-sent, the failure counters, the in-a-row failure limit (deaths while restarting included), a
death while idle, a dead reward stage, and abandon() (also while a sampler restarts).

The fake sampler dies deterministically: a per-test plan file lists the call numbers (counted in
files, across restarts) on which a method (or the constructor, ``init``) calls ``os._exit(1)``, and
the calls that first wait for a "go" file the test creates; every call is appended to an event log
that the tests read back. A "hold" file keeps ``sample`` busy until it is removed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import ray
import ray.cloudpickle

from cluster.samplers import (
    BatchJob,
    BranchPlan,
    SamplerFailedError,
    SamplerPool,
    StepAbandoned,
    _actor_state,
)

# The test module is not importable in Ray's worker processes: ship the fake actor classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT_S = 120.0


class _Controlled:
    """Plan, call counters and event log in ``control`` (files survive the actor's restarts)."""

    name: str

    def _file(self, suffix: str) -> Path:
        return Path(self.control) / f"{self.name}.{suffix}"

    def _bump(self, counter: str) -> int:
        path = self._file(f"{counter}.count")
        n = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(n))
        return n

    def _log(self, line: str) -> None:
        with self._file("log").open("a") as f:
            f.write(line + "\n")

    def _call(self, counter: str, what: str) -> int:
        """Counts a call of ``counter`` and returns its number; dies here when the plan names it.

        A call listed under ``<counter>_gate`` first waits for ``<name>.<counter><n>.go``: a process that
        exits at once can take the replies of its previous calls with it, which the test prevents by
        creating the file once it holds those results.
        """
        n = self._bump(counter)
        plan_path = self._file("plan.json")
        plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
        if n in plan.get(f"{counter}_gate", []):
            while not self._file(f"{counter}{n}.go").exists():
                time.sleep(0.05)
        if n in plan.get(counter, []):
            self._log(f"die {what}")
            os._exit(1)
        return n


class FakeSampler(_Controlled):
    """The keyword-only interface of actors.sampler.Sampler; outputs say which job produced them."""

    def __init__(self, *, worker: int, control: str):
        self.name = f"w{worker}"
        self.worker = worker
        self.control = control
        self.version = None
        self.incarnation = self._call("init", "init")  # a death here is one while Ray restarts it
        self._log(f"init {self.incarnation}")

    def set_weights(self, *, packet: dict) -> dict:
        self._call("set_weights", f"set_weights {packet['version']}")
        self.version = packet["version"]
        self._log(f"set_weights {self.version}")
        return {"version": self.version, "apply_s": 0.0}

    def _out(self, prompts, seed, **extra):
        while self._file("hold").exists():
            time.sleep(0.05)
        out = {"worker": self.worker, "seed": seed, "prompts": list(prompts), "version": self.version,
               "incarnation": self.incarnation, **extra}
        return {"kind": "trajectory", **out}, {"kind": "images", **out}

    def sample(self, *, prompts: list[str], seed: int):
        self._call("sample", f"sample {seed}")
        self._log(f"sample {seed} v{self.version}")
        return self._out(prompts, seed)

    def sample_branches(self, *, prompts: list[str], seed: int, n_branch: int, branch_step: int, share_start: bool):
        self._call("sample", f"sample {seed}")  # one counter for both sampling methods
        self._log(f"sample_branches {seed} {n_branch}x{branch_step} v{self.version}")
        return self._out(prompts, seed, branches=(n_branch, branch_step))


class FakeRewardStage(_Controlled):
    """score(batch=ImageBatch, gamma) -> a small record of the batch it scored."""

    def __init__(self, *, control: str):
        self.name = "reward"
        self.control = control

    def score(self, *, batch: dict, gamma: float) -> dict:
        self._call("score", f"score {batch['seed']}")
        return {"seed": batch["seed"], "worker": batch["worker"], "prompts": batch["prompts"], "gamma": gamma,
                "version": batch["version"], "incarnation": batch["incarnation"],
                "branches": batch.get("branches")}


@pytest.fixture
def cluster(ray_local, tmp_path):
    """make_pool(n_samplers, plans={name: {method: [call numbers to die on]}}, max_failures, reward_restarts)."""
    actors = []
    logs: list[str] = []

    def make_pool(n_samplers: int, *, plans: dict | None = None, max_failures: int = 3,
                  reward_restarts: int = 0) -> SamplerPool:
        for name, plan in (plans or {}).items():
            (tmp_path / f"{name}.plan.json").write_text(json.dumps(plan))
        sampler_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(FakeSampler)
        samplers = [sampler_cls.remote(worker=i, control=str(tmp_path)) for i in range(n_samplers)]
        reward = ray.remote(num_cpus=0, max_restarts=reward_restarts, max_task_retries=0)(FakeRewardStage).remote(
            control=str(tmp_path))
        actors.extend([*samplers, reward])
        return SamplerPool(samplers=samplers, reward_stage=reward, timeout_s=TIMEOUT_S, max_failures=max_failures,
                           log=logs.append)

    def events(name: str) -> list[str]:
        path = tmp_path / f"{name}.log"
        return path.read_text().splitlines() if path.exists() else []

    yield make_pool, events, tmp_path, logs
    (tmp_path / "w0.hold").unlink(missing_ok=True)
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _job(worker: int, seed: int, branches=None) -> BatchJob:
    return BatchJob(worker=worker, prompts=[f"p{seed}a", f"p{seed}b"], seed=seed, gamma=0.5, branches=branches)


def _publish(pool: SamplerPool, version: int) -> list[dict]:
    return pool.set_weights(ray.put({"version": version}))


def test_batch_lost_mid_epoch_is_resampled_once_with_same_seed_after_newest_adapter(cluster):
    make_pool, events, control, logs = cluster
    pool = make_pool(2, plans={"w0": {"sample": [2], "sample_gate": [2]}})  # worker 0 dies in its second batch
    assert _publish(pool, 1) == [{"version": 1, "apply_s": 0.0}] * 2
    assert _publish(pool, 2) == [{"version": 2, "apply_s": 0.0}] * 2  # the newest adapter: re-sent on restart
    plan = BranchPlan(n_branch=2, branch_step=3, share_start=True)
    jobs = [pool.submit(job) for job in (_job(0, 10), _job(1, 11), _job(0, 12, branches=plan), _job(1, 13))]
    # Worker 0 dies only once the driver holds its first batch (else that batch can be lost too).
    ray.wait([jobs[0].trajectory, jobs[0].images], num_returns=2, timeout=TIMEOUT_S, fetch_local=False)
    (control / "w0.sample2.go").touch()

    scores = pool.complete(jobs)

    # In job order, each batch exactly once, with the job's own seed, prompts and branching.
    assert [(s["worker"], s["seed"]) for s in scores] == [(0, 10), (1, 11), (0, 12), (1, 13)]
    assert [s["prompts"] for s in scores] == [job.prompts for job in jobs]
    assert [s["branches"] for s in scores] == [None, None, (2, 3), None]
    assert all(s["gamma"] == 0.5 and s["version"] == 2 for s in scores)
    # The lost batch came from the restarted sampler; the others from the first incarnations.
    assert [s["incarnation"] for s in scores] == [1, 1, 2, 1]
    # Restart -> newest adapter re-applied -> the same job again (sample_branches, same seed and shape).
    assert events("w0") == ["init 1", "set_weights 1", "set_weights 2", "sample 10 v2", "die sample 12",
                            "init 2", "set_weights 2", "sample_branches 12 2x3 v2"]
    assert events("w1") == ["init 1", "set_weights 1", "set_weights 2", "sample 11 v2", "sample 13 v2"]
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (1, 1)
    assert len(pool.counters.recovery_s) == 1 and pool.counters.recovery_s[0] > 0
    assert pool.generation == [1, 0] and pool.failures_in_a_row == [0, 0]
    # On return the job's refs point at the successful sample.
    trajectory, images = ray.get([jobs[2].trajectory, jobs[2].images])
    assert (trajectory["kind"], trajectory["seed"], trajectory["incarnation"]) == ("trajectory", 12, 2)
    assert (images["kind"], images["seed"], images["incarnation"]) == ("images", 12, 2)
    assert len(logs) == 1 and logs[0].startswith("sampler 0 died (")


def test_batches_queued_behind_a_death_are_resampled_without_counting_more_restarts(cluster):
    make_pool, events, _, _ = cluster
    pool = make_pool(1, plans={"w0": {"sample": [1]}})  # dies in the first of three queued batches
    _publish(pool, 1)
    jobs = [pool.submit(_job(0, seed)) for seed in (20, 21, 22)]

    scores = pool.complete(jobs)

    assert [s["seed"] for s in scores] == [20, 21, 22]
    assert [s["incarnation"] for s in scores] == [2, 2, 2]
    # One death, one adapter re-send; all three batches it had in flight sampled again, once each.
    assert events("w0") == ["init 1", "set_weights 1", "die sample 20", "init 2", "set_weights 1",
                            "sample 20 v1", "sample 21 v1", "sample 22 v1"]
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (1, 3)
    assert pool.generation == [1] and pool.failures_in_a_row == [0]


def test_sampler_dying_on_set_weights_is_restarted_and_given_that_adapter(cluster):
    make_pool, events, _, _ = cluster
    pool = make_pool(2, plans={"w1": {"set_weights": [2]}})  # worker 1 dies applying the second adapter
    _publish(pool, 1)

    acks = _publish(pool, 2)

    assert acks == [{"version": 2, "apply_s": 0.0}] * 2
    assert events("w1") == ["init 1", "set_weights 1", "die set_weights 2", "init 2", "set_weights 2"]
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (1, 0)
    assert pool.generation == [0, 1]
    # The restarted sampler keeps working with the adapter it was given.
    assert pool.complete([pool.submit(_job(1, 30))])[0]["version"] == 2


def test_sampler_dying_one_time_fewer_than_max_failures_in_a_row_recovers(cluster):
    make_pool, events, _, _ = cluster
    pool = make_pool(1, plans={"w0": {"sample": [1, 2]}}, max_failures=3)  # 2 deaths < 3
    _publish(pool, 1)

    scores = pool.complete([pool.submit(_job(0, 40))])

    assert [(s["seed"], s["incarnation"]) for s in scores] == [(40, 3)]
    assert events("w0") == ["init 1", "set_weights 1", "die sample 40", "init 2", "set_weights 1", "die sample 40",
                            "init 3", "set_weights 1", "sample 40 v1"]
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (2, 2)
    assert pool.failures_in_a_row == [0]  # reset by the good batch


def test_sampler_dying_max_failures_times_in_a_row_stops_with_its_worker_named(cluster):
    make_pool, events, _, _ = cluster
    pool = make_pool(2, plans={"w1": {"sample": [1, 2]}}, max_failures=2)
    _publish(pool, 1)
    jobs = [pool.submit(_job(0, 50)), pool.submit(_job(1, 51))]

    with pytest.raises(SamplerFailedError, match=r"^sampler 1 failed 2 times in a row "
                                                 r"\(cluster.max_sampler_failures = 2\); last error: "):
        pool.complete(jobs)

    # The first death was restarted (adapter re-sent, batch sampled again); the second stopped the run and
    # is not counted as a restart.
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (1, 1)
    assert pool.failures_in_a_row == [0, 2] and pool.generation == [0, 2]
    assert events("w1")[:6] == ["init 1", "set_weights 1", "die sample 51", "init 2", "set_weights 1",
                                "die sample 51"]
    assert "set_weights 1" not in events("w1")[6:]


def test_sampler_dying_while_idle_is_counted_and_given_the_adapter_before_its_next_batch(cluster):
    make_pool, events, _, logs = cluster
    pool = make_pool(1)
    _publish(pool, 1)
    assert pool.complete([pool.submit(_job(0, 45))])[0]["incarnation"] == 1
    ray.kill(pool.samplers[0], no_restart=False)  # no call in flight: no batch fails to tell
    deadline = time.monotonic() + TIMEOUT_S
    while _actor_state(pool.samplers[0])[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)

    scores = pool.complete([pool.submit(_job(0, 46))])

    # Without the adapter re-sent first, the restarted actor would have sampled with none (version None).
    assert [(s["seed"], s["incarnation"], s["version"]) for s in scores] == [(46, 2, 1)]
    assert events("w0") == ["init 1", "set_weights 1", "sample 45 v1", "init 2", "set_weights 1", "sample 46 v1"]
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (1, 0)
    assert pool.generation == [1] and pool.failures_in_a_row == [0] and len(pool.counters.recovery_s) == 1
    assert len(logs) == 1 and logs[0].startswith("sampler 0 died (found restarted by Ray); ")

def test_failures_separated_by_a_good_batch_do_not_accumulate(cluster):
    make_pool, _, _, _ = cluster
    pool = make_pool(1, plans={"w0": {"sample": [1, 3, 5]}}, max_failures=2)  # 1 would stop at the first
    _publish(pool, 1)

    for seed in (60, 61, 62):  # each batch: die once, then succeed
        assert pool.complete([pool.submit(_job(0, seed))])[0]["seed"] == seed

    assert (pool.counters.restarts, pool.counters.resampled_batches) == (3, 3)
    assert pool.failures_in_a_row == [0]


# Worker 0 dies four times in a row, three of them while Ray restarts it: in its first batch, applying
# the re-sent adapter (its second set_weights call) and in the constructors of incarnations 3 and 4.
DEATHS_WHILE_RESTARTING = {"w0": {"sample": [1], "set_weights": [2], "init": [3, 4]}}
FOUR_DEATHS = ["init 1", "set_weights 1", "die sample 40", "init 2", "die set_weights 1", "die init", "die init"]


def test_deaths_while_restarting_each_count_as_a_failure_and_the_run_goes_on_below_the_limit(cluster):
    make_pool, events, _, logs = cluster
    pool = make_pool(1, plans=DEATHS_WHILE_RESTARTING, max_failures=5)
    _publish(pool, 1)

    scores = pool.complete([pool.submit(_job(0, 40))])

    assert [(s["seed"], s["incarnation"], s["version"]) for s in scores] == [(40, 5, 1)]
    assert events("w0") == [*FOUR_DEATHS, "init 5", "set_weights 1", "sample 40 v1"]
    # Four deaths, four restarts; one recovery (one adapter applied); the lost batch sampled again once.
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (4, 1)
    assert len(pool.counters.recovery_s) == 1
    assert pool.generation == [4] and pool.failures_in_a_row == [0] and pool.unrecovered == {}
    assert len(logs) == 4 and logs[0].startswith("sampler 0 died (")
    assert logs[1:] == [f"sampler 0 died again ({n} failures in a row; cluster.max_sampler_failures = 5); waiting "
                        f"for its restart" for n in (2, 3, 4)]


def test_deaths_while_restarting_reach_the_limit_and_the_last_is_not_counted_as_a_restart(cluster):
    make_pool, events, _, _ = cluster
    pool = make_pool(1, plans=DEATHS_WHILE_RESTARTING, max_failures=4)
    _publish(pool, 1)

    with pytest.raises(SamplerFailedError, match=r"^sampler 0 failed 4 times in a row "
                                                 r"\(cluster.max_sampler_failures = 4\); last error: "):
        pool.complete([pool.submit(_job(0, 40))])

    assert events("w0")[:7] == FOUR_DEATHS
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (3, 0)
    assert pool.failures_in_a_row == [4] and pool.generation == [4] and pool.counters.recovery_s == []


def test_reward_stage_death_is_raised_and_not_counted_as_a_sampler_failure(cluster):
    make_pool, events, _, _ = cluster
    pool = make_pool(1, plans={"reward": {"score": [1]}}, reward_restarts=0)
    _publish(pool, 1)

    with pytest.raises(ray.exceptions.RayActorError) as info:
        pool.complete([pool.submit(_job(0, 70))])

    assert info.value.actor_id == pool.reward_stage._actor_id.hex()
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (0, 0)
    assert events("reward") == ["die score 70"]
    assert events("w0") == ["init 1", "set_weights 1", "sample 70 v1"]  # not sampled again


def test_abandon_turning_true_while_waiting_raises_step_abandoned(cluster):
    make_pool, _, control, _ = cluster
    pool = make_pool(1)
    _publish(pool, 1)
    (control / "w0.hold").touch()  # the batch stays in sampling until released
    job = pool.submit(_job(0, 80))
    polls = []

    def abandon() -> bool:
        polls.append(time.monotonic())
        return len(polls) == 3

    with pytest.raises(StepAbandoned):
        pool.complete([job], abandon=abandon)

    assert len(polls) == 3  # polled while waiting, raised on the first true
    assert polls[2] - polls[0] >= 0.9  # twice a second: each poll follows a 0.5 s wait
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (0, 0)
    # Abandoning leaves the job intact: once released it completes normally.
    (control / "w0.hold").unlink()
    assert pool.complete([job])[0]["seed"] == 80


def test_abandon_is_polled_while_a_dead_sampler_restarts_and_the_next_submit_finishes_its_recovery(cluster):
    make_pool, events, control, _ = cluster
    pool = make_pool(1, plans={"w0": {"sample": [1], "init_gate": [2]}})  # the restart waits for w0.init2.go
    _publish(pool, 1)
    job = pool.submit(_job(0, 80))
    polls = []

    def abandon() -> bool:
        polls.append(pool.counters.restarts)  # 1: the death is counted, the restart under way
        return polls.count(1) == 3

    with pytest.raises(StepAbandoned):
        pool.complete([job], abandon=abandon)

    assert polls.count(1) == 3 and polls[-1] == 1  # polled during the restart, raised on the first true
    assert events("w0") == ["init 1", "set_weights 1", "die sample 80"]  # still restarting
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (1, 0)
    assert pool.generation == [1] and pool.failures_in_a_row == [1] and list(pool.unrecovered) == [0]
    # Once it is back the same job completes: the lost batch is submitted again after the adapter
    # (sent once: the call in flight when the stop came is the one waited for).
    (control / "w0.init2.go").touch()
    assert [(s["seed"], s["incarnation"], s["version"]) for s in pool.complete([job])] == [(80, 2, 1)]
    assert events("w0") == ["init 1", "set_weights 1", "die sample 80", "init 2", "set_weights 1", "sample 80 v1"]
    assert (pool.counters.restarts, pool.counters.resampled_batches) == (1, 1)
    assert pool.failures_in_a_row == [0] and pool.unrecovered == {} and len(pool.counters.recovery_s) == 1


def test_abandon_is_not_consulted_for_batches_already_scored(cluster):
    make_pool, _, _, _ = cluster
    pool = make_pool(1)
    _publish(pool, 1)
    jobs = [pool.submit(_job(0, seed)) for seed in (90, 91)]
    ray.wait([job.score for job in jobs], num_returns=2, timeout=TIMEOUT_S, fetch_local=False)
    polls = []

    scores = pool.complete(jobs, abandon=lambda: polls.append(1) or True)

    assert [s["seed"] for s in scores] == [90, 91]
    assert polls == []
