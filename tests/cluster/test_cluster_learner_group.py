"""Two learner ranks on a real local Ray (``cluster.num_learners: 2``): a short run, an exact resume, a
killed rank, and the refusals of a group that cannot be placed or is misconfigured."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.checkpoint import list_checkpoints, load_checkpoint
from cluster.config import ConfigError, load_config
from cluster.driver import Driver
from cluster.placement import learner_problem, placement_problem, resource_demands
from cluster.run import prepare_run_dir, train
from cluster.specs import banner
from cluster.stop import RunInterrupted, StopRequest
from tests.conftest import actor_pid as _pid

REPO = Path(__file__).resolve().parents[2]


def _config(cache_dir: Path, *overrides: str):
    """The demo, synchronous (the exact-resume setting), small: one sampler, two learner ranks (the local
    Ray's 2 CPUs: sampler, reward stage and each rank 0.5), their states compared every epoch."""
    return load_config(REPO / "configs" / "jpeg_demo.yaml", [
        f"cache_dir={cache_dir}", "logging.progress=false", "logging.tensorboard=false", "cluster.max_staleness=0",
        "cluster.num_samplers=1", "sampling.batches_per_sampler=1", "evaluation.images_per_prompt=1",
        "checkpoint.every_epochs=1", "cluster.num_learners=2", "cluster.learner_check_every=1", *overrides])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _training(row: dict, *, drop: tuple[str, ...] = ()) -> dict:
    """A row without timings and without the keys starting with a prefix in ``drop``."""
    return {k: v for k, v in row.items() if not k.endswith("_s") and not k.startswith(drop)}


def _lora(run_dir: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    tensors = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    return {name: tensor.numpy().tobytes() for name, tensor in tensors.items()}


# ----- without Ray ------------------------------------------------------------------------------
def test_learner_ranks_that_cannot_fit_are_named_with_the_resources(tmp_path):
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", ["cluster.num_learners=4", "cluster.learner_num_gpus=1"])
    assert [d for d in resource_demands(config) if d[0].startswith("learner")] == [
        (f"learner rank {i}", 0.5, 1.0) for i in range(4)]
    problem = learner_problem(config, {"CPU": 16.0, "GPU": 2.0})
    assert problem.startswith("cluster.num_learners = 4: 4 learner ranks x 1 GPU (cluster.learner_num_gpus) = 4 GPU "
                              "required, but the Ray cluster has 2 GPU available; lower cluster.num_learners (at most "
                              "2 fit)")
    assert learner_problem(config, {"CPU": 16.0, "GPU": 4.0}) is None
    assert learner_problem(load_config(REPO / "configs" / "jpeg_demo.yaml"), {"CPU": 0.0}) is None  # one learner: the usual check
    # Ranks that fit alone but not beside the samplers: the usual paragraph, which names the setting too.
    both = load_config(REPO / "configs" / "jpeg_demo.yaml", ["cluster.num_learners=2"])
    assert learner_problem(both, {"CPU": 2.0}) is None
    assert "learner rank 0 0.5, learner rank 1 0.5" in placement_problem(resource_demands(both), {"CPU": 2.0})
    assert "cluster.num_learners" in placement_problem(resource_demands(both), {"CPU": 2.0})


def test_the_banner_gives_the_learner_count():
    text = banner(_config(Path("/nonexistent")), Path("run"), "local")
    assert "learners            : 2 ranks x (0.5 CPU, 0 GPU), torch.distributed gloo, ~10 pairs per rank per " \
           "step, gradients averaged; states compared every 1 epochs" in text
    assert "learners            : 1 rank x (0.5 CPU, 0 GPU)\n" in banner(
        load_config(REPO / "configs" / "jpeg_demo.yaml"), Path("run"), "local")


def test_too_many_learners_stop_the_cli_before_any_actor_starts(tmp_path):
    """A cluster the CLI starts itself cannot grow: 5 ranks x 0.5 CPU on 2 CPUs is a config error (exit 2),
    raised after Ray started and before the run directory or any actor exists."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "cluster", "train", str(REPO / "configs" / "jpeg_demo.yaml"), f"cache_dir={tmp_path}",
         "cluster.num_learners=5", "cluster.local_num_cpus=2", "--output-dir", str(run_dir)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2, done.stderr[-2000:]
    assert ("gard: error: cluster.num_learners = 5: 5 learner ranks x 0.5 CPU (cluster.learner_num_cpus) = 2.5 CPU "
            "required, but the Ray cluster has 2 CPU available; lower cluster.num_learners (at most 4 fit)") in done.stderr
    assert not run_dir.exists()


def test_fractional_gpus_for_nccl_ranks_are_refused():
    with pytest.raises(ConfigError, match=r"cluster.num_learners = 2 with cluster.learner_num_gpus = 0.5: .*NCCL"):
        load_config(REPO / "configs" / "jpeg_demo.yaml", ["cluster.num_learners=2", "cluster.learner_num_gpus=0.5"])


# ----- on a local Ray ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(ray_local, cache_dir, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run with two learner ranks."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return train(_config(cache_dir, "epochs=3"), output_dir=str(run_dir), log=lambda *_: None)


def test_a_run_with_two_learner_ranks_trains_every_pair_once_per_epoch(reference):
    rows = _rows(reference)
    config = _config(Path("/nonexistent"))
    pairs = config.samples_per_epoch * config.train_steps_per_sample  # 8 samples x 10 steps
    assert [r["train/policy_version"] for r in rows] == [1, 2, 3]
    assert [r["sampler/policy_version"] for r in rows] == [0, 1, 2]
    assert all(r["train/n_pairs"] == pairs == 80 and r["train/optimizer_steps"] == 4 for r in rows)
    assert all(r["train/skipped_steps"] == 0 and r["time/allreduce_s"] > 0 for r in rows)
    # The samplers drew with rank 0's published adapter and the ranks train the same: ρ = 1 at the start.
    assert all(r["train/onpolicy_ratio_dev"] < 1e-4 for r in rows), [r["train/onpolicy_ratio_dev"] for r in rows]
    assert all(r["train/kl"] > 0 and 0 <= r["train/clipfrac"] <= 1 for r in rows)
    assert rows[-1]["train/kl"] > rows[0]["train/kl"]  # the adapter moves away from the base model
    # Rank 0's state was checkpointed; its adapter is the exported one.
    checkpoint = load_checkpoint(list_checkpoints(reference)[-1])
    assert checkpoint.epoch == 3 and checkpoint.meta["policy_version"] == 3
    final = _lora(reference)
    assert any(name.endswith("lora_B.weight") and any(final[name]) for name in final)


def test_resume_with_two_ranks_equals_the_uninterrupted_run(reference, cache_dir, tmp_path):
    run_dir, stop = tmp_path / "run", StopRequest()

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch   0"):
            stop.request("test")

    with pytest.raises(RunInterrupted, match=r"stopped by test after epoch 1 of 3; checkpoint .*epoch-000001"):
        train(_config(cache_dir, "epochs=3"), output_dir=str(run_dir), stop=stop, log=stop_after_first_epoch)
    lines: list[str] = []
    train(_config(cache_dir, "epochs=3"), output_dir=str(run_dir), resume="auto", log=lines.append)
    assert any(line.startswith("resumed from") and "epoch-000001" in line for line in lines)
    rows, expected = _rows(run_dir), _rows(reference)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for got, want in zip(rows, expected, strict=True):
        assert _training(got) == _training(want)  # every rank restored from rank 0's checkpoint: bit for bit
    assert _lora(run_dir) == _lora(reference)


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_a_killed_rank_rebuilds_the_group_and_the_run_is_unchanged(reference, cache_dir, tmp_path):
    config = _config(cache_dir, "epochs=3")
    driver = Driver(config, run_dir=prepare_run_dir(config, str(tmp_path / "run")))
    pids: list[list[int]] = []
    lines: list[str] = []

    def kill(epoch: int, row: dict) -> None:
        pids.append([_pid(actor) for actor in driver.learner.actors])
        if epoch == 0:  # between updates: epoch 1's update finds rank 1 gone
            os.kill(pids[-1][1], signal.SIGKILL)
        if epoch == 1:  # rank 0 dies with epoch 2's update queued, while rank 1 waits for it in a collective
            driver.learner.actors[0].__ray_call__.remote(lambda self: (__import__("time").sleep(2), os._exit(1)))

    try:
        rows = driver.run(log=lines.append, on_epoch_end=kill)
        pids.append([_pid(actor) for actor in driver.learner.actors])  # before shutdown() ends the ranks
    finally:
        driver.shutdown()
    deaths = [line for line in lines if re.search(r"a learner rank (died|failed in a collective) during", line)]
    assert len(deaths) == 2 and driver.learner.restarts == 2, lines
    assert len({pid for ranks in pids for pid in ranks}) == 6
    # Every epoch applied once, from the state it started from, on a group rebuilt from the snapshot.
    for got, want in zip(rows, _rows(reference), strict=True):
        assert _training(got) == _training(want)
    assert _lora(tmp_path / "run") == _lora(reference)


def test_dead_and_hung_ranks_are_rebuilt_and_the_run_is_unchanged(reference, cache_dir, tmp_path):
    """The three ways a group fails, one after another: a rank killed (SIGKILL) between updates; a rank
    that stays alive but never reaches the collective (its peer's collective times out at half the call
    timeout); and every rank hung (no collective fails: the driver's own wait on the call runs out, here
    on the final adapter export). Each time the group is rebuilt from the snapshot and the call repeated:
    every epoch is applied once and the run equals the uninterrupted one."""
    config = _config(cache_dir, "epochs=3", "cluster.call_timeout_s=60")
    driver = Driver(config, run_dir=prepare_run_dir(config, str(tmp_path / "run")))
    lines: list[str] = []

    def fail(epoch: int, row: dict) -> None:
        nap = lambda self: __import__("time").sleep(600)  # noqa: E731 - far past every timeout
        if epoch == 0:  # epoch 1's state comparison finds rank 1 gone
            os.kill(_pid(driver.learner.actors[1]), signal.SIGKILL)
        if epoch == 1:  # rank 1 sleeps through epoch 2's comparison; rank 0 waits for it there
            driver.learner.actors[1].__ray_call__.remote(nap)
        if epoch == 2:  # both ranks sleep through the export of the final adapter
            for actor in driver.learner.actors:
                actor.__ray_call__.remote(nap)

    try:
        rows = driver.run(log=lines.append, on_epoch_end=fail)
    finally:
        driver.shutdown()
    failures = [line for line in lines if line.startswith("gard: a learner rank")]
    assert len(failures) == 3 and driver.learner.restarts == 3, lines
    assert re.search(r"a learner rank (died|failed in a collective) during comparing the ranks", failures[0]), failures
    assert "failed in a collective during comparing the ranks" in failures[1] and "timed out" in failures[1], failures
    assert "hung during exporting the adapter" in failures[2], failures
    assert "cluster.call_timeout_s = 60 s" in failures[2], failures
    for got, want in zip(rows, _rows(reference), strict=True):
        assert _training(got) == _training(want)
    assert _lora(tmp_path / "run") == _lora(reference)


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_ranks_that_diverge_stop_the_run_with_rank_0s_checkpoint(ray_local, cache_dir, tmp_path):
    from learner.distributed import LearnerDivergedError

    config = _config(cache_dir, "epochs=3", "checkpoint.every_epochs=0")
    driver = Driver(config, run_dir=prepare_run_dir(config, str(tmp_path / "run")))

    def perturb_rank_1(epoch: int, row: dict) -> None:
        if epoch == 0:
            import ray

            def nudge(self):
                import torch

                with torch.no_grad():
                    self.policy.named_trainable_parameters()[0][1].add_(1e-3)

            ray.get(driver.learner.actors[1].__ray_call__.remote(nudge), timeout=120)

    try:
        with pytest.raises(LearnerDivergedError, match=r"the learner ranks disagree after 1 epoch\(s\): the adapter and "
                                                       r"optimizer state of rank 1 \(.*\) differs from rank 0's .*The run "
                                                       r"stopped after checkpoint .*epoch-000001"):
            driver.run(log=lambda *_: None, on_epoch_end=perturb_rank_1)
    finally:
        driver.shutdown()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["epoch-000001"]


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_two_ranks_with_asynchronous_samplers_train_on_one_epoch_old_samples(ray_local, cache_dir, tmp_path):
    # max_staleness 1: the samplers draw epoch e + 1 while the ranks train on epoch e, so after the first
    # epoch every batch comes from the adapter one update behind; the ranks still agree at every epoch
    # (learner_check_every=1 would stop the run otherwise).
    config = _config(cache_dir, "epochs=4", "cluster.max_staleness=1", "cluster.num_samplers=2",
                     "cluster.learner_num_cpus=0.25", "checkpoint.every_epochs=0")  # 2 x 0.5 + 2 x 0.25 + 0.5 CPUs
    run_dir = tmp_path / "run"
    train(config, output_dir=str(run_dir), log=lambda *_: None)
    rows = _rows(run_dir)
    assert [r["train/policy_version"] for r in rows] == [1, 2, 3, 4]
    lags = [r["train/policy_version"] - 1 - r["sampler/policy_version"] for r in rows]
    assert lags[0] == 0 and all(lag in (0, 1) for lag in lags) and any(lag == 1 for lag in lags[1:]), lags
    assert all(r["train/stale_refused"] == 0 and r["train/optimizer_steps"] == 4 for r in rows)
    assert all(r["train/n_pairs"] == config.samples_per_epoch * config.train_steps_per_sample for r in rows)
    # The ranks keep the adapter that drew the one-epoch-old samples: under it the learner reproduces the
    # samplers' log-probabilities (ρ = 1 before the first step), so PPO's ratio measures only the lag.
    assert all(r["train/onpolicy_ratio_dev"] < 1e-4 for r in rows), [r["train/onpolicy_ratio_dev"] for r in rows]
